"""plan_run: a run's decisions are made once, before any model loads, and the notebook path meets the command's checks."""

import dataclasses
import json

import pytest
import torch

from qwen_helpers.training import plan as planning
from qwen_helpers.training import sft as training
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments
from qwen_helpers.common.errors import FlagError
from qwen_helpers.run.methods import METHODS
from qwen_helpers.training.plan import RunPlan, plan_run

from conftest import DATA


def training_args(tmp_path, **values) -> KitTrainingArguments:
    values = {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 2,
              "save_strategy": "no", "report_to": "none", "disable_tqdm": True, **values}
    return KitTrainingArguments(**values)


def test_the_plan_holds_each_decision(tmp_path, small_train_file, tokenizer):
    plan = plan_run(ModelArguments(), DataArguments(data_path=small_train_file, max_length=128), training_args(tmp_path),
                    "lora", LoraArguments(), save=False, tokenizer=tokenizer)
    assert plan.method is METHODS["lora"]  # the registry's object, not a name to look up again
    assert plan.precision.requested == "fp16" and plan.precision.effective == "fp32"  # the default request, on a CPU
    assert plan.dtype == torch.float32
    assert plan.padding_free is True and "padding-free" in plan.batching_note
    assert plan.task == "generation" and plan.labels is None
    assert plan.enable_thinking is False and plan.chat_token_rows == ()  # the tiny model is an instruct checkpoint
    assert plan.training.output_dir == plan.target_dir == str(tmp_path / "run")  # save=False: no staging folder
    assert not (tmp_path / "run").exists()


def test_prompt_tuning_on_classification_data_plans_labels_and_padded_batches(tmp_path, tokenizer):
    data = DataArguments(data_path=str(DATA / "classify_train.json"), max_length=128)
    plan = plan_run(ModelArguments(), data, training_args(tmp_path), "prompt_tuning", PromptTuningArguments(),
                    save=False, tokenizer=tokenizer)
    assert plan.method is METHODS["prompt_tuning"] and plan.prompt_args is not None and plan.lora_args is None
    assert plan.padding_free is False  # virtual tokens cannot be shared by concatenated examples
    assert plan.task == "classification" and plan.labels == ("中性", "正面", "负面")


def test_a_saved_run_is_planned_into_a_staging_folder_beside_its_target(tmp_path, small_train_file, tokenizer):
    plan = plan_run(ModelArguments(), DataArguments(data_path=small_train_file), training_args(tmp_path), "lora",
                    LoraArguments(), tokenizer=tokenizer)
    assert plan.target_dir == str(tmp_path / "run") and plan.training.output_dir == plan.output.staging
    assert plan.output.staging.startswith(str(tmp_path / ".run"))


def test_the_plan_is_frozen(tmp_path, small_train_file, tokenizer):
    plan = plan_run(ModelArguments(), DataArguments(data_path=small_train_file), training_args(tmp_path), "lora",
                    LoraArguments(), save=False, tokenizer=tokenizer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.padding_free = False
    changed = dataclasses.replace(plan, dtype=torch.bfloat16)  # a changed plan is a new one (the benchmark's fp32 row)
    assert changed.dtype == torch.bfloat16 and plan.dtype == torch.float32


@pytest.mark.parametrize("method, arguments, message", [
    ("lora", PromptTuningArguments(), "takes LoraArguments"),
    ("qlora", LoraArguments(), "trains on a 4-bit base"),
    ("lora", LoraArguments(init_lora_weights="pissa"), "on a 4-bit base"),
])
def test_methods_are_checked_against_the_other_groups(tmp_path, small_train_file, method, arguments, message):
    model = ModelArguments(load_in_4bit=message == "on a 4-bit base")
    with pytest.raises(FlagError, match=message):
        plan_run(model, DataArguments(data_path=small_train_file), training_args(tmp_path), method, arguments)


def test_train_makes_no_decision_again(tmp_path, small_train_file, tokenizer, monkeypatch):
    """Once planned, training re-runs none of the checks or decisions: each one here fails if called."""
    plan = plan_run(ModelArguments(), DataArguments(data_path=small_train_file, max_length=128), training_args(tmp_path),
                    "lora", LoraArguments(), save=False, tokenizer=tokenizer)

    def decided_already(*args, **kwargs):
        raise AssertionError("a decision of the plan was made again during training")

    for module in (planning, training):
        for name in ("resolve_padding_free", "check_model_path", "check_liger", "held_out_task", "check_data_files",
                     "check_classification_flags", "check_evaluation_data", "plan_output_on_main_process",
                     "check_token_budget", "chat_tokens_to_train"):
            monkeypatch.setattr(module, name, decided_already, raising=False)
    for target in ("qwen_helpers.run.flag_checks.check_training_flags", "qwen_helpers.models.loading.load_tokenizer",
                   "qwen_helpers.run.precision.decide_precision", "qwen_helpers.training.run_folder.check_output_dir"):
        monkeypatch.setattr(target, decided_already)
    result = training.train(plan)
    assert isinstance(plan, RunPlan) and len(result.train_losses) == 1
    assert plan.batching_note in result.notes


def bad_value_message(capsys, argv) -> str:
    from qwen_helpers.train_lora import main

    assert main(argv) == 2
    return capsys.readouterr().err.strip().removeprefix("error: ")


def test_a_bad_widget_value_is_refused_by_the_commands_check(tmp_path, capsys):
    """The same value through the command, a notebook panel and a dataclass: one check, one sentence."""
    pytest.importorskip("ipywidgets")
    from qwen_helpers.notebook.widgets import config_panel

    command = bad_value_message(capsys, ["--weight_decay", "-0.5", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(FlagError) as in_python:
        training_args(tmp_path, weight_decay=-0.5)
    panel = config_panel(KitTrainingArguments, ["weight_decay"], "Training", output_dir=str(tmp_path / "run"))
    panel.widgets["weight_decay"].value = "-0.5"  # typed into the text box
    with pytest.raises(FlagError) as in_notebook:
        panel.value()
    assert command == str(in_python.value) == str(in_notebook.value)
    assert command == "--weight_decay must be 0 or more, got -0.5."


def test_the_command_writes_what_the_plan_decided(tmp_path, small_train_file):
    from qwen_helpers.train_lora import main

    output = tmp_path / "run"
    argv = ["--data_path", small_train_file, "--output_dir", str(output), "--max_steps", "1", "--save_strategy", "no",
            "--max_length", "128", "--report_to", "none", "--max_eval_records", "0"]
    assert main(argv) == 0
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["method"] == "lora" and run_config["output_dir"] == str(output.resolve())
    assert run_config["effective_precision"] == "fp32" and run_config["requested_precision"] == "fp16"

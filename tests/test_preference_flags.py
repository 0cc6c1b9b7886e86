"""train_dpo and train_grpo check their values before a model loads, and refuse flags they accept but do not use.

A hostile run found `--beta -1` and `--beta 0` training, `--loss_type foo`, GRPO's `--temperature 0`, `--top_k -1` and
`--max_completion_length 0` as tracebacks after the model loaded, and `--loraplus_lr_ratio`, `--early_stopping_patience`,
`--token_budget`, `--eval_generate_records` and PiSSA/OLoRA starts validated, recorded and ignored. Each row runs the
command's real ``main`` in this process with model loading made to fail loudly: one ``error:`` line, exit 2, nothing
written, and no model loaded.
"""

import re

import pytest

from conftest import DATA
from qwen_helpers import train_dpo, train_grpo
from qwen_helpers.run import objective_checks
from qwen_helpers.training import dpo, grpo

DPO_ROWS = [
    (["--beta", "-1"], "--beta -1.0: DPO's beta must be above 0"),
    (["--beta", "0"], "--beta 0.0: DPO's beta must be above 0"),
    (["--loss_type", "foo"], "--loss_type foo: not one of TRL's DPO losses"),
    (["--loraplus_lr_ratio", "16"], "--loraplus_lr_ratio 16.0: TRL's trainers would train A and B at one learning rate"),
    (["--token_budget", "512"], "--token_budget 512: DPO and GRPO batch with --per_device_train_batch_size"),
    (["--eval_generate_records", "4"], "--eval_generate_records 4: DPO is judged on held-out pairs"),
    (["--init_lora_weights", "pissa"], "--init_lora_weights pissa: train_dpo would save an adapter that fits only"),
    (["--eval_strategy", "steps"], "--eval_strategy steps evaluates held-out pairs, and none were given"),
]
GRPO_ROWS = [
    (["--beta", "-0.1"], "--beta -0.1: the KL penalty cannot be negative"),
    (["--temperature", "0"], "--temperature 0.0: GRPO samples"),
    (["--top_k", "-1"], "--top_k -1: 0 samples among every token"),
    (["--max_completion_length", "0"], "--max_completion_length 0: a completion needs at least one token"),
    (["--num_generations", "1", "--per_device_train_batch_size", "2"], "GRPO requires at least 2 generations per prompt"),  # TRL's own check, before the model
    (["--loss_type", "foo"], "--loss_type foo: not one of TRL's GRPO losses"),
    (["--loraplus_lr_ratio", "16"], "--loraplus_lr_ratio 16.0"),
    (["--early_stopping_patience", "2", "--metric_for_best_model", "reward"], "--early_stopping_patience 2: DPO and GRPO runs do not stop early"),
    (["--init_lora_weights", "olora"], "--init_lora_weights olora: train_grpo would save"),
    (["--eval_strategy", "steps"], "--eval_strategy steps: train_grpo has no held-out set"),
]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the flags were checked")

    monkeypatch.setattr(dpo, "load_start_model", refuse)
    monkeypatch.setattr(grpo, "load_start_model", refuse)


@pytest.mark.parametrize("main, data, flags, expected",
                         [(train_dpo.main, "preference.json", *row) for row in DPO_ROWS]
                         + [(train_grpo.main, "grpo_toy.json", *row) for row in GRPO_ROWS],
                         ids=[f"dpo{row[0]}" for row in DPO_ROWS] + [f"grpo{row[0]}" for row in GRPO_ROWS])
def test_a_bad_or_unused_flag_is_one_line_before_the_model_loads(main, data, flags, expected, tmp_path, capsys, no_model):
    code = main(["--model_path", "tiny", "--data_path", str(DATA / data), "--output_dir", str(tmp_path / "out"),
                 "--max_steps", "1", *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_the_loss_names_are_trls_own():
    """The kit's lists of loss names equal those TRL's own configs document, so a TRL release that adds or drops one
    fails here with both lists shown."""
    from trl import DPOConfig, GRPOConfig

    def documented(config, field):
        text = config.__dataclass_fields__[field].metadata["help"]
        return set(re.findall(r"'([a-z_]+)'", text.split("If multiple")[0].split("'grpo': Aggregates")[0]))

    assert documented(DPOConfig, "loss_type") == set(objective_checks.DPO_LOSS_TYPES)
    assert documented(GRPOConfig, "loss_type") == set(objective_checks.GRPO_LOSS_TYPES)


def test_dpo_is_judged_by_its_own_held_out_metrics(tmp_path, capsys):
    """--metric_for_best_model takes what DPOTrainer logs (SFT's eval_chrf was accepted and crashed after the first
    evaluation; eval_rewards/margins was refused), and a run kept at its best margin finishes and reloads."""
    flags = ["--model_path", "tiny", "--data_path", str(DATA / "preference.json"), "--eval_data_path",
             str(DATA / "preference_test.json"), "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "2",
             "--per_device_train_batch_size", "4", "--learning_rate", "2e-3", "--report_to", "none",
             "--disable_tqdm", "True"]  # fmt: skip
    assert train_dpo.main([*flags, "--metric_for_best_model", "eval_chrf", "--output_dir", str(tmp_path / "a")]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "this run logs eval_loss, eval_rewards/margins, eval_rewards/accuracies" in line, line
    assert train_dpo.main([*flags, "--metric_for_best_model", "eval_rewards/margins", "--save_strategy", "best",
                           "--load_best_model_at_end", "True", "--output_dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file() and not list((tmp_path / "b").glob("checkpoint-*"))

"""DPO on LoRA (train_dpo): the kit's prompt and trained spans reach TRL, bad records stop before the model loads,
the held-out reward margin rises on a seeded tiny run, and an SFT start is its own reference.
Loading, merging and exporting the adapter: test_preference_export.py; the replicas: test_preference_replicas.py."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import DATA, REPO
from qwen_helpers.data.encoding import IGNORE_INDEX, format_prompt, tokenize_example
from qwen_helpers.models.loading import load_tokenizer
from qwen_helpers.data.preference import tokenize_pair, validate_preference
from qwen_helpers.data.records import DataValidationError

# A seeded run the tiny random model can learn in 4 steps: chosen answers are short and varied, rejected ones are
# a few fixed hedges ("I am not sure.", "很难说。"), so lowering the hedges raises the margin on unseen prompts too.
RUN_FLAGS = [
    "--model_path",
    "tiny",
    "--data_path",
    str(DATA / "preference.json"),
    "--eval_data_path",
    str(DATA / "preference_test.json"),
    "--learning_rate",
    "2e-3",
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
    "--max_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "4",
    "--eval_on_start",
    "True",
    "--save_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "True",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """One seeded DPO run through the command's own entry point; returns its output folder."""
    from qwen_helpers import train_dpo

    output_dir = tmp_path_factory.mktemp("dpo") / "adapter"
    assert train_dpo.main([*RUN_FLAGS, "--output_dir", str(output_dir)]) == 0
    return output_dir


@pytest.mark.parametrize("model_path", ["tiny", "tiny-qwen3", "tiny-qwen2.5-base"])
def test_dpo_sees_the_kit_prompt_and_the_sft_trained_span(model_path):
    tokenizer = load_tokenizer(model_path)
    record = {
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": "Hard to say.",
    }
    pair = validate_preference(record, 0, "inline")
    row = tokenize_pair(tokenizer, pair)
    assert tokenizer.decode(row["prompt_ids"]) == format_prompt(
        tokenizer, pair["chosen"]
    )  # byte-identical to SFT/inference
    for key in ("chosen", "rejected"):
        sft = tokenize_example(tokenizer, pair[key])
        trained = [token for token, label in zip(sft["input_ids"], sft["labels"]) if label != IGNORE_INDEX]
        assert row[f"{key}_ids"][-len(trained) :] == trained  # the answer and its <|im_end|>, as SFT trains it
        assert tokenizer.decode(row[f"{key}_ids"]).endswith("<|im_end|>")  # no <|endoftext|> appended (TRL's default)
    if model_path == "tiny-qwen3":  # non-thinking mode: the empty think block is part of the prompt, not of the answers
        assert tokenizer.decode(row["prompt_ids"]).endswith("<think>\n\n</think>\n\n")


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "Hi", "chosen": "Hello"}, "missing 'rejected'"),
        ({"prompt": "Hi", "chosen": "Hello", "rejected": "Hello"}, "the same answer"),
        ({"chosen": "a", "rejected": "b"}, "expected 'prompt'"),
        (
            {"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
            "'chosen' must be a string or a list",
        ),
        ({"prompt": "Hi", "messages": [], "chosen": "a", "rejected": "b"}, "both 'prompt' and 'messages'"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "turn order"),
    ],
)
def test_bad_preference_records_are_named(record, expected):
    with pytest.raises(DataValidationError, match=expected) as error:
        validate_preference(record, 3, "pairs.json")
    assert "record 3" in str(error.value)


def test_a_bad_record_stops_the_command_before_the_model_loads(tmp_path):
    records = json.loads((DATA / "preference.json").read_text(encoding="utf-8"))
    del records[5]["rejected"]
    bad = tmp_path / "pairs.json"
    bad.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_helpers.train_dpo",
            "--model_path",
            "tiny",
            "--data_path",
            str(bad),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "record 5" in errors[0] and "'rejected'" in errors[0]
    assert "Loading weights" not in result.stderr + result.stdout and not (tmp_path / "out").exists()


def test_held_out_reward_margin_rises(dpo_run):
    """Measured (seed 0): held-out margin 0.000 at step 0 -> +0.316 after 4 steps; accuracy 0 -> 1 (8 pairs)."""
    history = json.loads((dpo_run / "loss_history.json").read_text(encoding="utf-8"))
    evaluations = [record for record in history if "eval_rewards/margins" in record]
    assert [record["step"] for record in evaluations] == [0, 4]
    before, after = evaluations
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    assert after["eval_rewards/margins"] > 0.15 and after["eval_rewards/accuracies"] > 0.8
    first_train_log = next(record for record in history if "loss" in record)
    assert all(
        key in first_train_log
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
    )
    assert (dpo_run / "dpo_plot.png").is_file() and json.loads((dpo_run / "run_config.json").read_text())[
        "method"
    ] == "dpo"


def test_an_sft_adapter_start_is_its_own_reference(tmp_path):
    """From --adapter_path the first step's rewards are 0: TRL scores the reference with a frozen copy of that adapter,
    not with the base (against the base, the SFT adapter's changes would show up as nonzero rewards)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_helpers import train_dpo
    from qwen_helpers.common.tiny import resolve_model_path

    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny")),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in sft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a start far from the base, like an SFT adapter
    sft.save_pretrained(tmp_path / "sft")
    flags = [
        *RUN_FLAGS[: RUN_FLAGS.index("--eval_data_path")],
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "True",
        "--adapter_path",
        str(tmp_path / "sft"),
    ]
    assert train_dpo.main([*flags, "--output_dir", str(tmp_path / "dpo")]) == 0
    first = json.loads((tmp_path / "dpo" / "loss_history.json").read_text(encoding="utf-8"))[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(
        0.0, abs=1e-6
    )
    config = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]  # the SFT adapter, continued


def test_an_interrupted_run_resumes_and_ends_at_the_same_step(tmp_path):
    """Interrupted (as Ctrl-C would) once checkpoint-2 is saved, then --resume_from_checkpoint True: steps 3-4 run."""
    from test_train_lora import InterruptAtSave

    from qwen_helpers import train_dpo as command
    from qwen_helpers.common.files import staging_folders
    from qwen_helpers.training.dpo import train_dpo
    from qwen_helpers.train_dpo import parse_dpo_args

    output = tmp_path / "run"
    flags = ["--model_path", "tiny", "--data_path", str(DATA / "preference.json"), "--learning_rate", "2e-3",
             "--warmup_steps", "0", "--max_steps", "4", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
             "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0",
             "--output_dir", str(output)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        train_dpo(*parse_dpo_args(flags), callbacks=[InterruptAtSave(2)])
    (staging,) = staging_folders(output)
    assert not output.exists() and [path.name for path in staging.glob("checkpoint-*")] == ["checkpoint-2"]
    assert command.main([*flags, "--resume_from_checkpoint", "True"]) == 0
    history = json.loads((output / "loss_history.json").read_text(encoding="utf-8"))
    assert [record["step"] for record in history if "loss" in record] == [1, 2, 3, 4]  # continued, not restarted
    assert staging_folders(output) == [] and not list(output.glob("checkpoint-*"))  # finished: no checkpoint kept
    assert (output / "adapter_model.safetensors").is_file() and not (output / "ref").exists()


def test_inspect_data_shows_what_dpo_scores_in_a_pair(capsys):
    """A preference file in inspect_data: the prompt, then each answer as train_dpo tokenises it (it said "missing field
    'instruction'"); other commands name the file as preference pairs."""
    from qwen_helpers import inference, inspect_data

    assert inspect_data.main(["--data_path", str(DATA / "preference.json"), "--index", "1", "--json", "True"]) == 0
    view = json.loads(capsys.readouterr().out)
    pair = json.loads((DATA / "preference.json").read_text(encoding="utf-8"))[1]
    tokenizer = load_tokenizer("tiny")
    expected = tokenize_pair(tokenizer, validate_preference(pair, 1, "x"))
    assert view["chosen_ids"] == expected["chosen_ids"] and view["rejected_ids"] == expected["rejected_ids"]
    assert view["chosen"] == pair["chosen"] + "<|im_end|>" and view["rejected"] == pair["rejected"] + "<|im_end|>"
    assert view["prompt"].endswith("<|im_start|>assistant\n") and pair["prompt"] in view["prompt"]
    assert inspect_data.main(["--data_path", str(DATA / "preference.json"), "--index", "99"]) == 2
    assert "--index 99: " in (err := capsys.readouterr().err) and f"has {len(json.loads((DATA / 'preference.json').read_text(encoding='utf-8')))} pairs" in err
    assert inference.main(["--data_path", str(DATA / "preference.json"), "--max_records", "1"]) == 2
    assert "a preference pair (prompt, chosen, rejected), which only train_dpo trains" in capsys.readouterr().err

"""Reliability: nothing the user has is lost, nothing trains silently wrong, every bad input gets one clear line.

The table at the end runs bad inputs through the real commands' ``main`` (two rows also as ``python -m ...``) and checks
exit code 2, one ``error:`` line naming the flag or file, and no traceback. The kill test interrupts a real
``--overwrite_output_dir`` run with SIGTERM and resumes it.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qwen_helpers import inference, make_tiny_qwen
from qwen_helpers.models.adapter_folder import AdapterError, safetensors_shapes
from qwen_helpers.models.checks import check_adapter_against_base
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.common.errors import FlagError, KitError, strip_debug_flag
from qwen_helpers.common.files import atomic_write_text, new_staging_folder, staging_folders
from qwen_helpers.training.sft import train

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``: byte-identical means equal snapshots."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*")) if path.is_file()}


def command(module: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", f"qwen_helpers.{module}", *flags]


def quick_training_flags(data_path: str, output_dir: Path, max_steps: int) -> list[str]:
    return ["--data_path", data_path, "--output_dir", str(output_dir), "--max_steps", str(max_steps), "--per_device_train_batch_size", "1",
            "--max_length", "128", "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "True", "--report_to", "none"]


# ---------------------------------------------------------------------------------------------- atomic replacement


def test_sigterm_during_overwrite_leaves_the_old_folder_then_resume_continues(tmp_path, small_train_file):
    output = tmp_path / "run"
    output.mkdir()
    (output / "adapter_model.safetensors").write_bytes(b"the previous run's adapter")
    (output / "classification_metrics.json").write_text('{"accuracy": 0.9}')  # a file the new run does not write
    before = snapshot(output)

    run = subprocess.Popen(command("train_lora", *quick_training_flags(small_train_file, output, 200), "--overwrite_output_dir", "True"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and run.poll() is None:
            staged = [folder for folder in staging_folders(output) if any(folder.glob("checkpoint-*/trainer_state.json"))]
            if staged and any(int(path.parent.name.split("-")[1]) >= 2 for path in staged[0].glob("checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before it could be interrupted:\n" + run.stdout.read()[-3000:]
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert snapshot(output) == before  # the interrupted run changed nothing in the folder it was to replace
    (staging,) = staging_folders(output)
    # a SIGTERM during a save leaves that checkpoint without its trainer_state.json (written last): resume skips it
    checkpoints = sorted((path.parent for path in staging.glob("checkpoint-*/trainer_state.json")), key=lambda path: int(path.name.split("-")[1]))
    interrupted_at = int(checkpoints[-1].name.split("-")[1])
    assert not any(staging.rglob("tokenizer.json")) and not any(staging.rglob("training_args.bin"))  # checkpoints stay small and secret-free

    # A fresh run without a flag must not silently start over the interrupted one.
    refused = subprocess.run(command("train_lora", *quick_training_flags(small_train_file, tmp_path / "run", 2)), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume_from_checkpoint True" in refused.stderr and "Traceback" not in refused.stderr

    total = interrupted_at + 2
    resumed = subprocess.run(command("train_lora", *quick_training_flags(small_train_file, output, total), "--resume_from_checkpoint", "True"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resuming from {checkpoints[-1]}" in resumed.stdout
    assert staging_folders(output) == []  # swapped in, nothing left beside it
    files = {path.name for path in output.iterdir()}
    assert "classification_metrics.json" not in files  # no file of the old run survives the replacement
    assert {"adapter_model.safetensors", "tokenizer.json", "run_config.json", "loss_history.json", "loss_plot.png"} <= files
    assert not any(output.rglob("training_args.bin"))
    assert not any(path.name == "tokenizer.json" for path in output.rglob("checkpoint-*/*"))
    history = json.loads((output / "loss_history.json").read_text())
    assert [record["step"] for record in history if "loss" in record] == list(range(1, total + 1))  # every step, before and after the resume


def test_ctrl_c_prints_one_line_and_the_resumed_run_counts_only_its_own_steps(tmp_path, small_train_file):
    from qwen_helpers.training.run_folder import complete_checkpoints

    output = tmp_path / "run"
    run = subprocess.Popen(command("train_lora", *quick_training_flags(small_train_file, output, 200)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and run.poll() is None:
            if any(complete_checkpoints(folder) for folder in staging_folders(output)):
                break
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before it could be interrupted:\n" + run.stdout.read()[-3000:]
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(said) == 1 and f"--output_dir {output} is as it was" in said[0] and "--resume_from_checkpoint True" in said[0], stderr[-2000:]
    assert not output.exists()  # nothing published
    (staging,) = staging_folders(output)
    step = int(complete_checkpoints(staging)[0].name.split("-")[1])
    assert f"(step {step})" in said[0]

    resumed = subprocess.run(command("train_lora", *quick_training_flags(small_train_file, output, step + 2), "--resume_from_checkpoint", "True"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    # one example per step (batch 1); counting from step 0 after a resume used to print 1 / (step + 1)
    printed = [float(value) for value in re.findall(r"examples/step ([\d.]+)", resumed.stdout)]
    assert len(printed) == 2 and printed == [1.0, 1.0], resumed.stdout[-2000:]


def test_overwrite_in_process_replaces_every_old_file(tmp_path, small_train_file):
    output = tmp_path / "run"
    output.mkdir()
    (output / "classification_metrics.json").write_text("{}")
    args = KitTrainingArguments(output_dir=str(output), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                                disable_tqdm=True, report_to="none", overwrite_output_dir=True, hub_token="hf_secret_never_written")
    result = train(ModelArguments(), DataArguments(data_path=small_train_file, max_length=128), args, "lora", LoraArguments())
    assert result.output_dir == str(output) and staging_folders(output) == []
    assert not (output / "classification_metrics.json").exists()
    assert (output / "adapter_model.safetensors").is_file() and not (output / "training_args.bin").exists()
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["base_model"]["model_type"] == "qwen2"
    assert not [path for path in output.rglob("*") if path.is_file() and b"hf_secret_never_written" in path.read_bytes()]


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.json"
    target.write_text("old")

    class Unwritable(str):
        def encode(self, *args):
            raise OSError("No space left on device")

    with pytest.raises(OSError):
        atomic_write_text(target, Unwritable("new"))
    assert target.read_text() == "old" and [path.name for path in tmp_path.iterdir()] == ["file.json"]


# ---------------------------------------------------------------------------------------------- validation before loading


def test_zero_epochs_is_refused_before_the_model_loads(tmp_path):
    # KitTrainingArguments checks its own ranges: a notebook panel and Python code meet the command's check
    with pytest.raises(FlagError, match="--num_train_epochs 0"):
        KitTrainingArguments(output_dir=str(tmp_path / "run"), num_train_epochs=0)
    assert not (tmp_path / "run").exists() and staging_folders(tmp_path / "run") == []


def test_non_finite_numbers_built_in_python_are_refused_before_the_model_loads(tmp_path):
    with pytest.raises(FlagError, match="--temperature inf: not a finite number"):
        inference.InferenceArguments(instruction="hi", do_sample=True, temperature=float("inf"))
    with pytest.raises(FlagError, match="--learning_rate inf: not a finite number"):
        KitTrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=float("inf"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("labels, expected", [
    ("正面,负面", "also answers ['中性']"),
    ("正面,负面,中性,中立", "never answers ['中立']"),
    ("正面,正面,负面,中性", "正面 is listed more than once"),
    ("", "names no label"),
])
def test_bad_labels_are_refused_before_the_model_loads(tmp_path, monkeypatch, labels, expected):
    from qwen_helpers.models import loading as modeling
    from qwen_helpers.run.config import PromptTuningArguments

    monkeypatch.setattr(modeling, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded before --labels was checked"))
    args = KitTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none")
    with pytest.raises(FlagError, match=re.escape(expected)):
        train(ModelArguments(), DataArguments(data_path=str(DATA / "classify_train.json")), args, "prompt_tuning",
              prompt_args=PromptTuningArguments(labels=labels))
    assert not (tmp_path / "run").exists() and staging_folders(tmp_path / "run") == []


def fake_hub_cache(cache: Path, model_id: str, config: dict, files: tuple[str, ...] = ()) -> Path:
    """A Hugging Face cache entry as ``hf download`` leaves it: refs/main names a snapshot holding the files."""
    entry = cache / f"models--{model_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps(config))
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def test_hub_ids_are_checked_in_the_local_cache_without_the_network(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from qwen_helpers.models.checks import check_model_path, hub_download_errors
    from qwen_helpers.common.errors import ModelFolderError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelFolderError, match=f"--model_path {HUB_ID} is neither a local folder nor in the Hugging Face cache \\({tmp_path}"):
        check_model_path(HUB_ID)
    fake_hub_cache(tmp_path, "openai-community/gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, ("model.safetensors",))
    with pytest.raises(ModelFolderError, match="openai-community/gpt2 is a gpt2 model"):
        check_model_path("openai-community/gpt2")
    snapshot = fake_hub_cache(tmp_path, HUB_ID, {"model_type": "qwen2"}, ("model.safetensors",))
    with pytest.raises(ModelFolderError, match="has no tokenizer files"):  # offline, a partial download cannot be completed
        check_model_path(HUB_ID)
    (snapshot / "tokenizer.json").write_text("{}")
    assert check_model_path(HUB_ID) == {"model_type": "qwen2"}

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # downloads allowed: transformers fetches it; a failure is one line
    assert check_model_path("Qwen/Qwen3-0.6B") is None and "not in the Hugging Face cache" in capsys.readouterr().out
    with pytest.raises(ModelFolderError, match="could not be downloaded \\(We couldn't connect to 'https://huggingface.co'"):
        with hub_download_errors("Qwen/Qwen3-0.6B"):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files. Check your internet connection.")
    with pytest.raises(OSError, match="disk full"):  # a local folder's error is left as it is
        with hub_download_errors(str(tmp_path)):
            raise OSError("disk full")


@pytest.fixture(scope="module")
def qwen3_adapter(tmp_path_factory):
    """A LoRA adapter trained (1 step) on a tiny Qwen3 base whose folder is then deleted, as on another machine."""
    root = tmp_path_factory.mktemp("qwen3")
    base = root / "qwen3-base"
    assert make_tiny_qwen.main([str(base), "--arch", "qwen3"]) == 0
    records = json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:4]
    (root / "train.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    args = KitTrainingArguments(output_dir=str(root / "adapter"), max_steps=1, per_device_train_batch_size=2, save_strategy="no",
                                disable_tqdm=True, report_to="none")
    train(ModelArguments(model_path=str(base)), DataArguments(data_path=str(root / "train.json"), max_length=128), args, "lora", LoraArguments())
    shutil.rmtree(base)
    return root / "adapter"


def test_wrong_architecture_adapter_is_refused_when_its_base_is_gone(qwen3_adapter, tiny_path, capsys):
    with pytest.raises(AdapterError, match="model_type is qwen3 in the base it was trained on, qwen2"):
        check_adapter_against_base(str(qwen3_adapter), tiny_path)
    assert inference.main(["--adapter_path", str(qwen3_adapter), "--model_path", "tiny", "--instruction", "hi"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: --adapter_path") and "qwen3" in line and "\n" not in line
    assert inference.main(["--adapter_path", str(qwen3_adapter), "--instruction", "hi"]) == 2  # no --model_path: the recorded base is gone
    assert "which is not on this machine; pass --model_path" in capsys.readouterr().err


def test_adapter_shapes_are_checked_against_the_base_config_without_a_record(qwen3_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, adapter)
    run_config = json.loads((adapter / "run_config.json").read_text())
    del run_config["base_model"]  # as an adapter saved by plain peft: only its tensors tell its shape
    (adapter / "run_config.json").write_text(json.dumps(run_config))
    narrow = tmp_path / "narrow-base"
    narrow.mkdir()
    (narrow / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
                                                    "num_key_value_heads": 2, "num_hidden_layers": 4, "intermediate_size": 256}))
    with pytest.raises(AdapterError, match="[qkv]_proj takes 128 inputs in the adapter, 64 in the base"):
        check_adapter_against_base(str(adapter), str(narrow))
    shallow = json.loads((narrow / "config.json").read_text()) | {"hidden_size": 128, "num_hidden_layers": 2}
    (narrow / "config.json").write_text(json.dumps(shallow))
    with pytest.raises(AdapterError, match="weights for layer 2, the base has 2 layers"):
        check_adapter_against_base(str(adapter), str(narrow))


def test_truncated_adapter_names_the_file(qwen3_adapter, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen3_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    assert safetensors_shapes(weights)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AdapterError, match=f"{weights} is damaged or truncated"):
        safetensors_shapes(weights)


# ---------------------------------------------------------------------------------------------- nothing overwritten


def test_predictions_file_is_never_replaced_unasked(tmp_path, tiny_path, capsys):
    data = tmp_path / "test.json"
    data.write_text(json.dumps(json.loads((DATA / "test.json").read_text(encoding="utf-8"))[:3], ensure_ascii=False), encoding="utf-8")
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"prediction": "an earlier run"}\n')
    before = snapshot(tmp_path)
    base = ["--model_path", "tiny", "--data_path", str(data), "--max_new_tokens", "2"]
    cases = {
        "--overwrite_output_file True": base + ["--output_file", str(predictions)],
        f"is the file {data} (--data_path)": base + ["--output_file", str(data), "--overwrite_output_file", "True"],
        "--max_records must be at least 1": base + ["--output_file", str(predictions), "--max_records", "0", "--overwrite_output_file", "True"],
    }
    for expected, argv in cases.items():
        assert inference.main(argv) == 2, expected
        assert expected in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert inference.main(base + ["--output_file", str(predictions), "--overwrite_output_file", "True", "--max_records", "2"]) == 0
    assert len(predictions.read_text(encoding="utf-8").splitlines()) == 2 and data.read_bytes() == (tmp_path / "test.json").read_bytes()


def test_make_tiny_qwen_refuses_a_folder_that_holds_a_model(tmp_path, capsys):
    folder = tmp_path / "real-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 4096}')
    (folder / "model.safetensors").write_bytes(b"seven billion parameters")
    before = snapshot(folder)
    assert make_tiny_qwen.main([str(folder)]) == 2
    assert "--overwrite_output_dir True" in capsys.readouterr().err
    assert snapshot(folder) == before
    # the old flag name is one line naming the new one (every command's overwrite flag is --overwrite_output_dir)
    assert make_tiny_qwen.main([str(folder), "--overwrite", "True"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --overwrite is now --overwrite_output_dir (the one overwrite flag of every command): "
        "pass --overwrite_output_dir True."
    )
    assert snapshot(folder) == before
    assert make_tiny_qwen.main([str(folder), "--overwrite_output_dir", "True"]) == 0
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 128
    assert [path.name for path in tmp_path.iterdir()] == ["real-model"]  # no staging folder left behind


# ---------------------------------------------------------------------------------------------- the command boundary


def test_negative_numbers_reach_the_flag_they_follow():
    from qwen_helpers.common.errors import attach_negative_values

    assert attach_negative_values(["--learning_rate", "-1e-3", "--x", "-1", "--y", "-z", "--w=-2"]) == [
        "--learning_rate=-1e-3", "--x=-1", "--y", "-z", "--w=-2"]


def test_debug_flag_is_taken_out_and_a_trainer_debug_option_is_left():
    assert strip_debug_flag(["--x", "1", "--debug"]) == (["--x", "1"], True)
    assert strip_debug_flag(["--debug", "False", "--x", "1"]) == (["--x", "1"], False)
    assert strip_debug_flag(["--debug", "underflow_overflow"]) == (["--debug", "underflow_overflow"], False)


def test_debug_shows_the_traceback_and_unexpected_errors_keep_theirs(tmp_path, capsys):
    from qwen_helpers.common.errors import command_boundary

    @command_boundary
    def main(argv):
        if argv == ["bug"]:
            raise ZeroDivisionError("a bug")
        raise KitError("--flag x: what to do")

    assert main([]) == 2 and capsys.readouterr().err == "error: --flag x: what to do\n"
    assert main(["--debug"]) == 2 and "Traceback" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        main(["bug"])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, qwen3_adapter):
    """Folders and files for the table: a GPT-2 folder, an empty one, bad data, a truncated adapter, a used folder..."""
    root = tmp_path_factory.mktemp("bad")
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    (root / "empty").mkdir()
    (root / "broken.json").write_text('[{"instruction": "hi", "output": "there"},', encoding="utf-8")
    (root / "four_sys.json").write_text('[{"instruction": "hi", "output": "there", "system": ""}]', encoding="utf-8")
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}
    (root / "mixed.jsonl").write_text(f'{{"instruction": "hi", "output": "there"}}\n{json.dumps(chat)}\n')
    (root / "think_mid.json").write_text(json.dumps([{"instruction": "hi", "output": "A <think>m</think> b"}]))
    truncated = root / "truncated"
    shutil.copytree(qwen3_adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    used = root / "used"
    used.mkdir()
    (used / "adapter_model.safetensors").write_bytes(b"x")
    (root / "preds.jsonl").write_text("{}\n")
    hub_based = root / "hub_based"  # an adapter whose recorded base is a hub id this machine has not cached
    shutil.copytree(qwen3_adapter, hub_based)
    run_config = json.loads((hub_based / "run_config.json").read_text()) | {"model_path": HUB_ID}
    (hub_based / "run_config.json").write_text(json.dumps(run_config))
    eval_records = json.loads((DATA / "classify_test.json").read_text(encoding="utf-8"))[:3]
    eval_records[1]["output"] = "maybe"
    (root / "eval_bad.json").write_text(json.dumps(eval_records, ensure_ascii=False), encoding="utf-8")
    checkpoint = new_staging_folder(root / "resumable") / "checkpoint-1"  # an interrupted LoRA run of rank 8
    checkpoint.mkdir()
    shutil.copy(qwen3_adapter / "adapter_model.safetensors", checkpoint)
    recorded = {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj"]}
    (checkpoint / "adapter_config.json").write_text(json.dumps(recorded))
    (checkpoint / "trainer_state.json").write_text("{}")
    (root / "hf_home" / "hub").mkdir(parents=True)  # offline with an empty cache, as without the hub
    return root


TRAIN = "data/train.json"
CLASSIFY = ["--data_path", "data/classify_train.json"]  # answers 中性, 正面, 负面
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
BAD_INPUTS = [  # (command, flags, text the one line must contain); {root} is the fixture folder
    ("train_lora", ["--learning_rate", "-1"], "--learning_rate"),
    ("train_lora", ["--learning_rate", "-1e-3"], "--learning_rate must be above 0, got -0.001"),  # argparse took -1e-3 for a flag
    ("train_lora", ["--learning_rate", "inf"], "--learning_rate inf: not a finite number"),
    ("train_lora", ["--max_grad_norm", "nan"], "--max_grad_norm nan: not a finite number"),
    ("train_lora", ["--loraplus_lr_ratio", "inf"], "(e.g. --loraplus_lr_ratio 16)"),  # an example the next check accepts
    ("train_lora", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    ("train_lora", ["--lora_alpha", "-32"], "--lora_alpha"),
    ("train_lora", ["--num_train_epochs", "0"], "--num_train_epochs"),
    ("train_lora", ["--learning_rate", "fast"], "--learning_rate"),
    ("train_lora", ["--target_modules", ","], "--target_modules ',' names no module"),
    ("train_lora", ["--model_path", "{root}/no_such_model"], "no such folder"),
    ("train_lora", ["--model_path", "{root}/empty"], "is an empty folder"),
    ("train_lora", ["--model_path", "{root}/gpt2"], "is a gpt2 model (GPT2LMHeadModel)"),
    ("train_lora", ["--data_path", "{root}/missing.json"], "--data_path {root}/missing.json: no such data file"),
    ("train_lora", ["--data_path", "{root}"], "--data_path {root} is a folder; pass a data file in it"),
    ("train_lora", ["--eval_data_path", "{root}/missing.json"], "--eval_data_path {root}/missing.json: no such data"),
    ("train_lora", ["--data_path", "{root}/broken.json"], "broken.json"),
    ("train_lora", ["--data_path", "{root}/mixed.jsonl"], "mixed.jsonl, record 1: a record in messages format"),
    ("train_lora", ["--data_path", "{root}/think_mid.json", "--model_path", "tiny-qwen3"], "the answer holds"),
    ("train_lora", ["--output_dir", "{root}/used"], "--overwrite_output_dir True"),
    ("train_lora", ["--output_dir", "{root}/fresh", "--resume_from_checkpoint", "True"], "--resume_from_checkpoint True: no complete checkpoint"),
    ("train_lora", ["--output_dir", "{root}/resumable", "--resume_from_checkpoint", "True", "--lora_r", "16"],
     "--lora_r 16: the interrupted run in {root}/.resumable"),
    ("train_lora", ["--max_length", "8"], "--max_length"),
    ("train_qlora", ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    ("train_prompt_tuning", ["--num_virtual_tokens", "0"], "--num_virtual_tokens"),
    ("train_prompt_tuning", ["--num_virtual_tokens", "100000"], "--num_virtual_tokens must be 1 to 4096"),
    ("train_prompt_tuning", ["--num_virtual_tokens", "2000", "--max_length", "512"], "more than the base's 2048"),
    ("inference", ["--instruction", ""], "--instruction is empty"),
    ("inference", ["--instruction", "hi", "--top_k", "-3"], "--top_k must be 0 (off) or more, got -3"),
    ("inference", ["--instruction", "hi", "--top_p", "5"], "--top_p must be above 0 and at most 1"),
    ("inference", ["--instruction", "hi", "--repetition_penalty", "-1"], "--repetition_penalty must be above 0"),
    ("inference", ["--instruction", "hi", "--do_sample", "True", "--temperature", "inf"], "--temperature inf: not"),
    ("inference", ["--data_path", "data/test.json", "--output_file", "data/test.json"],
     "--output_file data/test.json is the file data/test.json (--data_path)"),
    ("inference", ["--data_path", "data/test.json", "--output_file", "{root}/preds.jsonl"], "--overwrite_output_file True"),
    ("inference", ["--data_path", "data/test.json", "--max_records", "0"], "--max_records"),
    ("inference", ["--adapter_path", "{root}/no_adapter", "--instruction", "hi"], "--adapter_path {root}/no_adapter: no such folder"),
    ("inference", ["--adapter_path", "{root}/used/adapter_model.safetensors", "--instruction", "hi"], "is a file;"),
    ("make_tiny_qwen", ["{root}/used"], "--overwrite_output_dir True"),
    ("make_tiny_qwen", ["{root}/used", "--overwrite", "True"], "--overwrite is now --overwrite_output_dir"),
    ("inference", ["--merge", "True", "--adapter_path", "{root}/no_adapter", "--output_dir", "{root}/merged"],
     "use python -m qwen_helpers.export --format hf --adapter_path {root}/no_adapter --output_dir {root}/merged"),
    ("train_lora", ["--model_path", HUB_ID], f"--model_path {HUB_ID} is neither a local folder nor in the Hugging Face cache ({{root}}/hf_home/hub"),
    ("train_prompt_tuning", ["--model_path", HUB_ID], f"`hf download {HUB_ID}`"),
    ("inference", ["--model_path", HUB_ID, "--instruction", "hi"], f"--model_path {HUB_ID} is neither a local folder"),
    ("inference", ["--adapter_path", "{root}/hub_based", "--instruction", "hi"], f"the base recorded by {{root}}/hub_based {HUB_ID} is neither"),
    ("train_prompt_tuning", ["--labels", "正面,负面", *CLASSIFY], "data/classify_train.json also answers ['中性']"),
    ("train_prompt_tuning", ["--labels", "正面,负面,中性,中立", *CLASSIFY], "never answers ['中立']"),
    ("train_prompt_tuning", ["--labels", "正面,负面,正面,中性", *CLASSIFY], "--labels 正面,负面,正面,中性: 正面 is listed more than once"),
    ("train_prompt_tuning", ["--labels", "", *CLASSIFY], "--labels '' names no label"),
    ("train_prompt_tuning", ["--labels", "a,b"], "--labels a,b: data/train.json is generation data"),
    ("train_prompt_tuning", ["--eval_data_path", "{root}/eval_bad.json", *CLASSIFY], "eval_bad.json, record 1: the answer 'maybe' is not in the label set"),
    ("benchmark", ["--no_such_flag", "1"], "--no_such_flag"),
    ("benchmark", ["--methods", "foo"], "--methods: unknown foo"),
    ("benchmark", ["--data", "{root}/missing.json"], "--data {root}/missing.json: no such file"),
    ("benchmark", ["--preset", "70b"], "--preset 70b is not known"),
    ("inspect_data", ["--model_path", "{root}/four_sys.json"], "--model_path {root}/four_sys.json is a file"),
    ("inspect_data", ["--model_path", "{root}/no_such_model"], "--model_path {root}/no_such_model: no such folder"),
    ("inspect_data", ["--model_path", "{root}/gpt2"], "is a gpt2 model (GPT2LMHeadModel)"),
    ("inspect_data", ["--model_path", "tiny-qwen3", "--data_path", "{root}/think_mid.json"], "the answer holds"),
    ("train_grpo", ["--data_path", "data/pretrain.txt"], "data/pretrain.txt is raw text"),  # was "malformed JSON"
    ("train_dpo", ["--data_path", "data/pretrain.txt"], "this command needs preference records"),
]
# The end-to-end path (python -m, the quick answer to a typo before torch, the process's exit code) on a few representative rows,
# run from an empty folder, where a refused run must not leave an ./outputs folder behind.
SUBPROCESS_BAD_INPUTS = [
    ("train_lora", ["--lerning_rate", "1e-4"], "did you mean --learning_rate"),
    ("train_lora", ["--data_path", "missing.json"], "--data_path missing.json: no such data file"),
    ("inference", ["--adapter_path", "{root}/truncated", "--model_path", "tiny", "--instruction", "hi"],
     "{root}/truncated/adapter_model.safetensors is damaged"),
]


def _complete_flags(bad_inputs: Path, index: int, module: str, flags: list[str]) -> tuple[list[str], Path | None]:
    """The row's flags with {root} filled in, plus --data_path and a fresh --output_dir for training commands."""
    flags = [flag.format(root=bad_inputs) for flag in flags]
    output = None
    if module.startswith("train") and "--data_path" not in flags:
        flags += ["--data_path", TRAIN]
    if module.startswith("train") and "--output_dir" not in flags:
        output = bad_inputs / f"out-{index}-{module}"
        flags += ["--output_dir", str(output)]
    return flags, output


def _problem(module: str, flags: list[str], code, stderr: str, stdout: str, expected: str, output: Path | None):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code != 2 or "Traceback" in stderr or len(errors) != 1 or expected not in errors[0]:
        return f"{module} {' '.join(flags)} -> exit {code}: {stderr[-600:]}"
    if output is not None and (output.exists() or staging_folders(output) or "trainable params" in stdout):
        return f"{module} {' '.join(flags)}: refused only after the run started ({output} or its staging folder made)"
    return None


def _main_of(module: str):
    import importlib

    return importlib.import_module(f"qwen_helpers.{module}" + (".__main__" if module == "benchmark" else "")).main


def test_bad_inputs_get_one_line_and_exit_code_2(bad_inputs, monkeypatch, capsys):
    """Every bad input: exit code 2, no traceback, one ``error:`` line naming the flag or file (each row runs ``main``).

    Run offline (HF_HUB_OFFLINE) with an empty Hugging Face cache; a refused training command leaves no output or
    staging folder. In process: a fresh interpreter per row cost about 10 s of imports each.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(bad_inputs / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(REPO)
    failures = []
    for index, (module, flags, expected) in enumerate(BAD_INPUTS):
        flags, output = _complete_flags(bad_inputs, index, module, flags)
        capsys.readouterr()
        try:
            code = _main_of(module)(flags)
        except SystemExit as exit:
            code = exit.code
        except Exception as error:  # a bug: the row's traceback is what the failure must show
            failures.append(f"{module} {' '.join(flags)} raised {error!r}")
            continue
        captured = capsys.readouterr()
        problem = _problem(module, flags, code, captured.err, captured.out, expected.format(root=bad_inputs), output)
        failures += [problem] if problem else []
    assert not failures, "\n\n".join(failures)


def test_bad_inputs_end_to_end_in_a_fresh_interpreter(bad_inputs, tmp_path):
    """A few rows through ``python -m``: the quick answer or the one parse, the exit code, nothing made in the working folder."""
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_CACHE"} | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(bad_inputs / "hf_home")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

    def run(module_flags_expected):
        module, flags, expected = module_flags_expected
        flags = [flag.format(root=bad_inputs) for flag in flags]
        finished = subprocess.run(command(module, *flags), capture_output=True, text=True, timeout=600, env=env,
                                  cwd=tmp_path)
        expected = expected.format(root=bad_inputs)
        return _problem(module, flags, finished.returncode, finished.stderr, finished.stdout, expected, None)

    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_BAD_INPUTS)) as pool:
        failures = [problem for problem in pool.map(run, SUBPROCESS_BAD_INPUTS) if problem]
    assert not failures, "\n\n".join(failures)
    assert list(tmp_path.iterdir()) == []  # no ./outputs (or anything else) left by a refused run


def test_inspect_data_json_keeps_stdout_for_the_json_object(monkeypatch, capsys):
    from qwen_helpers import inspect_data
    from qwen_helpers.models import loading as modeling

    real = modeling.load_tokenizer

    def noisy(*args, **kwargs):  # as a hub download or a replica build announces itself
        print("note: building the checkpoint")
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_tokenizer", noisy)
    monkeypatch.chdir(REPO)
    assert inspect_data.main(["--data_path", TRAIN, "--json", "True"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["trained_tokens"] > 0 and "note: building the checkpoint" in captured.err


# ---------------------------------------------------------------------------------------------- bounded, announced evaluation


def test_in_sample_evaluation_is_a_capped_seeded_sample_and_says_so(tmp_path, tiny_path, tokenizer, capsys):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from qwen_helpers.evaluation.classification import evaluate_run, in_sample

    records = json.loads((DATA / "classify_train.json").read_text(encoding="utf-8"))[:30]
    data_file = tmp_path / "labels.json"
    data_file.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(tiny_path).eval(), tokenizer=tokenizer,
                             trainer=SimpleNamespace(args=SimpleNamespace(per_device_eval_batch_size=8, seed=7)), output_dir=str(tmp_path))
    line = evaluate_run(result, DataArguments(data_path=str(data_file), max_eval_records=6), prompt_args=None)
    printed = capsys.readouterr()
    assert "task: classification (auto-detected" in printed.out and "LoRA runs always auto-detect" in printed.out
    assert "evaluating 6 records" in printed.out and "label scoring" in printed.err  # announced, with a progress bar
    written = json.loads((tmp_path / "classification_metrics.json").read_text(encoding="utf-8"))
    assert written["examples"] == 6 and "6 of 30 records" in line
    assert in_sample(records, 6, 7) == in_sample(records, 6, 7) != in_sample(records, 6, 8)  # seeded: the same sample each run
    assert evaluate_run(result, DataArguments(data_path=str(data_file), max_eval_records=0), prompt_args=None).endswith("skipped (--max_eval_records 0)")

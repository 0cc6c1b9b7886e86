"""The one precision policy, the one method registry, the one run-config writer, and the tiny checkpoint hashed once."""

import json

import pytest
import torch

from qwen_helpers.run import precision

from qwen_helpers.common import tiny
from qwen_helpers.run.config import KitTrainingArguments, LoraArguments, ModelArguments, write_run_config
from qwen_helpers.run.methods import METHODS, benchmark_runs, get_method
from qwen_helpers.run.precision import decide_precision, quantization_compute_dtype


@pytest.mark.parametrize(
    ("fp16", "bf16", "device", "bf16_supported", "effective", "reason"),
    [
        (True, False, "cuda", True, "fp16", ""),
        (False, True, "cuda", True, "bf16", ""),
        (False, False, "cuda", True, "fp32", ""),
        (True, False, "cpu", False, "fp32", "CPU fallback from fp16"),
        (False, True, "cpu", False, "fp32", "CPU fallback from bf16"),
    ],
)
def test_decision_keeps_the_request_and_says_why_it_differs(fp16, bf16, device, bf16_supported, effective, reason):
    decided = decide_precision(fp16, bf16, device=device, bf16_supported=bf16_supported)
    assert decided.requested == ("fp16" if fp16 else "bf16" if bf16 else "fp32")
    assert (decided.effective, decided.reason) == (effective, reason)
    assert decided.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[effective]
    assert (decided.fp16, decided.bf16) == (effective == "fp16", effective == "bf16")


def test_bf16_without_support_raises_for_training_and_falls_back_elsewhere():
    with pytest.raises(ValueError, match="--bf16 True.*--fp16 True"):
        decide_precision(bf16=True, device="cuda", bf16_supported=False)
    fallback = decide_precision(bf16=True, device="cuda", bf16_supported=False, missing_bf16="fp16")
    assert fallback.effective == "fp16" and fallback.label == "fp16 (no bf16 on this GPU)"
    with pytest.raises(ValueError, match="only one of"):
        decide_precision(fp16=True, bf16=True)


def test_training_arguments_default_to_fp16_and_keep_the_request_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "device_type", lambda: "cpu")
    args = KitTrainingArguments(output_dir=str(tmp_path))
    assert args.precision.requested == "fp16" and args.precision.effective == "fp32"
    assert not args.fp16 and not args.bf16  # the Trainer refuses mixed precision on a CPU
    assert "--fp16 True asked" in args.precision_notice
    bf16 = KitTrainingArguments(output_dir=str(tmp_path), bf16=True)  # replaces the default fp16 request
    assert bf16.precision.requested == "bf16"


def test_4bit_compute_dtype_auto_follows_the_policy():
    assert quantization_compute_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert quantization_compute_dtype("float16", torch.float32) == torch.float16


def test_run_config_records_the_request_beside_the_effective_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "device_type", lambda: "cpu")
    training_args = KitTrainingArguments(output_dir=str(tmp_path))
    path = write_run_config(tmp_path, ModelArguments(), LoraArguments(), training_args, method="lora", history=[{"loss": 1.0}])
    run = json.loads(path.read_text(encoding="utf-8"))
    assert run["method"] == "lora" and run["model_path"] == "tiny" and run["lora_r"] == 8
    assert (run["requested_precision"], run["effective_precision"], run["fp16"]) == ("fp16", "fp32", False)
    assert json.loads((tmp_path / "loss_history.json").read_text()) == [{"loss": 1.0}]
    # a CPU-trained run asked for fp16, so a GPU loads it in fp16
    assert precision.inference_precision(run, device="cuda").effective == "fp16"


def test_method_registry_is_the_benchmarks_only_source_of_rows():
    from qwen_helpers.benchmark import RUNS
    from qwen_helpers.benchmark import estimate

    assert RUNS == benchmark_runs() and not hasattr(estimate, "Method")  # derived from methods.py, no second registry
    registered = [run.name for method in METHODS.values() for run in method.benchmark_runs]
    assert list(RUNS) == registered and len(set(registered)) == len(registered)  # one name, one row
    for name, run in RUNS.items():
        assert run.method is METHODS[run.method.name] and name in [row.name for row in run.method.benchmark_runs]
    variants = [run for run in RUNS.values() if run.is_variant]  # LoRA + one peft option, each a LoraArguments field
    assert variants and all(run.method.name == "lora" and run.precision == "bf16" for run in variants)
    assert all(set(dict(run.lora_options)) <= {f.lstrip("-") for f in run.method.flag_names()} for run in variants)
    assert {run.name: run.objective for run in RUNS.values() if run.objective != "sft"} == {"dpo_lora": "dpo",
                                                                                           "grpo_lora": "grpo"}
    assert RUNS["qlora_nf4"].load_in_4bit and RUNS["full"].fp32_master_weights and not RUNS["lora_bf16"].fp32_master_weights
    assert get_method("prompt_tuning").prepends_virtual_tokens and not get_method("lora").prepends_virtual_tokens
    assert "--lora_r" in get_method("qlora").flag_names() and get_method("full").flag_names() == ()
    lora_args, prompt_args = LoraArguments(), object()
    assert get_method("qlora").method_arguments(lora_args, prompt_args) is lora_args
    assert get_method("prompt_tuning").method_arguments(lora_args, prompt_args) is prompt_args
    assert get_method("full").method_arguments(lora_args, prompt_args) is None
    assert get_method("qlora").arguments is LoraArguments and get_method("full").peft_config(None, "tiny") is None
    with pytest.raises(ValueError, match="Unknown method 'dora'.*lora"):
        get_method("dora")
    assert set(METHODS) == {"lora", "prompt_tuning", "qlora", "full"}


def test_qlora_command_defaults_come_from_the_registry():
    from qwen_helpers.cli import parse_training_args

    model_args, _, method_args, training_args = parse_training_args("qlora", ["--output_dir", "x"])
    assert model_args.load_in_4bit and training_args.activation_checkpointing and isinstance(method_args, LoraArguments)
    assert parse_training_args("full", ["--output_dir", "x"])[2] is None


def test_tiny_checkpoint_is_hashed_once_per_process(monkeypatch):
    folder = tiny.tiny_model_path()
    calls = []
    original = tiny.is_complete_build
    monkeypatch.setattr(tiny, "is_complete_build", lambda path: calls.append(path) or original(path))
    tiny._verified_build.cache_clear()
    for _ in range(5):
        assert tiny.resolve_model_path("tiny") == str(folder)
    assert len(calls) == 1
    (folder / "tiny_qwen_build.json").touch()  # a changed file is checked again
    tiny.resolve_model_path("tiny")
    assert len(calls) == 2

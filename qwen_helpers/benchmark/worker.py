"""One benchmark row in its own process: the kit's real training path (``train.train``), timed by a callback.

The parent writes a spec (JSON) and starts ``python -m qwen_helpers.benchmark --_worker SPEC``; the
worker runs the kit (``side: kit``, here), the plain transformers + peft reference (``side: plain``,
plain.py) or TRL's SFTTrainer (``side: trl``, trl_reference.py) and writes its row back, an out-of-memory
error or a crash included, so one failure costs one row, not the table. Every side shares ``StepTimer``,
so they are timed alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import finish, rss_bytes, step_timer, training_arguments

WORKER_FLAG = "--_worker"


def run_in_subprocess(spec: dict, timeout: int) -> dict:
    """Run one row in a fresh Python process; turn a crash or a timeout into a row instead of an exception."""
    with tempfile.TemporaryDirectory(prefix="qwen-benchmark-") as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path), "work_dir": folder}), encoding="utf-8")
        command = [sys.executable, "-m", "qwen_helpers.benchmark", WORKER_FLAG, str(spec_path)]
        started = time.perf_counter()
        try:
            process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=os.getcwd(), env=worker_env())
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"stopped after {timeout} s (raise --timeout, or lower --steps)"}
        if result_path.is_file():
            row = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            tail = (process.stderr or process.stdout or "")[-1500:]
            row = {"status": "crashed", "error": f"the process exited with code {process.returncode} without a result: {tail}"}
        row["process_seconds"] = time.perf_counter() - started
        return row


def worker_env() -> dict:
    """The parent's environment, with the package importable from a source checkout."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for any error whose message says 'out of memory'."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def worker_main(spec_path: str) -> int:
    """Entry point of a row's process: run it, and write its row (OOM and errors included) as JSON."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        row = run_row(spec)
    except Exception as error:  # one row's failure becomes its row; the parent carries on with the rest
        status = "OOM" if is_out_of_memory(error) else "error"
        row = {"status": status, "error": f"{type(error).__name__}: {error}"[:1000]}
    Path(spec["result_path"]).write_text(json.dumps(row, default=str), encoding="utf-8")
    return 0


def run_row(spec: dict) -> dict:
    """The kit's, the plain reference's or TRL's SFT run, as the spec says (DPO and GRPO rows: TRL's trainers, trl_rows.py)."""
    if spec["method_spec"]["objective"] != "sft":
        from .trl_rows import run_trl

        return run_trl(spec)
    if spec["side"] == "plain":
        from .plain import run_plain

        return run_plain(spec)
    if spec["side"] == "trl":
        from .trl_reference import run_trl_sft

        return run_trl_sft(spec)
    return run_kit(spec)


def run_kit(spec: dict) -> dict:
    """The kit's training path as a user runs it (``train.train``: its collator, batching, Trainer and callbacks)."""
    from ..run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments
    from ..training.plan import plan_from_arguments
    from ..training.sft import train

    args, method = spec["args"], spec["method_spec"]
    rss_start = rss_bytes()
    timer = step_timer(args["warmup_steps"], count_trained_tokens=True)
    training_args = KitTrainingArguments(**training_arguments(
        spec, padding_free=spec["padding_free"], token_budget=spec.get("token_budget"),
        cpu_allocator_tuning=spec["cpu_allocator_tuning"]))
    model_args = ModelArguments(model_path=spec["model_path"], load_in_4bit=method["load_in_4bit"])
    data_args = DataArguments(data_path=spec["data_path"], max_length=args["seq_len"], overflow="truncate_prompt")
    lora_args = LoraArguments(lora_r=args["lora_r"], target_modules=args["target_modules"],
                              **dict(method["lora_options"]))  # a LoRA variant's options
    # RANDOM init: memory and speed do not depend on where the soft prompt starts
    prompt_args = PromptTuningArguments(num_virtual_tokens=args["num_virtual_tokens"], prompt_tuning_init="RANDOM")
    plan = plan_from_arguments(model_args, data_args, training_args, method["adapter"], lora_args, prompt_args, save=False)
    if method["fp32_master_weights"]:
        # Full fine-tuning keeps fp32 weights under bf16 autocast, as plain Trainer users do; the kit's path
        # otherwise loads the base in the autocast dtype.
        import torch

        plan = dataclasses.replace(plan, dtype=torch.float32)
    result = train(plan, callbacks=[timer])
    examples = [record["examples_per_step"] for record in result.history if "examples_per_step" in record]
    row = {"examples_per_step": sum(examples) / len(examples) if examples else None, "notes": result.notes}
    return finish(row, timer, result.train_losses, result.parameters, rss_start)

"""One benchmark row in its own process: the kit's real training path (``train.train``), timed by a callback.

The parent writes a spec (JSON) and starts ``python -m qwen_helpers.benchmark --_worker SPEC``; the
worker runs either the kit (``side: kit``, here) or the plain transformers + peft reference
(``side: plain``, plain.py) and writes its row back, an out-of-memory error or a crash included, so
one failure costs one row, not the table. Both sides share ``StepTimer``, so they are timed alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    """The kit's or the plain reference's run, as the spec says (DPO and GRPO rows: TRL's trainers, trl_rows.py)."""
    if spec["method_spec"]["objective"] != "sft":
        from .trl_rows import run_trl

        return run_trl(spec)
    if spec["side"] == "plain":
        from .plain import run_plain

        return run_plain(spec)
    return run_kit(spec)


# ---------------------------------------------------------------- memory and time


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_cpu_peak() -> bool:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs), so loading is not counted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory since the last reset (VmHWM), or since it started."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def step_timer(warmup_steps: int):
    """A ``TrainerCallback`` timing whole Trainer steps after the warm-up, with real tokens and the training peak."""
    import torch
    from transformers import TrainerCallback

    from ..modeling import synchronize

    class StepTimer(TrainerCallback):
        """Synchronise the device at each step's end; time from the end of the last warm-up step to the end of the run.

        A Trainer step here is everything a user waits for: fetching and collating the batch, the
        host-to-device copy, forward, backward, clipping, the optimiser, the scheduler and logging.
        Real tokens come from ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen="non_padding"``).
        """

        def __init__(self):
            self.marks: list[tuple[int, float, int, float]] = []  # (step, wall time, tokens seen, process CPU time)
            self.cuda = torch.cuda.is_available()
            self.rss_at_train_begin = 0

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()  # the peak of training, not of loading
            else:
                reset_cpu_peak()
                self.rss_at_train_begin = rss_bytes()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            if state.global_step >= warmup_steps:
                self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen, time.process_time()))

        def figures(self) -> dict:
            (first_step, first_time, first_tokens, first_cpu), (last_step, last_time, last_tokens, last_cpu) = self.marks[0], self.marks[-1]
            steps, seconds, tokens = last_step - first_step, last_time - first_time, last_tokens - first_tokens
            if steps < 1:
                raise RuntimeError("no timed step: --steps must be at least 1 after --warmup_steps")
            # CPU time of this process: on a shared machine it moves less with other processes' load than wall time
            row = {"timed_steps": steps, "step_seconds": seconds / steps, "tokens_per_second": tokens / seconds,
                   "real_tokens_per_step": tokens / steps, "tokens_per_cpu_second": tokens / max(last_cpu - first_cpu, 1e-9)}
            if self.cuda:
                row.update(peak_bytes=torch.cuda.max_memory_allocated(), reserved_bytes=torch.cuda.max_memory_reserved(),
                           peak_kind="CUDA max_memory_allocated during training")
            else:
                row.update(peak_bytes=peak_rss_bytes(), rss_train_begin_bytes=self.rss_at_train_begin,
                           peak_kind="CPU peak RSS during training (whole process)")
            return row

    return StepTimer()


def finish(row: dict, timer, losses: list[float], parameters, rss_start: int) -> dict:
    """The common part of a row: status, parameters, losses and the timer's figures."""
    row = {"status": "ok", "trainable": parameters.trainable, "total": parameters.total, "trainable_percent": parameters.percent,
           "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
           "loss_finite": bool(losses) and all(math.isfinite(value) for value in losses), **row, **timer.figures()}
    if "rss_train_begin_bytes" in row:
        row["peak_above_start_bytes"] = row["peak_bytes"] - rss_start
        row["rss_start_bytes"] = rss_start
    return row


# ---------------------------------------------------------------- the kit's side


def training_arguments(spec: dict, **extra):
    """The TrainingArguments both sides share: steps, batch, precision, checkpointing, seed, token counting, no saving."""
    args = spec["args"]
    return dict(
        output_dir=str(Path(spec["work_dir"]) / "run"),
        max_steps=args["warmup_steps"] + args["steps"],
        per_device_train_batch_size=args["batch_size"],
        learning_rate=1e-4,
        fp16=spec["precision"] == "fp16",  # autocast (+ loss scaling); the device's precision, fp32 on a CPU
        bf16=spec["precision"] == "bf16",
        gradient_checkpointing=spec["gradient_checkpointing"],
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_liger_kernel=args["use_liger_kernel"],
        torch_compile=args["torch_compile"],
        seed=0,
        **extra,
    )


def run_kit(spec: dict) -> dict:
    """The kit's training path as a user runs it (``train.train``: its collator, batching, Trainer and callbacks)."""
    from ..config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments
    from ..plan import plan_from_arguments
    from ..train import train

    args, method = spec["args"], spec["method_spec"]
    rss_start = rss_bytes()
    timer = step_timer(args["warmup_steps"])
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

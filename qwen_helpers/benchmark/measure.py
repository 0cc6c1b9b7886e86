"""What every benchmark row measures, alike for the kit, the plain reference and TRL's trainers: memory, time per
step after the warm-up, real tokens, and the TrainingArguments the sides share.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path


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


def step_timer(warmup_steps: int, count_trained_tokens: bool = False):
    """A ``TrainerCallback`` timing whole Trainer steps after the warm-up, with real tokens and the training peak.

    ``count_trained_tokens``: also count the tokens the loss trains on (SFT rows), so rows trained by different
    trainers can be shown to train the same tokens.
    """
    import torch
    from transformers import TrainerCallback

    from ..models.loading import synchronize

    class StepTimer(TrainerCallback):
        """Synchronise the device at each step's end; time from the end of the last warm-up step to the end of the run.

        A Trainer step here is everything a user waits for: fetching and collating the batch, the
        host-to-device copy, forward, backward, clipping, the optimiser, the scheduler and logging.
        Real tokens come from ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen="non_padding"``).
        Trained tokens are the ``labels`` the model's forward passes with gradients receive, other than -100,
        after the one-position shift every causal LM loss makes (a label at a sequence start is never a target).
        """

        def __init__(self):
            self.marks: list[tuple[int, float, int, float, int]] = []  # (step, wall time, tokens seen, process CPU time, trained)
            self.cuda = torch.cuda.is_available()
            self.rss_at_train_begin = 0
            self.trained = torch.zeros((), dtype=torch.long)  # summed on the labels' device; read only after a sync

        def count_labels(self, module, positional, keywords):
            labels = keywords.get("labels")
            if labels is not None and torch.is_grad_enabled():  # training forwards, not a reference's no-grad pass
                self.trained = self.trained.to(labels.device) + (labels[..., 1:] != -100).sum()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if count_trained_tokens and model is not None:
                model.register_forward_pre_hook(self.count_labels, with_kwargs=True)
            synchronize()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()  # the peak of training, not of loading
            else:
                reset_cpu_peak()
                self.rss_at_train_begin = rss_bytes()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            if state.global_step >= warmup_steps:
                self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen, time.process_time(),
                                   int(self.trained)))

        def figures(self) -> dict:
            (first_step, first_time, first_tokens, first_cpu, first_trained) = self.marks[0]
            (last_step, last_time, last_tokens, last_cpu, last_trained) = self.marks[-1]
            steps, seconds, tokens = last_step - first_step, last_time - first_time, last_tokens - first_tokens
            if steps < 1:
                raise RuntimeError("no timed step: --steps must be at least 1 after --warmup_steps")
            # CPU time of this process: on a shared machine it moves less with other processes' load than wall time
            row = {"timed_steps": steps, "step_seconds": seconds / steps, "tokens_per_second": tokens / seconds,
                   "real_tokens_per_step": tokens / steps, "tokens_per_cpu_second": tokens / max(last_cpu - first_cpu, 1e-9)}
            if count_trained_tokens:
                row["trained_tokens_per_step"] = (last_trained - first_trained) / steps
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

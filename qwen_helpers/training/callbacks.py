"""The kit's Trainer callbacks: the loss history every plot and report reads, the NaN guard, the demo's loss lines."""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..common.errors import KitError

logger = logging.getLogger("qwen_helpers")


class LossHistoryCallback(TrainerCallback):
    """Collect every logged training and evaluation record (step, loss, learning rate, grad norm)."""

    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.history.append({"step": state.global_step, "epoch": state.epoch, **logs})

    def train_losses(self) -> list[float]:
        return train_losses(self.history)


def train_losses(history: list[dict]) -> list[float]:
    """The training losses of a logged history, in order (evaluation records carry eval_loss instead)."""
    return [record["loss"] for record in history if "loss" in record]


class NanGuardCallback(TrainerCallback):
    """Stop a run whose loss or gradient norm stays non-finite, and put back the last good trainable weights.

    The trainable weights are small for adapters, so a copy is kept at every good log; after
    ``patience`` bad logs in a row the run stops and that copy is restored before saving.
    Under DDP, FSDP and DeepSpeed every rank logs the same values (the loss is averaged over all
    ranks before logging, the gradient norm is the global one), so all ranks stop at the same step.
    """

    ADVICE = (
        "The loss became NaN/inf and the run was stopped; the adapter saved is the last good one. "
        "Try: a lower --learning_rate (e.g. half), --bf16 True instead of --fp16 True on Ampere+ GPUs "
        "(Qwen2.5+ activations can overflow fp16), --max_grad_norm 0.3, or checking the data for empty answers."
    )

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.bad_logs = 0
        self.triggered = False
        self.last_good: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.last_good is None:  # the starting weights: good unless a resumed run brought NaN
            self._keep_if_finite(model)

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        # Under fp16 loss scaling an inf gradient norm is the scaler's normal overflow signal (the step is
        # skipped and the scale halved), so only the loss counts there.
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")
        values = [logs.get(key) for key in keys if logs and logs.get(key) is not None]
        if not values:
            return
        # A finite loss is computed before the step; the step (too high a learning rate) can still break the weights.
        if all(math.isfinite(value) for value in values) and (model is None or self._keep_if_finite(model)):
            self.bad_logs = 0
            return
        self.bad_logs += 1
        if self.bad_logs >= self.patience:
            control.should_training_stop = True
            control.should_save = False
            # No evaluation of this step either: it would score the restored copy of an earlier step under this
            # step's number, and could make it the "best" checkpoint (saved with --save_strategy best) of a step
            # whose real weights were NaN.
            control.should_evaluate = False
            self._restore(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """A run that ended (max_steps) with non-finite weights before the guard's patience ran out is restored too."""
        if model is not None and not self.triggered and not _all_finite(_trainable(model)):
            self._restore(model)

    def _keep_if_finite(self, model) -> bool:
        weights = _trainable(model)
        if not _all_finite(weights):
            return False
        self.last_good = {name: parameter.detach().clone() for name, parameter in weights.items()}
        return True

    def _restore(self, model) -> None:
        """Put back the last finite weights; refuse to call anything good when there were none."""
        self.triggered = True
        if model is not None and self.last_good is not None:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name in self.last_good:
                        parameter.copy_(self.last_good[name])
        if model is not None and not _all_finite(_trainable(model)):
            raise NonFiniteWeightsError(
                "The trainable weights are NaN/inf and no finite copy was kept (the run resumed from non-finite "
                "weights?); nothing is saved. Start a fresh run with a lower --learning_rate."
            )
        logger.warning(self.ADVICE)


class NonFiniteWeightsError(KitError):
    """Training left NaN/inf weights and no finite copy of them exists: nothing trustworthy to save."""


def _trainable(model) -> dict:
    return {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}


def _all_finite(weights: dict) -> bool:
    return all(bool(torch.isfinite(parameter).all()) for parameter in weights.values())


class LossLineProgress(ProgressCallback):
    """The Trainer's progress bar, with one readable line per log: step, loss, learning rate, grad norm; eval metrics.

    With ``--disable_tqdm True`` the bars stay off and the lines are printed alone.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        self.quiet = args.disable_tqdm
        if not self.quiet:
            super().on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.quiet:
            super().on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not getattr(self, "quiet", args.disable_tqdm):
            super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)

    def write(self, line: str) -> None:
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        if "loss" in logs:
            examples = logs.get("examples_per_step")  # token-budget batches: how many examples each step took
            self.write(
                f"step {state.global_step:>4}/{state.max_steps}  loss {logs['loss']:7.4f}  "
                f"learning rate {logs.get('learning_rate', float('nan')):.2e}  grad norm {logs.get('grad_norm', float('nan')):.3f}"
                + (f"  examples/step {examples:g}" if examples is not None else "")
            )
        elif "eval_loss" in logs or "eval_runtime" in logs:
            self.write(f"step {state.global_step:>4}/{state.max_steps}  {evaluation_line(logs)}")
        elif "train_runtime" in logs:
            self.write(
                f"trained {state.global_step} steps in {logs['train_runtime']:.1f} s, "
                f"mean loss {logs['train_loss']:.4f}"
            )


GENERATION_METRIC_NAMES = ("chrf", "bleu", "exact_match")  # 0-100, printed with one decimal
CLASSIFICATION_METRIC_NAMES = ("accuracy", "macro_f1")  # 0-1, printed with three


def evaluation_line(logs: dict) -> str:
    """One readable line for an evaluation's logs: eval loss, the task's metrics, and what scoring them cost."""
    parts = [f"eval loss {logs['eval_loss']:.4f}"] if "eval_loss" in logs else []
    for name in GENERATION_METRIC_NAMES + CLASSIFICATION_METRIC_NAMES:
        value = logs.get(f"eval_{name}")
        if value is not None:
            parts.append(
                f"{name.replace('_', ' ')} {value:.1f}"
                if name in GENERATION_METRIC_NAMES
                else f"{name.replace('_', ' ')} {value:.3f}"
            )
    if "eval_scoring_seconds" in logs and "eval_runtime" in logs:
        parts.append(
            f"({logs['eval_scoring_seconds']:.1f} s of the {logs['eval_runtime']:.1f} s evaluation "
            "went to the held-out metric)"
        )
    elif "eval_runtime" in logs:
        parts.append(f"({logs['eval_runtime']:.1f} s)")
    return "  ".join(parts)

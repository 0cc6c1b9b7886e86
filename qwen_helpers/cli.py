"""Shared plumbing of the training commands: parse flags with HfArgumentParser, train, report, write the loss plot."""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import HfArgumentParser

from .config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments
from .errors import parse_flags
from .files import base_weights_size, folder_size, human_bytes

METHOD_ARGUMENTS = {"lora": LoraArguments, "prompt_tuning": PromptTuningArguments}


def parse_training_args(method: str, argv: list[str] | None = None, **defaults):
    """Parse model, data, method and TrainingArguments flags; ``defaults`` override the dataclass defaults."""
    parser = HfArgumentParser((ModelArguments, DataArguments, METHOD_ARGUMENTS[method], KitTrainingArguments))
    parser.set_defaults(**defaults)
    return parse_flags(parser, argv)  # every flag problem is one line naming the flag


def report(result, model_path: str) -> str:
    """The closing lines of a run: where the adapter went, its size against the base, the loss curve."""
    output = Path(result.output_dir)
    adapter = folder_size(output, "adapter_model.*")
    base = base_weights_size(model_path)
    losses = result.train_losses
    lines = [
        f"loss: {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (last log) over {len(losses)} logs" if losses else "loss: nothing logged",
        f"adapter saved to {output}/ ({human_bytes(adapter)}"
        + (f"; the base model's weights are {human_bytes(base)}, {base / max(adapter, 1):,.0f}x larger)" if base else ")"),
        f"loss curve: {output / 'loss_plot.png'}",
    ]
    return "\n".join(lines)


def weights_are_sharded(trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no single process holds the whole model."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = trainer.accelerator.state.deepspeed_plugin if getattr(trainer, "is_deepspeed_enabled", False) else None
    return plugin is not None and plugin.zero_stage == 3


def run_training_command(method: str, argv: list[str] | None = None, **defaults) -> int:
    """Entry point body of train_lora / train_qlora / train_prompt_tuning."""
    from .plots import plot_loss
    from .train import NanGuardCallback, publish_run, train

    model_args, data_args, method_args, training_args = parse_training_args(method, argv, **defaults)
    result = train(
        model_args,
        data_args,
        training_args,
        method=method,
        lora_args=method_args if method == "lora" else None,
        prompt_args=method_args if method == "prompt_tuning" else None,
        publish=False,  # the loss plot joins the run's folder before it replaces --output_dir
    )
    sharded = weights_are_sharded(result.trainer)
    if not result.trainer.is_world_process_zero():
        return 0
    plot_loss(result.history, title=f"{method} on {model_args.model_path}").savefig(Path(result.output_dir) / "loss_plot.png", dpi=100)
    publish_run(result)
    print(report(result, model_args.model_path), flush=True)
    if sharded:  # rank 0 alone cannot run the model: the other ranks hold parts of its weights
        print(f"evaluation skipped under FSDP/ZeRO-3; evaluate the saved adapter on one GPU: "
              f"python -m qwen_helpers.inference --adapter_path {result.output_dir} --data_path YOUR_TEST.json", flush=True)
    else:
        from .classification import evaluate_run

        evaluation = evaluate_run(result, data_args, method_args if method == "prompt_tuning" else None)  # classification data only
        if evaluation:
            print(evaluation, flush=True)
    if result.stopped_by_nan_guard:
        print(NanGuardCallback.ADVICE, file=sys.stderr)
        return 2
    return 0

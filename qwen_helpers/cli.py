"""Shared plumbing of the training commands: parse flags with HfArgumentParser, train, report, write the loss plot."""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import HfArgumentParser

from .config import DataArguments, KitTrainingArguments, ModelArguments
from .errors import parse_flags
from .methods import get_method


def parse_training_args(method: str, argv: list[str] | None = None, **defaults):
    """Parse model, data, method and TrainingArguments flags; ``defaults`` override the method's and the dataclasses' defaults.

    Returns (model, data, method, training) arguments; the method's is None for full fine-tuning (it has no flags).
    """
    kind = get_method(method)
    groups = (ModelArguments, DataArguments, *([kind.arguments] if kind.arguments else []), KitTrainingArguments)
    parser = HfArgumentParser(groups)
    parser.set_defaults(**{**kind.command_defaults, **defaults})
    parsed = parse_flags(parser, argv)  # every flag problem is one line naming the flag
    return parsed if kind.arguments else (parsed[0], parsed[1], None, parsed[2])


def weights_are_sharded(trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no single process holds the whole model."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = trainer.accelerator.state.deepspeed_plugin if getattr(trainer, "is_deepspeed_enabled", False) else None
    return plugin is not None and plugin.zero_stage == 3


def run_training_command(method: str, argv: list[str] | None = None, **defaults) -> int:
    """Entry point body of train_lora / train_qlora / train_prompt_tuning."""
    from .plots import plot_loss
    from .callbacks import NanGuardCallback
    from .train import publish_run, report, train

    model_args, data_args, method_args, training_args = parse_training_args(method, argv, **defaults)
    prompt_args = method_args if get_method(method).adapter == "prompt_tuning" else None
    lora_args = method_args if get_method(method).adapter == "lora" else None
    # publish=False: the loss plot joins the run's folder before it replaces --output_dir
    result = train(model_args, data_args, training_args, method=method, lora_args=lora_args, prompt_args=prompt_args, publish=False)
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

        evaluation = evaluate_run(result, data_args, prompt_args)  # classification data only
        if evaluation:
            print(evaluation, flush=True)
    if result.stopped_by_nan_guard:
        print(NanGuardCallback.ADVICE, file=sys.stderr)
        return 2
    return 0

"""Shared plumbing of the training commands: parse flags with HfArgumentParser, plan the run, train, report, plot.

The flags are parsed once; each argument dataclass checks its own values, and :func:`qwen_helpers.training.plan.plan_run`
checks them against each other, the data and the base, before any model loads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .run.quickflags import dataclass_parser, parse_command_flags


def parse_training_args(method: str, argv: list[str] | None = None, **defaults):
    """Parse model, data, method and TrainingArguments flags; ``defaults`` override the method's and the dataclasses' defaults.

    Returns (model, data, method, training) arguments; the method's is None for full fine-tuning (it has no flags).
    """
    command = f"train/{method}/{json.dumps(defaults, sort_keys=True, default=str)}"

    def build_parser():
        from .run.config import DataArguments, KitTrainingArguments, ModelArguments
        from .run.methods import get_method

        kind = get_method(method)
        parser = dataclass_parser(ModelArguments, DataArguments, *([kind.arguments] if kind.arguments else []), KitTrainingArguments)
        parser.set_defaults(**{**kind.command_defaults, **defaults})
        return parser

    parsed = parse_command_flags(command, build_parser, argv)  # --help and a misspelled flag answer before the imports
    return parsed if len(parsed) == 4 else (parsed[0], parsed[1], None, parsed[2])


def weights_are_sharded(trainer) -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, where no single process holds the whole model."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = trainer.accelerator.state.deepspeed_plugin if getattr(trainer, "is_deepspeed_enabled", False) else None
    return plugin is not None and plugin.zero_stage == 3


def run_training_command(method: str, argv: list[str] | None = None, **defaults) -> int:
    """Entry point body of train_lora / train_qlora / train_prompt_tuning."""
    model_args, data_args, method_args, training_args = parse_training_args(method, argv, **defaults)

    from .training.callbacks import LossLineProgress, NanGuardCallback
    from .training.plan import plan_run
    from .common.files import save_figure
    from .notebook.plots import plot_loss
    from .training.sft import publish_run, report, train

    plan = plan_run(model_args, data_args, training_args, method, method_args)  # every cross-flag check, once
    # publish=False: the loss plot joins the run's folder before it replaces --output_dir
    result = train(plan, callbacks=[LossLineProgress()], publish=False)  # one line per log (step, loss, lr; eval metrics)
    sharded = weights_are_sharded(result.trainer)
    if not result.trainer.is_world_process_zero():
        return 0
    metric = training_args.metric_for_best_model
    save_figure(plot_loss(result.history, title=f"{method} on {model_args.model_path}", metric=metric),
                Path(result.output_dir) / "loss_plot.png")
    publish_run(result)
    print(report(result, model_args.model_path), flush=True)
    if sharded:  # rank 0 alone cannot run the model: the other ranks hold parts of its weights
        print(f"evaluation skipped under FSDP/ZeRO-3; evaluate the saved adapter on one GPU: "
              f"python -m qwen_helpers.inference --adapter_path {result.output_dir} --data_path YOUR_TEST.json", flush=True)
    elif plan.data.data_format != "text":  # raw text (as plan_run decided) has no answers to evaluate; its eval loss is in the history
        from .evaluation.classification import evaluate_run

        evaluation = evaluate_run(result, data_args, plan.prompt_args)  # classification data only
        if evaluation:
            print(evaluation, flush=True)
    if result.stopped_by_nan_guard:
        print(NanGuardCallback.ADVICE, file=sys.stderr)
        return 2
    return 0


COMMANDS = {
    "train_lora": "LoRA on a 16-bit base (fp16 mixed precision on a GPU)",
    "train_qlora": "LoRA on a 4-bit NF4 base (bitsandbytes, GPU)",
    "train_prompt_tuning": "soft prompts (virtual tokens) before every input",
    "train_dpo": "preference tuning (DPO, TRL) of a LoRA adapter on chosen/rejected pairs",
    "train_grpo": "RL with verifiable rewards (GRPO, TRL) of a LoRA adapter",
    "inference": "answer prompts or a test file with an adapter, score it",
    "export": "merge an adapter (--format hf), GGUF for llama.cpp/Ollama (--format gguf), check it for vLLM",
    "inspect_data": "show which tokens of a record are trained",
    "benchmark": "trainable parameters, peak memory and speed per method",
    "demo": "the README's CPU demo",
    "make_tiny_qwen": "write the tiny Qwen or a replica of a released checkpoint to a folder",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m qwen_helpers.cli``: this module only holds the training commands' shared plumbing; list the commands."""
    print("qwen_helpers.cli holds the training commands' shared flag parsing; it is not a command itself. The commands:")
    for name, job in COMMANDS.items():
        print(f"  python -m qwen_helpers.{name:<20} {job}")
    print("Each takes --help.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

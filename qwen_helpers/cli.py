"""Shared plumbing of the training commands: parse flags with HfArgumentParser, train, report, write the loss plot.

Flags are checked before torch or transformers is imported (:mod:`qwen_helpers.quickflags`): ``--help``,
a misspelled flag, a value of the wrong type or out of range each answer in about a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .flag_checks import (best_metric_name, check_data_files, check_data_flags, check_evaluation_data,
                          check_evaluation_flags, check_training_flags, evaluation_task)
from .quickflags import dataclass_parser, parse_command_flags


def check_flag_values(method: str, flags: argparse.Namespace) -> None:
    """Every check of the flags' values that needs no library, on the quick parse's namespace."""
    from .batching import check_token_budget, resolve_padding_free
    from .checks import check_model_path, looks_like_local_path
    from .files import check_not_an_input
    from .run_folder import training_inputs

    check_data_flags(flags)
    check_data_files(flags)  # before torch loads, and before any output folder is made
    # train() checks it again (for notebooks); here it is answered before the libraries load
    inputs = training_inputs(flags.model_path, flags.data_path, flags.eval_data_path, flags.deepspeed)
    check_not_an_input(flags.output_dir, "--output_dir", inputs, example="outputs/lora")
    check_training_flags(flags, flags)  # the method's own checks apply where its flags are present
    check_evaluation_flags(flags)
    check_evaluation_data(flags, flags)  # e.g. --eval_strategy steps without --eval_data_path
    metric = best_metric_name(flags.metric_for_best_model)
    if flags.eval_data_path and metric not in (None, "eval_loss"):  # a metric the data's task produces
        check_evaluation_data(flags, flags, evaluation_task(flags, getattr(flags, "task", "auto")))
    check_token_budget(flags.token_budget, flags.max_length)
    resolve_padding_free(flags.padding_free, method, flags.attn_implementation)
    if looks_like_local_path(flags.model_path):  # a hub id is checked by train(), once (it may print a download note)
        check_model_path(flags.model_path)


def parse_training_args(method: str, argv: list[str] | None = None, **defaults):
    """Parse model, data, method and TrainingArguments flags; ``defaults`` override the method's and the dataclasses' defaults.

    Returns (model, data, method, training) arguments; the method's is None for full fine-tuning (it has no flags).
    """
    command = f"train/{method}/{json.dumps(defaults, sort_keys=True, default=str)}"

    def build_parser():
        from .config import DataArguments, KitTrainingArguments, ModelArguments
        from .methods import get_method

        kind = get_method(method)
        parser = dataclass_parser(ModelArguments, DataArguments, *([kind.arguments] if kind.arguments else []), KitTrainingArguments)
        parser.set_defaults(**{**kind.command_defaults, **defaults})
        return parser

    # --help and flag mistakes are answered before anything heavy is imported; every problem is one line naming the flag
    parsed = parse_command_flags(command, build_parser, argv, check=lambda flags: check_flag_values(method, flags))
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

    from .callbacks import LossLineProgress, NanGuardCallback
    from .methods import get_method
    from .plots import plot_loss
    from .train import publish_run, report, train

    lora_args, prompt_args = get_method(method).argument_groups(method_args)
    # publish=False: the loss plot joins the run's folder before it replaces --output_dir
    result = train(
        model_args,
        data_args,
        training_args,
        method=method,
        lora_args=lora_args,
        prompt_args=prompt_args,
        publish=False,
        callbacks=[LossLineProgress()],
    )  # one readable line per log (step, loss, learning rate; eval metrics)
    sharded = weights_are_sharded(result.trainer)
    if not result.trainer.is_world_process_zero():
        return 0
    metric = training_args.metric_for_best_model
    figure = plot_loss(result.history, title=f"{method} on {model_args.model_path}", metric=metric)
    figure.savefig(Path(result.output_dir) / "loss_plot.png", dpi=100)
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

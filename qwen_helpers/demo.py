"""The README's demo: train a LoRA adapter with the tiny Qwen on a CPU in about a minute, then see what it learned.

    python -m qwen_helpers.demo [--model_path tiny] [--records 4] [--learning_rate 1e-2] [--max_steps 30]

The tiny model's weights are random, so in a minute it can only memorise: the demo trains on the first few
records of data/train.json and prints their answers before and after training (after: word for word the
trained answers), then two held-out test prompts it never saw, whose answers are not learned: noise, or one of the
memorised answers (each is marked). Generalising needs a pretrained Qwen, or a task as simple as notebook 02b's.
Each run writes a new timestamped folder under outputs/, so nothing is overwritten.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .run.quickflags import command_prog

REPO = Path(__file__).resolve().parent.parent


def quiet_library_warnings() -> None:
    """Hide deprecation notices from the libraries underneath: a user of the demo cannot act on them."""
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # tokenising four records needs no progress bar of its own
    transformers.utils.logging.disable_progress_bar()  # nor does loading a 90 MB checkpoint
    transformers.utils.logging.set_verbosity_error()


@dataclass
class DemoResult:
    """What the demo printed, for tests: the trained records and held-out prompts, answered before and after."""

    trained: list[dict]
    held_out: list[dict]
    before: list[str]
    after: list[str]
    held_out_before: list[str]
    held_out_after: list[str]
    output_dir: Path
    train_result: object
    loss_floor: str = ""  # what the last loss is made of (every answer right, yet the loss is not 0)

    @property
    def exact(self) -> int:
        """How many trained records the adapter answers word for word."""
        return sum(answer == record["output"] for answer, record in zip(self.after, self.trained))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=command_prog(), description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model_path", default="tiny", help="'tiny' (default) or a Qwen folder / hub id.")
    parser.add_argument("--records", type=int, default=4, help="Train on the first N records of data/train.json (4 memorises in a minute on tiny).")
    parser.add_argument("--learning_rate", type=float, default=1e-2, help="1e-2 memorises 4 records on the random tiny model; use 3e-4 on a real Qwen.")
    parser.add_argument("--max_steps", type=int, default=30, help="Optimiser steps (30 is about a minute on a CPU).")
    parser.add_argument("--output_dir", default=None, help="Where the adapter goes; default outputs/demo-lora-<time> (a new folder).")
    args = parser.parse_args(argv)
    if args.records < 1 or args.max_steps < 1:
        parser.error("--records and --max_steps must be at least 1.")
    if args.output_dir and Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        parser.error(f"--output_dir {args.output_dir} already holds files; name a new folder (the demo never overwrites).")
    return args


def run_demo(args: argparse.Namespace) -> DemoResult:
    """Answer, train LoRA on the first ``args.records`` records, answer again; the adapter is saved in a new folder."""
    from .training.callbacks import LossLineProgress
    from .run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
    from .data.records import load_records
    from .models.generation import generate
    from .models.loading import load_base_model, load_tokenizer
    from .common.files import save_figure
    from .notebook.plots import plot_loss
    from .training.sft import train
    from .evaluation.token_losses import loss_floor_line, trained_token_losses

    output_dir = Path(args.output_dir) if args.output_dir else REPO / "outputs" / time.strftime("demo-lora-%Y%m%d-%H%M%S")
    trained = load_records(REPO / "data" / "train.json")[: args.records]
    held_out = load_records(REPO / "data" / "test.json")[:2]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # beside the adapter, not in it: the run replaces its folder whole, and no output may hold an input
    records_path = output_dir.with_name(f"{output_dir.name}.train_records.json")  # the run config points at it
    records_path.write_text(json.dumps(trained, ensure_ascii=False, indent=1), encoding="utf-8")

    tokenizer = load_tokenizer(args.model_path)
    base = load_base_model(args.model_path)
    before, held_out_before = generate(base, tokenizer, trained, max_new_tokens=24), generate(base, tokenizer, held_out, max_new_tokens=24)
    del base

    result = train(
        ModelArguments(model_path=args.model_path),
        DataArguments(data_path=str(records_path)),
        KitTrainingArguments(output_dir=str(output_dir), overwrite_output_dir=True,  # new, or empty (parse_args checked)
                             learning_rate=args.learning_rate, max_steps=args.max_steps, per_device_train_batch_size=min(args.records, 4),
                             fp16=True, save_strategy="no", logging_steps=5, report_to=[]),
        method="lora",
        lora_args=LoraArguments(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        callbacks=[LossLineProgress()],
    )
    save_figure(plot_loss(result.history, title=f"LoRA on {args.model_path}"), output_dir / "loss_plot.png")
    model = result.model.eval()
    after, held_out_after = generate(model, result.tokenizer, trained, max_new_tokens=24), generate(model, result.tokenizer, held_out, max_new_tokens=24)
    loss_floor = loss_floor_line(trained_token_losses(model, result.tokenizer, trained))
    return DemoResult(trained, held_out, before, after, held_out_before, held_out_after, output_dir, result, loss_floor)


def print_report(demo: DemoResult, model_path: str) -> None:
    """The trained records before -> after (memorised), the held-out prompts (noise), and where the files went."""
    from .training.sft import report

    print(f"\n=== the {len(demo.trained)} trained records: {demo.exact} answered word for word after training (memorised) ===")
    for record, old, new in zip(demo.trained, demo.before, demo.after):
        mark = "exact" if new == record["output"] else "differs"
        print(f"{record['instruction']} {record['input']}\n  before: {old!r}\n  after:  {new!r}  ({mark}; trained answer {record['output']!r})")
    if demo.loss_floor:
        print(f"Why the last loss is not 0: {demo.loss_floor}. The tiny model's output layer is random and frozen, "
              "which caps how sure it can be of any token (notebook 02 shows it token by token).")
    print("\n=== held-out prompts, never trained: not learned (noise, or a memorised answer); "
          "generalising needs a real Qwen ===")
    for record, old, new in zip(demo.held_out, demo.held_out_before, demo.held_out_after):
        label = held_out_label(new, record, demo.trained)
        print(f"{record['instruction']} {record['input']}\n  before: {old!r}\n  after:  {new!r}  ({label})")
    print(report(demo.train_result, model_path))


def held_out_label(answer: str, record: dict, trained: list[dict]) -> str:
    """What a held-out answer is: its reference, a trained record's answer (memorised, wrong here), or neither."""
    if answer == record["output"]:
        return "the reference"
    if any(answer == example["output"] for example in trained):
        return "a memorised training answer, not this prompt's"
    return f"not the reference {record['output']!r}"


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_library_warnings()
    demo = run_demo(args)
    print_report(demo, args.model_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Show exactly which tokens of one record are trained: the rendered text with trained spans marked, and token counts.

    python -m qwen_helpers.inspect_data --model_path tiny-qwen3 --data_path data/multiturn.json --index 0 [--json]
    python -m qwen_helpers.inspect_data --data_path data/pretrain.txt --index 1 --max_length 128   # raw text: its packed blocks
    python -m qwen_helpers.inspect_data --data_path data/preference.json --index 0   # a DPO pair: prompt, chosen, rejected

Trained text is shown between ⟦ and ⟧; the prompt used at inference for the same record follows.
``--json`` prints one object with ``text``, ``trained_text``, ``prompt``, ``input_ids`` and ``labels``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .data.encoding import IGNORE_INDEX, build_messages, format_prompt, tokenize_example
from .models.checks import check_model_path
from .common.errors import FlagError, command_boundary
from .run.flag_checks import RAW_TEXT_IGNORES
from .run.prompt_settings import field_flag, field_map_of
from .run.quickflags import dataclass_parser, parse_command_flags
from .data.preference import load_preference_records, tokenize_pair
from .data.raw_text import document_blocks, first_record, is_raw_text
from .data.records import DataValidationError, is_preference_pair, load_records

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


@dataclass
class InspectArguments:
    """Which record of which file to show, rendered for which checkpoint."""

    model_path: str = field(default="tiny", metadata={"help": "Checkpoint whose tokenizer and chat template render the record ('tiny-qwen3', a folder...)."})
    data_path: str = field(default="data/train.json", metadata={"help": "JSON or JSONL data file (alpaca, messages or sharegpt records)."})
    index: int = field(default=0, metadata={"help": "Record to show (0 is the first)."})
    data_format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = field(
        default="auto", metadata={"help": "Force a record format (text: raw text, shown as the packed blocks that hold the document)."})
    max_length: int = field(default=512, metadata={"help": "Raw text: the block length training packs into (its --max_length)."})
    instruction_field: str | None = field_flag("instruction", recorded=False)
    input_field: str | None = field_flag("input", recorded=False)
    output_field: str | None = field_flag("output", recorded=False)
    system_field: str | None = field_flag("system", recorded=False)
    enable_thinking: bool = field(default=False, metadata={"help": "Qwen3: train the reasoning (thinking mode) instead of non-thinking mode."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object instead of the marked text."})


def inspect_record(tokenizer, record: dict, enable_thinking: bool = False) -> dict:
    """The training view of one record: full text, decoded trained tokens, inference prompt, ids and labels."""
    example = tokenize_example(tokenizer, record, enable_thinking=enable_thinking)
    ids, labels = example["input_ids"], example["labels"]
    trained = [token for token in labels if token != IGNORE_INDEX]
    return {
        "text": tokenizer.decode(ids),
        "trained_text": tokenizer.decode(trained),
        "prompt": format_prompt(tokenizer, record, enable_thinking),
        "turns": len(build_messages(record)),
        "tokens": len(ids),
        "trained_tokens": len(trained),
        "input_ids": ids,
        "labels": labels,
    }


def inspect_preference(tokenizer, pair: dict, enable_thinking: bool = False) -> dict:
    """What DPO scores in one pair: the prompt (context, never scored), then the chosen and the rejected continuation,
    each with its closing token, tokenised exactly as ``train_dpo`` tokenises them."""
    row = tokenize_pair(tokenizer, pair, enable_thinking)
    view = {"prompt": tokenizer.decode(row["prompt_ids"]), "prompt_tokens": len(row["prompt_ids"])}
    for key in ("chosen", "rejected"):
        view |= {key: tokenizer.decode(row[f"{key}_ids"]), f"{key}_tokens": len(row[f"{key}_ids"]), f"{key}_ids": row[f"{key}_ids"]}
    return view | {"prompt_ids": row["prompt_ids"]}


def marked_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The decoded example with every run of trained tokens between ⟦ and ⟧."""
    pieces, run, trained_run = [], [], False
    for token, label in zip(input_ids, labels):
        trained = label != IGNORE_INDEX
        if trained != trained_run and run:
            text = tokenizer.decode(run)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained_run else text)
            run = []
        run.append(token)
        trained_run = trained
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained_run else text)
    return "".join(pieces)


def inspect_text(tokenizer, path, index: int, block_length: int) -> dict:
    """The training view of one raw-text document: the packed block(s) holding it, every token trained."""
    found = document_blocks(tokenizer, path, index, block_length)
    ids = [token for block in found["blocks"] for token in block["input_ids"]]
    labels = [label for block in found["blocks"] for label in block["labels"]]
    trained = [label for label in labels if label != IGNORE_INDEX]
    return {**found, "text": tokenizer.decode(ids), "trained_text": tokenizer.decode(trained), "tokens": len(ids),
            "trained_tokens": len(trained), "input_ids": ids, "labels": labels}


def _print_text_view(args, tokenizer, view: dict) -> None:
    start, end = view["document_span"]
    print(f"document {args.index} of {args.data_path} (raw text: no chat template), packed into blocks of {args.max_length} "
          f"tokens for {args.model_path}; counting from the first block shown, tokens {start}-{end - 1} are this document and its end token. "
          f"Trained text between {TRAINED_OPEN} and {TRAINED_CLOSE}:")
    for number, block in enumerate(view["blocks"], start=view["first_block"]):
        print(f"\nblock {number}:\n{marked_text(tokenizer, block['input_ids'], block['labels'])}")
    print(f"\n{len(view['blocks'])} block(s), {view['tokens']} tokens, {view['trained_tokens']} trained "
          f"({100 * view['trained_tokens'] / max(view['tokens'], 1):.0f}%)")
    if view["dropped_tokens"]:
        print(f"{view['dropped_tokens']} tokens of this document fall in the stream's last partial block, which is dropped")


def _main_raw_text(args) -> int:
    if args.max_length < 1:
        raise FlagError(f"--max_length must be at least 1 token (the block length training packs into), got {args.max_length}.")
    for name in ("enable_thinking", "instruction_field", "input_field", "output_field", "system_field"):  # chat records' flags
        harmless, why = RAW_TEXT_IGNORES[name]
        if getattr(args, name) not in (None, *harmless):
            raise FlagError(f"--{name} {getattr(args, name)}: {why}; drop the flag (it applies to instruction or chat records).")
    check_model_path(args.model_path)
    from .models.loading import load_tokenizer

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        tokenizer = load_tokenizer(args.model_path)
        view = inspect_text(tokenizer, args.data_path, args.index, args.max_length)
    if args.json:
        print(json.dumps(view, ensure_ascii=False))
    else:
        _print_text_view(args, tokenizer, view)
    return 0


def _main_preference(args) -> int:
    for name in ("instruction_field", "input_field", "output_field", "system_field"):
        if getattr(args, name) is not None:
            raise FlagError(f"--{name} {getattr(args, name)}: {args.data_path} holds preference pairs, read by their own "
                            "fields (prompt or messages, chosen, rejected); drop the flag.")
    check_model_path(args.model_path)
    pairs = load_preference_records(args.data_path)
    if not 0 <= args.index < len(pairs):
        raise DataValidationError(f"--index {args.index}: {args.data_path} has {len(pairs)} pairs (0 to {len(pairs) - 1}).")
    from .models.loading import load_tokenizer

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        tokenizer = load_tokenizer(args.model_path)
        view = inspect_preference(tokenizer, pairs[args.index], args.enable_thinking)
    if args.json:
        print(json.dumps(view, ensure_ascii=False))
        return 0
    print(f"pair {args.index} of {args.data_path}, rendered for {args.model_path}: DPO compares how likely the model "
          f"finds each answer (between {TRAINED_OPEN} and {TRAINED_CLOSE}) after the same prompt, which is context only.\n")
    print(f"PROMPT ({view['prompt_tokens']} tokens, as at inference):\n{view['prompt']}")
    for key in ("chosen", "rejected"):
        print(f"\n{key.upper()} ({view[f'{key}_tokens']} tokens scored):\n{TRAINED_OPEN}{view[key]}{TRAINED_CLOSE}")
    return 0


@command_boundary
def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command_flags("inspect_data", lambda: dataclass_parser(InspectArguments), argv)
    if is_raw_text(args.data_path, args.data_format, field_map_of(args)):
        return _main_raw_text(args)
    if args.data_format == "auto" and Path(args.data_path).is_file() and is_preference_pair(first_record(args.data_path)):
        return _main_preference(args)
    # with --json, stdout holds the one JSON object: every note (a model download, a replica built) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        tokenizer, record = _load(args)
        try:
            view = inspect_record(tokenizer, record, args.enable_thinking)
        except ValueError as error:
            raise DataValidationError(f"{args.data_path}, record {args.index}: {error}") from None
    if args.json:
        print(json.dumps(view, ensure_ascii=False))
        return 0
    print(f"record {args.index} of {args.data_path}, rendered for {args.model_path} (trained text between {TRAINED_OPEN} and {TRAINED_CLOSE}):\n")
    print(marked_text(tokenizer, view["input_ids"], view["labels"]))
    print(f"\n{view['tokens']} tokens, {view['trained_tokens']} trained ({100 * view['trained_tokens'] / view['tokens']:.0f}%)")
    print(f"\nprompt at inference:\n{view['prompt']}")
    return 0


def _load(args: InspectArguments):
    """The record asked for and the tokenizer, checked as the training commands check them, the model folder first."""
    check_model_path(args.model_path)
    records = load_records(args.data_path, field_map_of(args), args.data_format)
    if not 0 <= args.index < len(records):
        raise DataValidationError(f"--index {args.index}: {args.data_path} has {len(records)} records "
                                  f"(0 to {len(records) - 1}).")
    from .models.loading import load_tokenizer

    return load_tokenizer(args.model_path), records[args.index]


if __name__ == "__main__":
    sys.exit(main())

"""The ``python -m qwen_helpers.inference`` command: answer one prompt, or evaluate a data file.

    python -m qwen_helpers.inference --adapter_path outputs/lora --instruction "翻译为英文" --input "早安"
    python -m qwen_helpers.inference --adapter_path outputs/lora --data_path data/test.json --output_file outputs/preds.jsonl

Merging has one command: ``python -m qwen_helpers.export --format hf --adapter_path outputs/lora --output_dir
outputs/lora_merged``; ``--merge`` here only says so.

The library behind it: :mod:`qwen_helpers.models.adapters` (load), :mod:`qwen_helpers.models.generation` (generate),
:mod:`qwen_helpers.evaluation.compare` (scores and comparisons).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .models.checks import check_inference_inputs
from .common.errors import command_boundary
from .common.files import atomic_write_text
from .run.flag_checks import check_sampling_flags
from .evaluation.metrics import format_table, scores_by_task
from .run.prompt_settings import (PromptSettings, data_format_flag, field_flag, read_records_as_trained,
                              recorded_prompt_settings)
from .run.quickflags import dataclass_parser, parse_command_flags
from .data.tool_calls import reference_tool_calls


@dataclass
class InferenceArguments:
    """Flags of ``python -m qwen_helpers.inference``: what to load, what to answer, how to generate."""

    adapter_path: str | None = field(default=None, metadata={"help": "Adapter folder (train_lora/train_prompt_tuning/train_qlora output); omit for the base model alone."})
    model_path: str | None = field(default=None, metadata={"help": "Base model; default: the base the adapter records ('tiny' without an adapter)."})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "Load the base in 4-bit; default: as the adapter was trained."})
    instruction: str | None = field(default=None, metadata={"help": "Answer one prompt: the instruction."})
    input: str = field(default="", metadata={"help": "Optional input that goes with --instruction."})
    system: str | None = field(default=None, metadata={
        "help": "System prompt for --instruction; default: the one every training record shared (recorded with "
                "the adapter or the merged model), else the chat template's."})
    data_path: str | None = field(default=None, metadata={"help": "Evaluate on a JSON/JSONL file of records (instruction, input, output, task)."})
    instruction_field: str | None = field_flag("instruction")
    input_field: str | None = field_flag("input")
    output_field: str | None = field_flag("output")
    system_field: str | None = field_flag("system")
    data_format: Literal["auto", "alpaca", "messages", "sharegpt"] | None = data_format_flag()
    output_file: str = field(default="outputs/preds.jsonl", metadata={"help": "With --data_path: one JSON line per record (record, prediction, timing)."})
    overwrite_output_file: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_file."})
    max_records: int | None = field(default=None, metadata={"help": "With --data_path: use only the first N records."})
    batch_size: int = field(default=8, metadata={"help": "Records per generate call (left-padded)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer in tokens; generation also stops at <|im_end|>."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "With --do_sample: softmax temperature (lower is more conservative)."})
    top_p: float = field(default=0.9, metadata={"help": "With --do_sample: nucleus sampling mass."})
    top_k: int = field(default=50, metadata={"help": "With --do_sample: sample among the k most likely tokens."})
    enable_thinking: bool | None = field(
        default=None,
        metadata={"help": "Qwen3: prompt in thinking mode; default: as the adapter (or merged model) was trained."},
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1.0 discourages repeating tokens (1.0 = off)."})
    merge: bool = field(default=False, metadata={"help": "Moved: merge with python -m qwen_helpers.export --format hf."})
    output_dir: str | None = field(default=None, metadata={"help": "Moved with --merge to python -m qwen_helpers.export."})

    def __post_init__(self):
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError('--instruction is empty: give the prompt text, e.g. --instruction "Translate into English" (and --input for its input).')
        if self.merge or self.output_dir:  # the one merge command is export's
            raise ValueError(f"inference no longer merges: use python -m qwen_helpers.export --format hf --adapter_path "
                             f"{self.adapter_path or 'ADAPTER'} --output_dir {self.output_dir or 'FOLDER'} "
                             "(--overwrite_output_dir True to replace a folder).")
        modes = [name for name, on in (("--instruction", self.instruction), ("--data_path", self.data_path)) if on]
        if len(modes) != 1:
            raise ValueError(f"Pass exactly one of --instruction or --data_path (got {', '.join(modes) or 'none'}).")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"--max_records must be at least 1, got {self.max_records}; omit it to use every record.")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        check_sampling_flags(self)

    def generation_kwargs(self) -> dict:
        """Keyword arguments for generate: the prompt's template options, and sampling settings only when sampling."""
        options = {"do_sample": self.do_sample, "enable_thinking": self.thinking_mode()}
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        return options

    def recorded_settings(self) -> PromptSettings | None:
        """How the model was trained to be asked: the adapter's run_config.json, or a merged folder's record."""
        if not hasattr(self, "_recorded"):
            self._recorded = recorded_prompt_settings(self.adapter_path or self.model_path)
        return self._recorded

    def thinking_mode(self) -> bool:
        """Prompt as training did: --enable_thinking if given, else the recorded setting (False without one)."""
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool(self.recorded_settings() and self.recorded_settings().enable_thinking)

    def system_prompt(self) -> str | None:
        """--system if given, else the recorded training system prompt (None: the chat template's default)."""
        return self.system or (self.recorded_settings() or PromptSettings()).system_prompt

    def read_records(self) -> list[dict]:
        """--data_path's records, read with the --*_field flags, else the field map and format training recorded."""
        return read_records_as_trained(self.data_path, self, self.recorded_settings())


def parse_inference_args(argv: list[str] | None = None) -> InferenceArguments:
    """The flags, parsed once and checked (types, choices and ``__post_init__``'s sentences) before any model loads."""
    (args,) = parse_command_flags("inference", lambda: dataclass_parser(InferenceArguments), argv)
    return args


def load_for_command(args: InferenceArguments):
    """The model the flags ask for: base + adapter, or the base alone when no --adapter_path is given."""
    from .models.adapters import load_base_for_inference, load_model_with_adapter

    if args.adapter_path:
        return load_model_with_adapter(args.adapter_path, args.model_path, args.load_in_4bit)
    return load_base_for_inference(args.model_path or "tiny", bool(args.load_in_4bit))


def run_evaluation(args: InferenceArguments, model, tokenizer, records: list[dict] | None = None) -> None:
    """Answer every record of --data_path, write --output_file (JSON lines, whole or not at all), print the scores and the speed."""
    from .models.generation import generate_timed, total_seconds

    records = (records if records is not None else args.read_records())[: args.max_records]
    rows = generate_timed(model, tokenizer, records, args.max_new_tokens, args.batch_size, progress=True, **args.generation_kwargs())
    output = Path(args.output_file)
    atomic_write_text(output, "".join(json.dumps(prediction_line(record, row), ensure_ascii=False) + "\n" for record, row in zip(records, rows)))
    seconds = total_seconds(rows)
    new_tokens = sum(row["new_tokens"] for row in rows)
    print(format_table(scores_by_task(records, [row["prediction"] for row in rows], [row["tool_calls"] for row in rows])))
    print(f"{len(records)} predictions written to {output}; {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tokens/s at batch {args.batch_size})")


def prediction_line(record: dict, row: dict) -> dict:
    """One line of --output_file: the record, then the prediction (``tool_calls``: the calls it made; the answer's own are
    ``reference_tool_calls``, in the same ``{"name", "arguments"}`` form)."""
    reference = {"reference_tool_calls": reference_tool_calls(record)} if record.get("tool_calls") else {}
    return {**{key: value for key, value in record.items() if key != "tool_calls"}, **reference, **row}



@command_boundary
def main(argv: list[str] | None = None) -> int:
    """Entry point: one answer (--instruction) or an evaluation file (--data_path)."""
    args = parse_inference_args(argv)
    check_inference_inputs(args)  # output file, model folder, adapter files: before any model loads
    records = args.read_records() if args.data_path else None  # a bad data file is reported before loading too
    model, tokenizer = load_for_command(args)
    if args.instruction:
        from .models.generation import generate_answers

        system = args.system_prompt()
        record = {"instruction": args.instruction, "input": args.input, **({"system": system} if system else {})}
        answer = generate_answers(model, tokenizer, [record], args.max_new_tokens, 1, **args.generation_kwargs())[0]
        print(answer["text"] if answer["text"] or answer["tool_calls"] else "(empty answer: the model ended its turn with <|im_end|> at once)")
        if answer["tool_calls"]:
            print("tool calls: " + json.dumps(answer["tool_calls"], ensure_ascii=False))
        return 0
    run_evaluation(args, model, tokenizer, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

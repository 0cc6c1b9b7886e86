"""One path for the data: load and validate records, format them as chat, tokenise with label masks, collate.

    JSON/JSONL records ──load_records──▶ validated records ──build_messages──▶ chat messages
       ──apply_chat_template + mask──▶ input_ids / labels (-100 on the prompt) ──collator──▶ batches

Training, evaluation and inference all format prompts with :func:`format_prompt`, built on the
tokenizer's own chat template, so there is exactly one prompt format in the kit.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .errors import KitError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
OverflowPolicy = Literal["drop", "truncate_prompt"]


class DataValidationError(KitError, ValueError):
    """A data file or record that cannot be used, with the file, record and field named."""


@dataclass(frozen=True)
class FieldMap:
    """Which keys of a record hold the instruction, the optional input, the output and the optional system prompt.

    Other schemas (``{"question": ..., "answer": ...}``) map onto the kit's by naming fields, not editing code.
    """

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"


def _read_json_or_jsonl(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if not stripped:
        raise DataValidationError(f"{path}: the file is empty. Expected a JSON array of records or JSON Lines.")
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataValidationError(
                f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}. "
                "Fix the file (a JSON array of objects) or save it as JSON Lines, one object per line."
            ) from None
        return data
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataValidationError(
                f"{path}: malformed JSON on line {line_number}, column {error.colno}: {error.msg}. "
                "Each line of a JSON Lines file must be one complete JSON object."
            ) from None
    return records


def load_records(
    source: str | os.PathLike | Iterable[dict],
    fields: FieldMap = FieldMap(),
) -> list[dict]:
    """Load a JSON array, a JSONL file or a list of dicts, and validate every record.

    Returns records with the kit's keys (``instruction``, ``input``, ``output`` and ``system`` when
    present); unknown extra fields are kept as they are. Raises :class:`DataValidationError` naming
    the file, the record index and the field for anything that cannot be trained on.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataValidationError(f"{path}: no such data file. Check --data_path (paths are relative to {Path.cwd()}).")
        raw, where = _read_json_or_jsonl(path), str(path)
    else:
        raw, where = list(source), "records"
    if not isinstance(raw, list):
        raise DataValidationError(f"{where}: expected a JSON array of records, found a {type(raw).__name__}.")
    if not raw:
        raise DataValidationError(f"{where}: no records found.")
    return [_validate_record(record, index, where, fields) for index, record in enumerate(raw)]


def _validate_record(record: Any, index: int, where: str, fields: FieldMap) -> dict:
    if not isinstance(record, dict):
        raise DataValidationError(f"{where}, record {index}: expected an object, found {type(record).__name__}: {record!r:.80}.")
    required = {"instruction": fields.instruction, "output": fields.output}
    optional = {"input": fields.input, "system": fields.system}
    for key, name in required.items():
        if name not in record:
            raise DataValidationError(
                f"{where}, record {index}: missing field '{name}'. Found fields {sorted(record)}; "
                f"if your file names it differently, pass --{key}_field NAME."
            )
    for name in [*required.values(), *optional.values()]:
        if name in record and not isinstance(record[name], str):
            raise DataValidationError(
                f"{where}, record {index}, field '{name}': expected a string, found {type(record[name]).__name__} ({record[name]!r:.60})."
            )
    if not record[fields.instruction].strip():
        raise DataValidationError(f"{where}, record {index}, field '{fields.instruction}': the instruction is empty.")
    if not record[fields.output].strip():
        raise DataValidationError(
            f"{where}, record {index}, field '{fields.output}': the output is empty, so there is nothing to learn. "
            "Fill it in or remove the record."
        )
    renamed = {key: record[name] for key, name in {**required, **optional}.items() if name in record}
    extra = {key: value for key, value in record.items() if key not in {*required.values(), *optional.values()}}
    return {"input": "", **extra, **renamed}


def build_messages(record: dict, with_response: bool = True) -> list[dict]:
    """Turn one record into chat messages: optional system, user (instruction + input), assistant (output)."""
    user = record["instruction"] if not record.get("input") else f"{record['instruction']}\n{record['input']}"
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages.append({"role": "user", "content": user})
    if with_response:
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def format_prompt(tokenizer, record: dict) -> str:
    """The prompt text for a record, up to and including ``<|im_start|>assistant\\n``: the one prompt format."""
    return tokenizer.apply_chat_template(build_messages(record, with_response=False), tokenize=False, add_generation_prompt=True)


def tokenize_example(tokenizer, record: dict, max_length: int | None = None, overflow: OverflowPolicy = "drop") -> dict | None:
    """Tokenise one record for training: ``input_ids``, ``attention_mask`` and ``labels``.

    Masking is by character position, not by token id: every token that starts before the response
    gets label -100, the response tokens and the closing ``<|im_end|>`` keep theirs, and the template's
    trailing newline is dropped. Returns None when the record is too long and ``overflow="drop"``.
    """
    example = _encode_with_labels(tokenizer, record)
    return example if max_length is None else _fit_to_length(example, max_length, overflow)


def _encode_with_labels(tokenizer, record: dict) -> dict:
    prompt = format_prompt(tokenizer, record)
    full = tokenizer.apply_chat_template(build_messages(record), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("The chat template renders the prompt differently with and without the answer; cannot mask it.")
    response_end = full.index(tokenizer.eos_token, len(prompt)) + len(tokenizer.eos_token)
    encoding = tokenizer(full[:response_end], add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX if start < len(prompt) else token for token, (start, _) in zip(input_ids, encoding["offset_mapping"])]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def _fit_to_length(example: dict, max_length: int, overflow: OverflowPolicy) -> dict | None:
    """Apply the overflow policy: the example as is, its prompt cut from the start, or None (dropped)."""
    input_ids, labels = example["input_ids"], example["labels"]
    if len(input_ids) <= max_length:
        return example
    response_length = len(input_ids) - labels.count(IGNORE_INDEX)
    if overflow == "drop" or response_length >= max_length:
        return None
    # Keep the end of the prompt (it ends with "<|im_start|>assistant\n", which the answer must follow).
    cut = len(input_ids) - max_length
    return {"input_ids": input_ids[cut:], "attention_mask": [1] * max_length, "labels": labels[cut:]}


@dataclass
class TokenizedData:
    """A tokenised dataset plus the report of what happened to over-long records."""

    dataset: Any  # datasets.Dataset with input_ids / attention_mask / labels
    kept: int
    dropped: list[int] = field(default_factory=list)
    truncated: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept} examples"]
        if self.dropped:
            parts.append(f"{len(self.dropped)} longer than max_length dropped (records {self.dropped[:10]}{'…' if len(self.dropped) > 10 else ''})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated on the prompt side")
        return ", ".join(parts)


def tokenize_records(tokenizer, records: list[dict], max_length: int, overflow: OverflowPolicy = "drop") -> TokenizedData:
    """Tokenise every record into a ``datasets.Dataset``; over-long records are dropped or truncated, and counted."""
    from datasets import Dataset

    rows, dropped, truncated = [], [], 0
    for index, record in enumerate(records):
        full = _encode_with_labels(tokenizer, record)
        example = _fit_to_length(full, max_length, overflow)
        if example is None:
            dropped.append(index)
            continue
        truncated += example is not full
        rows.append(example)
    if not rows:
        raise DataValidationError(
            f"Every record is longer than max_length={max_length} tokens. Raise --max_length or shorten the data."
        )
    return TokenizedData(Dataset.from_list(rows), kept=len(rows), dropped=dropped, truncated=truncated)


def load_dataset_for_training(tokenizer, path, max_length: int, overflow: OverflowPolicy = "drop", fields: FieldMap = FieldMap()) -> TokenizedData:
    """Load, validate and tokenise a data file in one call (what the training commands use)."""
    return tokenize_records(tokenizer, load_records(path, fields), max_length, overflow)


def make_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Dynamic padding: pad each batch to its longest example (never to max_length); labels padded with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of)


def length_stats(dataset) -> dict:
    """Token-length statistics of a tokenised dataset: count, min, mean, median, p95, max, trained tokens."""
    import numpy as np

    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    trained = sum(sum(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"])
    return {
        "examples": int(lengths.size),
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "trained_tokens": int(trained),
        "total_tokens": int(lengths.sum()),
    }


def label_set(records: list[dict], max_labels: int = 20) -> list[str] | None:
    """The sorted label set when the records look like classification (few distinct, repeated outputs), else None."""
    counts = Counter(record["output"].strip() for record in records)
    if len(counts) <= min(max_labels, max(2, len(records) // 4)) and min(counts.values()) >= 2:
        return sorted(counts)
    return None

"""Preference pairs for DPO: ``{"prompt" | "messages", "chosen", "rejected"}`` records, checked and tokenised
the kit's way.

    record ──validate_preference──▶ two kit records (prompt turns + chosen answer, + rejected answer)
       ──tokenize_preference──▶ prompt_ids / chosen_ids / rejected_ids (what TRL's DPO collator reads)

The prompt is the kit's one prompt format (:func:`qwen_helpers.data.encoding.format_prompt`, Qwen3 ``enable_thinking``
honoured) and each answer is exactly the span SFT trains: its content and the closing ``<|im_end|>``. TRL's own
preparation would render the prompt again and append the tokenizer's eos (``<|endoftext|>`` on base checkpoints),
so the kit hands TRL tokens it has already made (see :class:`qwen_helpers.training.dpo.KitDPOTrainer`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .encoding import tokenize_example, tokenize_prompt
from .raw_text import refuse_raw_text
from .records import DataValidationError, read_raw_records, validate_record


def _answer_messages(value, key: str, at: str) -> list[dict]:
    """``chosen``/``rejected`` as assistant messages: a string, or TRL's list of one assistant message."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if (
        isinstance(value, list)
        and len(value) == 1
        and isinstance(value[0], dict)
        and value[0].get("role") == "assistant"
        and isinstance(value[0].get("content"), str)
    ):
        return [{key_: text for key_, text in value[0].items() if key_ in ("role", "content", "reasoning_content")}]
    raise DataValidationError(
        f"{at}: '{key}' must be a string or a list of one assistant message "
        f'[{{"role": "assistant", "content": ...}}], found {value!r:.80}.'
    )


def prompt_messages(record: dict, at: str) -> list[dict]:
    """The turns before the answers: ``prompt`` as a string or message list (TRL), or ``messages`` (the kit's name)."""
    if "prompt" in record and "messages" in record:
        raise DataValidationError(
            f"{at}: has both 'prompt' and 'messages'; keep one of them for the turns before the answers."
        )
    prompt = record.get("prompt", record.get("messages"))
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise DataValidationError(
        f"{at}: expected 'prompt' (a non-empty string or message list) or 'messages' "
        f"with the turns before the answers, "
        f"found fields {sorted(record)}."
    )


def validate_preference(record, index: int, where: str) -> dict:
    """One raw preference record as ``{"chosen": kit record, "rejected": kit record}``, or a one-line error."""
    at = f"{where}, record {index}"
    if not isinstance(record, dict):
        raise DataValidationError(
            f"{at}: expected an object with prompt, chosen and rejected, found {type(record).__name__}."
        )
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise DataValidationError(
            f"{at}: missing {' and '.join(repr(key) for key in missing)}; a preference record needs "
            "a prompt (or messages), the preferred answer 'chosen' and the worse one 'rejected'."
        )
    prompt = prompt_messages(record, at)
    pair = {}
    for key in ("chosen", "rejected"):
        messages = prompt + _answer_messages(record[key], key, at)
        pair[key] = validate_record({"messages": messages}, index, f"{where} ({key})", "messages")
    if pair["chosen"]["output"].strip() == pair["rejected"]["output"].strip():
        raise DataValidationError(
            f"{at}: 'chosen' and 'rejected' are the same answer, so there is no preference to learn."
        )
    return pair


def load_preference_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSON array or JSONL preference file, checked (see :func:`validate_preference`)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            f"{path}: no such preference file. Check --data_path (paths are relative to {Path.cwd()})."
        )
    refuse_raw_text(path, "preference records: a prompt (or messages), a chosen and a rejected answer; data/preference.json shows them")
    pairs = [validate_preference(record, index, str(path)) for index, record in enumerate(read_raw_records(path))]
    if not pairs:
        raise DataValidationError(f"{path}: no records found.")
    return pairs


def tokenize_pair(tokenizer, pair: dict, enable_thinking: bool = False) -> dict:
    """``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` of a pair: the kit's prompt, then each trained span."""
    prompt_ids = tokenize_prompt(tokenizer, pair["chosen"], enable_thinking)
    row = {"prompt_ids": prompt_ids}
    for key in ("chosen", "rejected"):
        input_ids = tokenize_example(tokenizer, pair[key], enable_thinking=enable_thinking)["input_ids"]
        if input_ids[: len(prompt_ids)] != prompt_ids:
            raise DataValidationError(
                f"the chat template renders the prompt of a '{key}' answer differently from the prompt "
                "alone, so DPO cannot score the answer after the inference prompt; use a Qwen checkpoint's template."
            )
        row[f"{key}_ids"] = input_ids[len(prompt_ids) :]
    return row


def tokenize_preference(tokenizer, pairs: list[dict], max_length: int, enable_thinking: bool = False):
    """A ``datasets.Dataset`` of tokenised pairs, dropping those whose prompt + longer answer exceed ``max_length``.

    Returns (dataset, number dropped).
    """
    from datasets import Dataset

    rows = [tokenize_pair(tokenizer, pair, enable_thinking) for pair in pairs]
    kept = [
        row
        for row in rows
        if len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
    ]
    if not kept:
        raise DataValidationError(
            f"every preference pair is longer than --max_length {max_length} tokens; raise --max_length."
        )
    return Dataset.from_list(kept), len(rows) - len(kept)

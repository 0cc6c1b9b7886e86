"""One path for the data: load and validate records, render them with the checkpoint's chat template, tokenise with label masks, collate.

    JSON/JSONL records (alpaca | messages | sharegpt) ──load_records──▶ validated records
       ──build_messages──▶ chat turns ──render_conversation──▶ text + trained spans (from the template's own renderings)
       ──tokenise (special-token text in data stays text)──▶ input_ids / labels ──collator──▶ batches

Training, evaluation and inference all format prompts with :func:`format_prompt`, built on the
tokenizer's own chat template with the same options (Qwen3: ``enable_thinking``), so there is exactly
one prompt format in the kit.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from .errors import KitError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
OverflowPolicy = Literal["drop", "truncate_prompt"]


class DataValidationError(KitError, ValueError):
    """A data file or record that cannot be used, with the file, record and field named."""


DataFormat = Literal["auto", "alpaca", "messages", "sharegpt"]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
REASONING_FIELDS = ("reasoning_content", "reasoning")  # where records carry an answer's reasoning (Qwen3 thinking mode)


@dataclass(frozen=True)
class FieldMap:
    """Which keys of a record hold the instruction, the optional input, the output and the optional system prompt.

    Other schemas (``{"question": ..., "answer": ...}``) map onto the kit's by naming fields, not editing code.
    """

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"


class _DuplicateKeys(dict):
    """A JSON object in which some key appeared more than once (kept to report, never to train on)."""

    duplicates: list[str]


def _object_without_duplicates(pairs):
    counts = Counter(key for key, _ in pairs)
    result = dict(pairs)
    duplicates = [key for key, count in counts.items() if count > 1]
    if duplicates:
        result = _DuplicateKeys(result)
        result.duplicates = duplicates
    return result


def _duplicate_key(value) -> str | None:
    """The first key that appears twice in ``value`` or anything nested in it, else None."""
    if isinstance(value, _DuplicateKeys):
        return value.duplicates[0]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((key for child in children if (key := _duplicate_key(child))), None)


def _read_json_or_jsonl(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataValidationError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}). Convert it first, e.g. "
            f"`iconv -f GBK -t UTF-8 {path} > {path.with_suffix('.utf8' + path.suffix)}` for a file saved in GBK."
        ) from None
    stripped = text.lstrip()
    if not stripped:
        raise DataValidationError(f"{path}: the file is empty. Expected a JSON array of records or JSON Lines.")
    if stripped.startswith("["):
        try:
            data = json.loads(text, object_pairs_hook=_object_without_duplicates)
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
            records.append(json.loads(line, object_pairs_hook=_object_without_duplicates))
        except json.JSONDecodeError as error:
            raise DataValidationError(
                f"{path}: malformed JSON on line {line_number}, column {error.colno}: {error.msg}. "
                "Each line of a JSON Lines file must be one complete JSON object."
            ) from None
    return records


def detect_format(record: Any) -> str:
    """The record format of a file, from its first record: ``messages``, ``sharegpt`` (``conversations``) or ``alpaca``."""
    if isinstance(record, dict) and "messages" in record:
        return "messages"
    if isinstance(record, dict) and "conversations" in record:
        return "sharegpt"
    return "alpaca"


def load_records(
    source: str | os.PathLike | Iterable[dict],
    fields: FieldMap = FieldMap(),
    data_format: DataFormat = "auto",
) -> list[dict]:
    """Load a JSON array, a JSONL file or a list of dicts, and validate every record.

    Three formats, detected from the first record unless ``data_format`` forces one: alpaca
    (``instruction``, ``input``, ``output``, ``system``), ``{"messages": [{"role", "content"}]}`` and
    ShareGPT ``{"conversations": [{"from", "value"}]}``. Every record comes back with the kit's keys:
    ``output`` (the last assistant turn: the reference answer), ``instruction`` and ``input`` (the last
    user turn, for display), ``reasoning`` when the answer carries one, and, for multi-turn formats,
    ``messages``: every turn before the answer. Unknown extra fields are kept. Anything that cannot be
    trained on raises :class:`DataValidationError` naming the file, the record index and what is wrong.
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
    file_format = detect_format(raw[0]) if data_format == "auto" else data_format
    records = []
    for index, record in enumerate(raw):
        if (key := _duplicate_key(record)) is not None:
            raise DataValidationError(
                f"{where}, record {index}: the key '{key}' appears twice, so one of its values would be silently lost. Keep one."
            )
        if file_format == "alpaca":
            records.append(_validate_alpaca(record, index, where, fields))
        else:
            records.append(_validate_conversation(record, index, where, file_format))
    if file_format == "alpaca":
        _check_mapped_fields_exist(raw, where, fields)
    return records


def _check_mapped_fields_exist(raw: list[dict], where: str, fields: FieldMap) -> None:
    """A renamed optional field (``--input_field``, ``--system_field``) that no record has is a typo, not an absence."""
    defaults = FieldMap()
    for flag, name, default in (("input", fields.input, defaults.input), ("system", fields.system, defaults.system)):
        if name != default and not any(name in record for record in raw):
            found = sorted({key for record in raw for key in record})
            raise DataValidationError(
                f"{where}: --{flag}_field {name}: no record has a field '{name}'. Fields found: {found}. Fix the flag or drop it."
            )


def _validate_alpaca(record: Any, index: int, where: str, fields: FieldMap) -> dict:
    if not isinstance(record, dict):
        raise DataValidationError(f"{where}, record {index}: expected an object, found {type(record).__name__}: {record!r:.80}.")
    required = {"instruction": fields.instruction, "output": fields.output}
    optional = {"input": fields.input, "system": fields.system}
    for key, name in required.items():
        if name not in record:
            raise DataValidationError(
                f"{where}, record {index}: missing field '{name}'. Found fields {sorted(record)}; "
                f"if your file names it differently, pass --{key}_field NAME (or --data_format messages|sharegpt for chat records)."
            )
    for name in [*required.values(), *optional.values(), *REASONING_FIELDS]:
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
    extra = {key: value for key, value in record.items() if key not in {*required.values(), *optional.values(), *REASONING_FIELDS}}
    result = {"input": "", **extra, **renamed}
    reasoning = next((record[name] for name in REASONING_FIELDS if record.get(name)), None)
    if reasoning is None:
        reasoning, result["output"] = split_reasoning(result["output"])
    if reasoning:
        result["reasoning"] = reasoning
    return result


def _validate_conversation(record: Any, index: int, where: str, file_format: str) -> dict:
    """Check one messages/ShareGPT record and split it into the turns before the answer and the answer."""
    key, role_key, text_key = ("messages", "role", "content") if file_format == "messages" else ("conversations", "from", "value")
    at = f"{where}, record {index}"
    if not isinstance(record, dict):
        raise DataValidationError(f"{at}: expected an object, found {type(record).__name__}: {record!r:.80}.")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataValidationError(
            f"{at}: expected a non-empty list under '{key}' ({file_format} format). Found fields {sorted(record)}; "
            f"pass --data_format alpaca|messages|sharegpt if the file is in another format."
        )
    if file_format == "messages" and isinstance(record.get("output"), str) and turns[-1].get("role") != "assistant":
        # the kit's own form (load_records' output written back to a file): the turns before the answer, then "output"
        answer = {"role": "assistant", "content": record["output"], "reasoning_content": record.get("reasoning")}
        turns = [*turns, {key: value for key, value in answer.items() if value is not None}]
    messages = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataValidationError(f"{at}, turn {position}: expected an object with '{role_key}' and '{text_key}', found {turn!r:.80}.")
        role = turn[role_key] if file_format == "messages" else SHAREGPT_ROLES.get(turn[role_key], turn[role_key])
        if role not in ROLES:
            allowed = ROLES if file_format == "messages" else sorted(SHAREGPT_ROLES)
            raise DataValidationError(f"{at}, turn {position}: unknown role {turn[role_key]!r}; the roles this kit trains on are {', '.join(allowed)}.")
        if not isinstance(turn[text_key], str):
            raise DataValidationError(f"{at}, turn {position}: '{text_key}' must be a string, found {type(turn[text_key]).__name__}.")
        message = {"role": role, "content": turn[text_key]}
        if role == "assistant":
            reasoning = next((turn[name] for name in REASONING_FIELDS if isinstance(turn.get(name), str) and turn[name]), None)
            if reasoning is None:
                reasoning, message["content"] = split_reasoning(message["content"])
            if reasoning:
                message["reasoning_content"] = reasoning
            if not message["content"].strip():
                raise DataValidationError(f"{at}, turn {position}: the assistant turn is empty, so there is nothing to learn. Fill it in or remove it.")
        messages.append(message)
    _check_turn_order(messages, at)
    *history, answer = messages
    last_user = history[-1]["content"]
    extra = {name: value for name, value in record.items() if name not in (key, "instruction", "input", "output", "reasoning")}
    result = {**extra, "messages": history, "instruction": last_user, "input": "", "output": answer["content"]}
    if answer.get("reasoning_content"):
        result["reasoning"] = answer["reasoning_content"]
    return result


def _check_turn_order(messages: list[dict], at: str) -> None:
    """An optional system turn first, then user and assistant turns alternating, ending with the assistant's answer."""
    roles = [message["role"] for message in messages]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[: len(body)] or body[-1] != "assistant":
        raise DataValidationError(
            f"{at}: turn order {' -> '.join(roles)} cannot be rendered by a Qwen chat template for training: it must be "
            "an optional system turn, then user and assistant turns alternating, ending with an assistant turn."
        )


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split ``<think>reasoning</think>answer`` into (reasoning, answer); (None, text) when there is no think block.

    Used on records (an answer that carries its reasoning inline) and on Qwen3 predictions, whose
    reasoning goes to a separate field so metrics compare answers only.
    """
    stripped = text.lstrip()
    if not stripped.startswith("<think>") or "</think>" not in stripped:
        return None, text
    reasoning, _, answer = stripped[len("<think>"):].partition("</think>")
    return reasoning.strip("\n"), answer.lstrip("\n")


def build_messages(record: dict, with_response: bool = True, enable_thinking: bool = False) -> list[dict]:
    """The chat messages of a record: its earlier turns (or system + user from an alpaca record), then the answer.

    ``enable_thinking=False`` drops every reasoning (Qwen3's non-thinking mode); with True, assistant
    turns carry it as ``reasoning_content`` for the template to render (or drop, for earlier turns).
    """
    if "messages" in record:
        messages = [dict(message) for message in record["messages"]]
    else:
        user = record["instruction"] if not record.get("input") else f"{record['instruction']}\n{record['input']}"
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages.append({"role": "user", "content": user})
    if with_response:
        answer = {"role": "assistant", "content": record["output"]}
        if record.get("reasoning"):
            answer["reasoning_content"] = record["reasoning"]
        messages.append(answer)
    for message in messages:
        if message["role"] == "assistant":
            message["content"] = message["content"].lstrip("\n")  # as Qwen3's template does; keeps data and scaffolding apart
            if not enable_thinking:
                message.pop("reasoning_content", None)
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, enable_thinking: bool) -> str:
    """The checkpoint's own chat template applied to ``messages`` (``enable_thinking`` is read by Qwen3's, ignored by others)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
    )


def format_prompt(tokenizer, record: dict, enable_thinking: bool = False) -> str:
    """The prompt text for a record: every turn before the answer, then the template's generation prompt.

    The one prompt format: training renders the same turns the same way, so the model is asked exactly
    as it was taught (Qwen3: ``enable_thinking=False`` ends the prompt with an empty think block).
    """
    return _render(tokenizer, build_messages(record, with_response=False), True, enable_thinking)


# Private-use characters that mark where each message's text sits in the rendered template, so data can be
# told from scaffolding: "\ue000c3\ue002" opens the content of message 3, "\ue001c3\ue002" closes it.
_OPEN, _CLOSE, _END = "\ue000", "\ue001", "\ue002"
_MARK = re.compile(f"([{_OPEN}{_CLOSE}])([cr]\\d+){_END}")


@dataclass
class RenderedConversation:
    """A conversation rendered by its chat template: the text, where the data lies in it, and which spans are trained."""

    text: str
    data_spans: list[tuple[int, int]]  # message contents (tokenised as plain text: special-token text stays text)
    trained_spans: list[tuple[int, int]]  # each assistant turn's content (and reasoning) and its closing token


def _marked(messages: list[dict]) -> list[dict]:
    marked = []
    for position, message in enumerate(messages):
        message = dict(message)
        message["content"] = f"{_OPEN}c{position}{_END}{message['content']}{_CLOSE}c{position}{_END}"
        if message.get("reasoning_content"):
            message["reasoning_content"] = f"{_OPEN}r{position}{_END}{message['reasoning_content']}{_CLOSE}r{position}{_END}"
        marked.append(message)
    return marked


def _unmark(text: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """Remove the markers; return the plain text and each marked field's (start, end) in it."""
    plain, spans, opened, last = [], {}, {}, 0
    length = 0
    for match in _MARK.finditer(text):
        piece = text[last:match.start()]
        plain.append(piece)
        length += len(piece)
        kind, tag = match.groups()
        if kind == _OPEN:
            opened[tag] = length
        else:
            spans[tag] = (opened.pop(tag), length)
        last = match.end()
    plain.append(text[last:])
    return "".join(plain), spans


def render_conversation(tokenizer, messages: list[dict], enable_thinking: bool = False) -> RenderedConversation:
    """Render a whole conversation and find, from the template's own renderings, the trained span of every assistant turn.

    For assistant turn i: the conversation before it rendered alone must be a prefix of the whole; the
    turn starts there with the template's generation prompt (or, where the template renders earlier turns
    without part of it, as Qwen3 drops their empty think block, with that prompt's first lines); it ends
    after its content and the closing text the template writes after the last answer, trailing newline
    excluded. Nothing is found by searching for a token.
    """
    text = _render(tokenizer, messages, False, enable_thinking)
    marked_text, fields = _unmark(_render(tokenizer, _marked(messages), False, enable_thinking))
    if marked_text != text:
        raise ValueError(
            "The chat template rewrites message contents (it renders them differently once marked), so the kit cannot tell "
            "data from template text. Use a Qwen chat template, or report the template."
        )
    last_answer = fields.get(f"c{len(messages) - 1}")
    closing = text[last_answer[1]:].rstrip() if last_answer else ""
    if not closing:
        raise ValueError("The chat template writes nothing after an assistant turn, so the model could never learn to stop.")
    trained = []
    for position, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:position], False, enable_thinking)
        prompt = _render(tokenizer, messages[:position], True, enable_thinking)
        content = fields.get(f"c{position}")
        if not text.startswith(before) or not prompt.startswith(before) or content is None:
            raise ValueError(f"The chat template renders turn {position} differently inside the conversation; cannot mark its trained tokens.")
        header = _turn_header(text[len(before):], prompt[len(before):])
        end = content[1] + len(closing)
        if header is None or text[content[1]:end] != closing:
            raise ValueError(f"The chat template renders assistant turn {position} in an unexpected shape; cannot mark its trained tokens.")
        trained.append((len(before) + len(header), end))
    return RenderedConversation(text, sorted(fields.values()), trained)


def _turn_header(turn: str, generation_prompt: str) -> str | None:
    """The scaffolding that opens an assistant turn: the generation prompt, or its longest run of whole lines the turn starts with."""
    if turn.startswith(generation_prompt):
        return generation_prompt
    lines = generation_prompt.splitlines(keepends=True)
    for count in range(len(lines) - 1, 0, -1):
        header = "".join(lines[:count])
        if header.endswith("\n") and turn.startswith(header):
            return header
    return None


def _tokenize_pieces(tokenizer, text: str, data_spans, trained_spans) -> tuple[list[int], list[int]]:
    """Token ids and labels: data pieces with special-token splitting (written ``<|im_end|>`` stays text), scaffolding as is."""
    cuts = sorted({0, len(text), *(p for span in data_spans for p in span), *(p for span in trained_spans for p in span)})
    pieces = [(start, end) for start, end in zip(cuts, cuts[1:]) if end > start]
    is_data = [any(a <= start and end <= b for a, b in data_spans) for start, end in pieces]
    is_trained = [any(a <= start and end <= b for a, b in trained_spans) for start, end in pieces]
    data_texts = [text[start:end] for (start, end), data in zip(pieces, is_data) if data]
    template_texts = [text[start:end] for (start, end), data in zip(pieces, is_data) if not data]
    data_ids = iter(tokenizer(data_texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if data_texts else [])
    template_ids = iter(tokenizer(template_texts, add_special_tokens=False)["input_ids"] if template_texts else [])
    input_ids, labels = [], []
    for data, trained in zip(is_data, is_trained):
        ids = next(data_ids) if data else next(template_ids)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def tokenize_prompt(tokenizer, record: dict, enable_thinking: bool = False) -> list[int]:
    """The prompt's token ids, tokenised exactly as training tokenises the same text (special-token text in data stays text)."""
    messages = build_messages(record, with_response=False)
    text = _render(tokenizer, messages, True, enable_thinking)
    marked_text, fields = _unmark(_render(tokenizer, _marked(messages), True, enable_thinking))
    data_spans = sorted(fields.values()) if marked_text == text else []
    return _tokenize_pieces(tokenizer, text, data_spans, [])[0]


def tokenize_example(tokenizer, record: dict, max_length: int | None = None, overflow: OverflowPolicy = "drop",
                     enable_thinking: bool = False) -> dict | None:
    """Tokenise one record for training: ``input_ids``, ``attention_mask`` and ``labels``.

    Every assistant turn's tokens and its closing ``<|im_end|>`` keep their labels; everything else
    (system and user turns, template scaffolding, the newline after ``<|im_end|>``, Qwen3's empty
    think block in non-thinking mode) gets -100. Returns None when the record is too long and ``overflow="drop"``.
    """
    example = _encode_with_labels(tokenizer, record, enable_thinking)
    return example if max_length is None else _fit_to_length(example, max_length, overflow)


def _encode_with_labels(tokenizer, record: dict, enable_thinking: bool = False) -> dict:
    rendered = render_conversation(tokenizer, build_messages(record, enable_thinking=enable_thinking), enable_thinking)
    end = rendered.trained_spans[-1][1]  # the template's newline after the last <|im_end|> is not trained, nor kept
    data_spans = [(start, min(stop, end)) for start, stop in rendered.data_spans if start < end]
    input_ids, labels = _tokenize_pieces(tokenizer, rendered.text[:end], data_spans, rendered.trained_spans)
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


def tokenize_records(tokenizer, records: list[dict], max_length: int, overflow: OverflowPolicy = "drop",
                     enable_thinking: bool = False) -> TokenizedData:
    """Tokenise every record into a ``datasets.Dataset``; over-long records are dropped or truncated, and counted."""
    from datasets import Dataset

    rows, dropped, truncated = [], [], 0
    for index, record in enumerate(records):
        try:
            full = _encode_with_labels(tokenizer, record, enable_thinking)
        except ValueError as error:
            raise DataValidationError(f"record {index}: {error}") from None
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


def load_dataset_for_training(tokenizer, path, max_length: int, overflow: OverflowPolicy = "drop", fields: FieldMap = FieldMap(),
                              data_format: DataFormat = "auto", enable_thinking: bool = False) -> TokenizedData:
    """Load, validate and tokenise a data file in one call (what the training commands use)."""
    records = load_records(path, fields, data_format)
    try:
        return tokenize_records(tokenizer, records, max_length, overflow, enable_thinking)
    except DataValidationError as error:
        raise DataValidationError(f"{path}, {error}") from None


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def is_base_checkpoint(tokenizer) -> bool:
    """True for a base (pre-trained only) Qwen: its eos is not ``<|im_end|>`` although the vocabulary has it.

    The rule follows the released files: every Qwen1.5/2/2.5/3 base checkpoint sets ``eos_token`` to
    ``<|endoftext|>`` (end of a document), every chat/instruct one to ``<|im_end|>`` (end of a turn).
    A base model's ``<|im_start|>``/``<|im_end|>`` embeddings were never trained.
    """
    vocabulary = tokenizer.get_vocab()
    return all(token in vocabulary for token in CHAT_TOKENS) and tokenizer.eos_token != "<|im_end|>"


def chat_tokens_to_train(tokenizer, train_chat_tokens: bool | None = None) -> tuple[list[int], str | None]:
    """The embedding rows to train besides LoRA (peft ``trainable_token_indices``) and a one-line notice.

    ``None`` (the default) decides from the checkpoint: a base model also learns ``<|im_start|>`` and
    ``<|im_end|>`` (untrained rows are why fine-tuned base models never stop); True/False force it.
    """
    base = is_base_checkpoint(tokenizer)
    train = base if train_chat_tokens is None else train_chat_tokens
    if not train:
        return [], None
    ids = tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS))
    why = f"base checkpoint (eos {tokenizer.eos_token})" if train_chat_tokens is None else "--train_chat_tokens True"
    return ids, f"{why}: also training the embedding rows of {' and '.join(CHAT_TOKENS)} (ids {ids}); --train_chat_tokens False turns this off"


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

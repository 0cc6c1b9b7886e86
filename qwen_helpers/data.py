"""One path for the data: render records with the checkpoint's chat template, tokenise with label masks, collate.

    JSON/JSONL records (alpaca | messages | sharegpt) ──records.load_records──▶ validated records
       ──build_messages──▶ chat turns ──render_conversation──▶ text + trained spans (from the template's own renderings)
       ──tokenise (special-token text in data stays text)──▶ input_ids / labels ──collator──▶ batches

Training, evaluation and inference all format prompts with :func:`format_prompt`, built on the
tokenizer's own chat template with the same options (Qwen3: ``enable_thinking``), so there is exactly
one prompt format in the kit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .records import DataFormat, DataValidationError, FieldMap, load_records

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
OverflowPolicy = Literal["drop", "truncate_prompt"]


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

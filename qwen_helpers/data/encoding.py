"""One path for the data: render records with the checkpoint's chat template, tokenise with label masks, collate.

    JSON/JSONL records (alpaca | messages | sharegpt) ──records.iter_records──▶ validated records
       ──build_messages──▶ chat turns ──chat_spans.render_conversation──▶ text + trained spans (from the template's own renderings)
       ──tokenise (special-token text in data stays text)──▶ input_ids / labels ──collator──▶ batches

Many records go through :func:`tokenize_batch` (a data file through :mod:`qwen_helpers.data.loading`, a list
through :func:`tokenize_records`): one chat-template call and one tokenizer call per batch, each
conversation shape marked once, the same ids and labels as :func:`tokenize_example` gives record by record.

Training, evaluation and inference all format prompts with :func:`format_prompt`, built on the
tokenizer's own chat template with the same options (Qwen3: ``enable_thinking``), so there is exactly
one prompt format in the kit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Literal

from .chat_spans import cut_pieces, fits_skeleton, render, render_conversation, render_prompt, skeleton_of
from .records import DataValidationError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy skips
OverflowPolicy = Literal["drop", "truncate_prompt"]  # truncate_prompt drops whole oldest turns, never part of one


def build_messages(record: dict, with_response: bool = True, enable_thinking: bool = False) -> list[dict]:
    """The chat messages of a record: its earlier turns (or system + user from an alpaca record), then the answer.

    Tool calls stay on their assistant turns (the answer's from ``tool_calls``); the record's ``tools`` are
    passed to the template beside the messages (``record.get("tools")``), never inside them.

    ``enable_thinking=False`` drops every reasoning (Qwen3's non-thinking mode); with True, assistant
    turns carry it as ``reasoning_content`` for the template to render (or drop, for earlier turns).
    """
    if "messages" in record:
        messages = [dict(message) for message in record["messages"]]
    else:
        user = record["instruction"] if not record.get("input") else f"{record['instruction']}\n{record['input']}"
        # an explicitly empty system prompt is an empty system turn, as in messages records; absent: the default
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") is not None else []
        messages.append({"role": "user", "content": user})
    if with_response:
        answer = {"role": "assistant", "content": record["output"]}
        if record.get("reasoning"):
            answer["reasoning_content"] = record["reasoning"]
        if record.get("tool_calls"):
            answer["tool_calls"] = record["tool_calls"]
        messages.append(answer)
    for message in messages:
        if message["role"] == "assistant":
            message["content"] = message["content"].lstrip("\n")  # as Qwen3's template does; keeps data and scaffolding apart
            if not enable_thinking:
                message.pop("reasoning_content", None)
    return messages


def format_prompt(tokenizer, record: dict, enable_thinking: bool = False) -> str:
    """The prompt text for a record: every turn before the answer, then the template's generation prompt.

    The one prompt format: training renders the same turns the same way, so the model is asked exactly
    as it was taught (Qwen3: ``enable_thinking=False`` ends the prompt with an empty think block).
    """
    return render(tokenizer, build_messages(record, with_response=False), True, enable_thinking, record.get("tools"))


def _tokenize_pieces(tokenizer, text: str, data_spans, trained_spans) -> tuple[list[int], list[int]]:
    """Token ids and labels: data pieces with special-token splitting (written ``<|im_end|>`` stays text), scaffolding as is."""
    pieces = cut_pieces(text, data_spans, trained_spans)
    data_texts = [text[start:end] for start, end, data, _ in pieces if data]
    template_texts = [text[start:end] for start, end, data, _ in pieces if not data]
    data_ids = iter(token_ids(tokenizer, data_texts, split_special_tokens=True))
    template_ids = iter(token_ids(tokenizer, template_texts, split_special_tokens=False))
    input_ids, labels = [], []
    for _, _, data, trained in pieces:
        ids = next(data_ids) if data else next(template_ids)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def tokenize_prompt(tokenizer, record: dict, enable_thinking: bool = False) -> list[int]:
    """The prompt's token ids, tokenised exactly as training tokenises the same text (special-token text in data stays text)."""
    text, data_spans = render_prompt(tokenizer, build_messages(record, with_response=False), enable_thinking, record.get("tools"))
    return _tokenize_pieces(tokenizer, text, data_spans, [])[0]


def tokenize_example(tokenizer, record: dict, max_length: int | None = None, overflow: OverflowPolicy = "drop",
                     enable_thinking: bool = False) -> dict | None:
    """Tokenise one record for training: ``input_ids``, ``attention_mask`` and ``labels``.

    Every assistant turn's tokens and its closing ``<|im_end|>`` keep their labels; everything else
    (system and user turns, template scaffolding, the newline after ``<|im_end|>``, Qwen3's empty
    think block in non-thinking mode) gets -100. Returns None when the record is too long and cannot be
    fitted by ``overflow`` (see :func:`fit_to_length`).
    """
    messages = build_messages(record, enable_thinking=enable_thinking)
    example = _encode_messages(tokenizer, messages, enable_thinking, record.get("tools"))
    if max_length is None:
        return example
    return fit_to_length(tokenizer, messages, example, max_length, overflow, enable_thinking, record.get("tools"))


def _encode_with_labels(tokenizer, record: dict, enable_thinking: bool = False) -> dict:
    return _encode_messages(tokenizer, build_messages(record, enable_thinking=enable_thinking), enable_thinking, record.get("tools"))


def renders_reasoning(tokenizer) -> bool:
    """True when the chat template writes an answer's ``reasoning_content`` (Qwen3's does; Qwen2.5's drops it)."""
    cache = _caches.setdefault(tokenizer, {})
    key = ("renders_reasoning", str(tokenizer.chat_template))
    if key not in cache:
        probe = [{"role": "user", "content": "q"},
                 {"role": "assistant", "content": "a", "reasoning_content": "\ue003probe"}]
        cache[key] = "\ue003probe" in render(tokenizer, probe, False, True)
    return cache[key]


def inline_reasoning(tokenizer, messages: list[dict], enable_thinking: bool) -> list[dict]:
    """Thinking mode, a template without a place for reasoning: the answer as ``<think>`` reasoning ``</think>`` answer.

    That is how DeepSeek-R1-distilled Qwen2.5 models are trained, so R1-style data on a Qwen2-architecture
    model keeps its reasoning instead of losing it silently. As Qwen3's template does, only the final
    answer carries it; earlier turns' reasoning is left out. Other cases: ``messages`` as they are.
    """
    reasoning = any("reasoning_content" in message for message in messages)
    if not enable_thinking or not reasoning or renders_reasoning(tokenizer):
        return messages
    *history, last = [{key: value for key, value in message.items() if key != "reasoning_content"} for message in messages]
    if "reasoning_content" in messages[-1]:
        last["content"] = f"<think>\n{messages[-1]['reasoning_content']}\n</think>\n\n{last['content']}"
    return [*history, last]


def _encode_messages(tokenizer, messages: list[dict], enable_thinking: bool, tools: list[dict] | None = None) -> dict:
    """One conversation the reference way: rendered and marked by :func:`render_conversation`, its pieces tokenised."""
    messages = inline_reasoning(tokenizer, messages, enable_thinking)
    rendered = render_conversation(tokenizer, messages, enable_thinking, tools)
    end = rendered.trained_spans[-1][1]  # the template's newline after the last <|im_end|> is not trained, nor kept
    data_spans = [(start, min(stop, end)) for start, stop in rendered.data_spans if start < end]
    input_ids, labels = _tokenize_pieces(tokenizer, rendered.text[:end], data_spans, rendered.trained_spans)
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def fit_to_length(tokenizer, messages: list[dict], example: dict, max_length: int, overflow: OverflowPolicy,
                  enable_thinking: bool = False, tools: list[dict] | None = None) -> dict | None:
    """Apply the overflow policy: the example as is, the conversation without its oldest exchanges, or None (dropped).

    ``truncate_prompt`` keeps whole turns: it drops the oldest exchanges (each from a user turn to the
    next, tool calls and results included; the system turn stays) until the rest fits, so every trained answer still follows its header, the system turn and its
    question. A record whose last exchange alone is too long is dropped, and named in the report.
    """
    if len(example["input_ids"]) <= max_length:
        return example
    if overflow == "drop":
        return None
    system = messages[:1] if messages[0]["role"] == "system" else []
    exchanges = messages[len(system):]  # user, assistant (, tool, assistant ...), user, assistant, ...
    for start in (position for position in range(1, len(exchanges)) if exchanges[position]["role"] == "user"):
        shorter = _encode_messages(tokenizer, system + exchanges[start:], enable_thinking, tools)
        if len(shorter["input_ids"]) <= max_length:
            return shorter
    return None


# ------------------------------------------------------------------------------------------ many records at once

_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per tokenizer: skeletons and template-piece token ids
TOKENIZED_COLUMNS = ("input_ids", "attention_mask", "labels", "record_index", "truncated")  # what tokenize_batch returns
BATCH_SIZE = 1000  # records per tokenisation batch: few calls into the tokenizer, little memory


def encode_conversations(tokenizer, conversations: list[list[dict]], enable_thinking: bool = False, indices=None,
                         tools: list | None = None) -> list[dict]:
    """``input_ids``/``attention_mask``/``labels`` of many conversations, equal to encoding each alone, in a few calls.

    Each conversation is rendered once (one batched chat-template call). Where the rendering is its
    shape's skeleton with the texts filled in, the skeleton's pieces and trained spans apply, and every
    data text of the batch is tokenised in one call (template pieces once per tokenizer). Anything else (a
    template that rewrites a text, an empty text, marker characters in the data) takes the per-record way,
    whose ValueError becomes a DataValidationError naming the record (``indices``: the records' numbers).
    Tool-calling conversations (``tools``: each conversation's function specs, or None) take the per-record way.
    """
    indices = list(range(len(conversations))) if indices is None else list(indices)
    if not conversations:
        return []
    conversations = [inline_reasoning(tokenizer, messages, enable_thinking) for messages in conversations]
    tools = tools or [None] * len(conversations)
    calls_tools = [bool(specs) or any(message["role"] == "tool" or message.get("tool_calls") for message in messages)
                   for messages, specs in zip(conversations, tools)]
    plain = [messages for messages, tooled in zip(conversations, calls_tools) if not tooled]
    cache = _caches.setdefault(tokenizer, {})
    template_key = (str(tokenizer.chat_template), len(tokenizer), enable_thinking)
    try:
        rendered = iter(tokenizer.apply_chat_template(plain, tokenize=False, enable_thinking=enable_thinking) if plain else [])
        texts = [None if tooled else next(rendered) for tooled in calls_tools]
    except Exception:  # a record the template refuses: the per-record way says which
        texts = [None] * len(conversations)
    skeletons, data_texts = [], []
    for messages, text in zip(conversations, texts):
        key = (template_key, tuple((message["role"], "reasoning_content" in message) for message in messages))
        if key not in cache:
            cache[key] = skeleton_of(tokenizer, key[1], enable_thinking)
        skeleton = cache[key] if text is not None and fits_skeleton(cache[key], messages, text) else None
        skeletons.append(skeleton)
        data_texts += [messages[piece[0]][piece[1]] for piece, _ in skeleton.pieces if isinstance(piece, tuple)] if skeleton else []
    data_ids = iter(token_ids(tokenizer, data_texts, split_special_tokens=True))
    examples = []
    for index, messages, skeleton, specs in zip(indices, conversations, skeletons, tools):
        if skeleton is None:
            try:
                examples.append(_encode_messages(tokenizer, messages, enable_thinking, specs))
            except ValueError as error:
                raise DataValidationError(f"record {index}: {error}") from None
            continue
        input_ids, labels = [], []
        for piece, trained in skeleton.pieces:
            if isinstance(piece, tuple):
                ids = next(data_ids)
            elif (ids := cache.get((template_key, piece))) is None:
                ids = cache[(template_key, piece)] = token_ids(tokenizer, [piece], split_special_tokens=False)[0]
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        examples.append({"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels})
    return examples


def token_ids(tokenizer, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False, split_special_tokens=...)["input_ids"]``, from the Rust tokenizer without offsets.

    ``encode_batch_fast`` skips the character offsets transformers' call computes and drops, about a third
    of the tokenising time; a tokenizer without one (or with truncation or padding set) takes transformers' call.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if not texts:
        return []
    if not hasattr(backend, "encode_batch_fast") or backend.truncation or backend.padding:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]
    before, backend.encode_special_tokens = backend.encode_special_tokens, split_special_tokens
    try:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        backend.encode_special_tokens = before


def tokenize_batch(tokenizer, conversations: list[list[dict]], indices, max_length: int, overflow: OverflowPolicy = "drop",
                   enable_thinking: bool = False, tools: list | None = None) -> dict[str, list]:
    """The one tokenisation step, as columns: the examples that fit (or were cut to fit), their ``record_index`` and ``truncated``."""
    columns = {name: [] for name in TOKENIZED_COLUMNS}
    tools = tools or [None] * len(conversations)
    examples = encode_conversations(tokenizer, conversations, enable_thinking, indices, tools)
    for index, messages, full, specs in zip(indices, conversations, examples, tools):
        example = fit_to_length(tokenizer, messages, full, max_length, overflow, enable_thinking, specs)
        if example is not None:
            for name in ("input_ids", "attention_mask", "labels"):
                columns[name].append(example[name])
            columns["record_index"].append(index)
            columns["truncated"].append(example is not full)
    return columns


def tokenized_features():
    """The Arrow types of :func:`tokenize_batch`'s columns (int32 ids: half the disk and cache of Python's default int64)."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "attention_mask": List(Value("int32")), "labels": List(Value("int32")),
                     "record_index": Value("int64"), "truncated": Value("bool")})


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
            parts.append(f"{self.truncated} shortened by dropping their oldest turns")
        return ", ".join(parts)


def tokenized_data(dataset, records: int, max_length: int) -> TokenizedData:
    """The report read from :func:`tokenize_batch`'s columns (records missing from ``record_index`` were dropped), those columns removed."""
    import numpy as np

    if len(dataset) == 0:
        raise DataValidationError(f"Every record is longer than max_length={max_length} tokens. Raise --max_length or shorten the data.")
    kept = np.ones(records, dtype=bool)
    kept[dataset.data.column("record_index").to_numpy()] = False
    truncated = int(dataset.data.column("truncated").to_numpy(zero_copy_only=False).sum())
    dataset = dataset.remove_columns(["record_index", "truncated"])
    return TokenizedData(dataset, kept=len(dataset), dropped=np.flatnonzero(kept).tolist(), truncated=truncated)


def tokenize_records(tokenizer, records: list[dict], max_length: int, overflow: OverflowPolicy = "drop",
                     enable_thinking: bool = False) -> TokenizedData:
    """Tokenise every record into a ``datasets.Dataset``; over-long records are dropped or truncated, and counted.

    The same batches as :func:`qwen_helpers.data.loading.load_dataset_for_training`, for records already in memory.
    """
    from datasets import Dataset

    columns = {name: [] for name in TOKENIZED_COLUMNS}
    for start in range(0, len(records), BATCH_SIZE):
        chunk = records[start:start + BATCH_SIZE]
        batch = tokenize_batch(tokenizer, [build_messages(record, enable_thinking=enable_thinking) for record in chunk],
                               range(start, start + len(chunk)), max_length, overflow, enable_thinking,
                               [record.get("tools") for record in chunk])
        for name, values in batch.items():
            columns[name] += values
    return tokenized_data(Dataset.from_dict(columns, features=tokenized_features()), len(records), max_length)


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

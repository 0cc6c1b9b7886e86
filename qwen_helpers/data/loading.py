"""A data file to a tokenised dataset through 🤗 datasets: validated as it streams, tokenised in batches, cached on disk.

    data file ──records.iter_records (JSON Lines line by line)──▶ Arrow: record_index + chat messages (JSON)  validation pass
        ──Dataset.map(data.tokenize_batch, batched)──▶ Arrow: input_ids / attention_mask / labels            tokenising pass

Both passes write memory-mapped Arrow files in the datasets cache (``$HF_DATASETS_CACHE``, never beside
the data), so memory stays flat in the file's size, and a second run with the same file, tokenizer and
settings reads them back instead of tokenising again. A JSON array file is parsed whole (JSON Lines is
the format for large data). Errors are :mod:`qwen_helpers.data.records`' one-line errors, raised by the
validation pass before any tokenising. Raw text (``--data_format text``) takes :mod:`qwen_helpers.data.raw_text`'s
path instead: the same passes, then a packing pass into fixed-length blocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .encoding import (BATCH_SIZE, OverflowPolicy, TokenizedData, build_messages, renders_reasoning, tokenize_batch, tokenized_data,
                   tokenized_features)
from .fingerprints import file_digest, fingerprint_of, tokenizer_fingerprint
from .raw_text import PackedText, is_raw_text, load_raw_text_for_training
from .records import DataFormat, DataValidationError, FieldMap, iter_records


def load_dataset_for_training(tokenizer, path, max_length: int, overflow: OverflowPolicy = "drop", fields: FieldMap = FieldMap(),
                              data_format: DataFormat = "auto", enable_thinking: bool = False, cache_dir: str | None = None,
                              echo=print) -> TokenizedData | PackedText:
    """Load, validate and tokenise a data file (what the training commands use), with a progress bar and a closing line.

    ``cache_dir`` replaces the datasets cache folder (tests and the benchmark use a fresh one). Raw text
    (``data_format`` "text", or under "auto" a .txt file or {"text": ...} records) is packed into blocks of
    ``max_length`` tokens instead (:mod:`qwen_helpers.data.raw_text`).
    """
    if is_raw_text(path, data_format, fields):
        return load_raw_text_for_training(tokenizer, path, max_length, cache_dir, echo)
    started = time.perf_counter()
    if enable_thinking and not renders_reasoning(tokenizer):
        echo("note: --enable_thinking True, and this chat template has no place for reasoning (Qwen2.5 and earlier): "
             "each answer's reasoning is trained inline as <think>…</think> before it, as in R1-distilled Qwen models.")
    conversations = conversations_dataset(path, fields, data_format, enable_thinking, cache_dir)
    fingerprint = fingerprint_of("tokenised", conversations._fingerprint, tokenizer_fingerprint(tokenizer), max_length, overflow, enable_thinking)
    try:
        tokenized = conversations.map(
            _tokenize_columns, batched=True, batch_size=BATCH_SIZE, writer_batch_size=BATCH_SIZE, remove_columns=conversations.column_names,
            fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, overflow=overflow, enable_thinking=enable_thinking),
            features=tokenized_features(), new_fingerprint=fingerprint, desc=f"Tokenising {path}",
        )
        data = tokenized_data(tokenized, len(conversations), max_length)
    except DataValidationError as error:
        raise DataValidationError(f"{path}, {error}") from None
    seconds = time.perf_counter() - started
    echo(f"tokenised {len(conversations)} records of {path} in {seconds:.1f} s ({len(conversations) / seconds:,.0f} records/s): {data.summary()}")
    return data


def _tokenize_columns(batch: dict, tokenizer, max_length: int, overflow: OverflowPolicy, enable_thinking: bool) -> dict:
    conversations = [json.loads(messages) for messages in batch["messages"]]
    tools = [json.loads(specs) for specs in batch["tools"]]
    return tokenize_batch(tokenizer, conversations, batch["record_index"], max_length, overflow, enable_thinking, tools)


def conversations_dataset(path, fields: FieldMap = FieldMap(), data_format: DataFormat = "auto", enable_thinking: bool = False,
                          cache_dir: str | None = None):
    """The validation pass: every record of ``path`` checked and written as chat messages to a cached Arrow dataset.

    Cached under a fingerprint of the file (path and a hash of its bytes), the settings and the kit's code,
    so any edit (even one that keeps the size and the modification time) or a new kit version validates again.
    """
    from datasets import Dataset, Features, Value
    from datasets.exceptions import DatasetGenerationError

    file = Path(path)
    if not file.is_file():
        next(iter_records(file))  # the loader's own "no such data file" error
    fingerprint = fingerprint_of("conversations", str(file.resolve()), file_digest(file), fields, data_format, enable_thinking)
    # JSON text: 5x cheaper to write than nested structs; "tools" is each record's function specs ("null" without)
    features = Features({"record_index": Value("int64"), "messages": Value("string"), "tools": Value("string")})
    try:
        return Dataset.from_generator(_conversation_rows, features=features, cache_dir=cache_dir, fingerprint=fingerprint,
                                      gen_kwargs=dict(path=str(file), fields=fields, data_format=data_format, enable_thinking=enable_thinking))
    except DatasetGenerationError as error:  # datasets wraps what the generator raised
        if isinstance(error.__cause__, DataValidationError):
            raise error.__cause__ from None
        raise


def _conversation_rows(path: str, fields: FieldMap, data_format: DataFormat, enable_thinking: bool):
    for index, record in enumerate(iter_records(path, fields, data_format)):
        yield {"record_index": index, "messages": json.dumps(build_messages(record, enable_thinking=enable_thinking), ensure_ascii=False),
               "tools": json.dumps(record.get("tools"), ensure_ascii=False)}

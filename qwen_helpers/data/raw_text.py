"""Raw text for continued pre-training: documents, every token trained, packed into blocks of ``--max_length`` tokens.

    .txt (documents separated by blank lines) or JSON / JSONL {"text": ...} records
        ──iter_documents (validated as it streams)──▶ Arrow: one row per document                 validation pass
        ──Dataset.map(tokenise, batched)──▶ Arrow: one row per token, <|endoftext|> after each document   tokenising pass
        ──Dataset.map(pack, batched, batch = whole blocks)──▶ input_ids / attention_mask / labels = input_ids   packing pass

No chat template: the documents are concatenated, each followed by ``<|endoftext|>`` (the token Qwen's
pre-training ends documents with, and its base checkpoints' eos; an instruct checkpoint's eos,
``<|im_end|>``, ends a chat turn, not a document), and cut into blocks of exactly ``max_length`` tokens,
as transformers' ``run_clm.py`` (``group_texts``) and LLaMA-Factory's ``pt`` stage do. Documents share a
block and attend to earlier ones in it, the ``<|endoftext|>`` between them marking the change. Every
packing batch holds whole blocks, so the only tokens left over are the stream's last, fewer than one
block: they are dropped (counted in the summary), giving exactly ``floor(total tokens / max_length)`` blocks.

A ``.txt`` file holds documents separated by one or more blank lines (line breaks inside a document are
kept); a file without blank lines is one document. For one document per line (LLaMA-Factory's reading of
a .txt), write JSON Lines of ``{"text": ...}`` instead.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .encoding import BATCH_SIZE, token_ids
from .fingerprints import file_digest, fingerprint_of, tokenizer_fingerprint
from .records import FieldMap, DataValidationError, _duplicate_key, _not_utf8, detect_format, read_raw_records

TEXT_SUFFIXES = (".txt",)  # read as plain text under --data_format auto
RECORD_SUFFIXES = (".json", ".jsonl")  # read as {"text": ...} records; any other file under --data_format text is plain text
DOCUMENT_END = "<|endoftext|>"
BLOCKS_PER_BATCH = 64  # blocks per packing batch (a multiple of the block length, so no batch leaves a remainder but the last)


def first_record(path: Path) -> Any:
    """The first JSON value of a JSON array or JSON Lines file, from its first 4 MB (None when it is not there)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 22).removeprefix(codecs.BOM_UTF8).decode("utf-8", "ignore").lstrip()
    head = head[1:].lstrip() if head.startswith("[") else head
    try:
        return json.JSONDecoder().raw_decode(head)[0]
    except ValueError:
        return None


def is_raw_text(path, data_format: str = "auto", fields: FieldMap = FieldMap()) -> bool:
    """True when ``path`` trains as raw text: ``--data_format text``, or under auto a .txt file or {"text": ...} records."""
    if data_format != "auto" or path is None:
        return data_format == "text"
    file = Path(path)
    if not file.is_file():
        return False
    return file.suffix.lower() in TEXT_SUFFIXES or detect_format(first_record(file), fields) == "text"


def refuse_raw_text(path, needs: str) -> None:
    """One line when a command that needs records (DPO's pairs, GRPO's prompts) is given raw text."""
    if is_raw_text(path):
        raise DataValidationError(
            f"{path} is raw text (plain text, or records holding only 'text'), which only continued pre-training reads "
            f"(train_lora / train_qlora --data_format text); this command needs {needs}."
        )


def iter_documents(path) -> Iterator[str]:
    """Every document of a raw-text file, checked: plain text split at blank lines, or the ``text`` of JSON records."""
    file = Path(path)
    if not file.is_file():
        raise DataValidationError(f"{file}: no such data file. Check the path (relative to {Path.cwd()}).")
    documents = _json_documents(file) if file.suffix.lower() in RECORD_SUFFIXES else _plain_documents(file)
    found = False
    for document in documents:
        found = True
        yield document
    if not found:
        raise DataValidationError(f"{file}: no text found (the file is empty or holds only blank lines). "
                                  "Put documents in it, separated by blank lines.")


def _plain_documents(path: Path) -> Iterator[str]:
    """The blank-line-separated documents of a UTF-8 text file, read line by line (line endings become \\n)."""
    lines, offset = [], 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            start = len(codecs.BOM_UTF8) if number == 0 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[start:].decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, error.object[error.start], offset + start + error.start) from None
            offset += len(raw)
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _json_documents(path: Path) -> Iterator[str]:
    """The ``text`` of every record of a JSON array or JSON Lines file, each checked (one line naming the record)."""
    for index, record in enumerate(read_raw_records(path)):
        at = f"{path}, record {index}"
        if not isinstance(record, dict):
            raise DataValidationError(f"{at}: expected an object with 'text', found {type(record).__name__}: {record!r:.80}.")
        if (key := _duplicate_key(record)) is not None:
            raise DataValidationError(f"{at}: the key '{key}' appears twice, so one of its values would be silently lost. Keep one.")
        if "text" not in record:
            raise DataValidationError(f"{at}: missing field 'text'. Found fields {sorted(record)}; raw-text records are "
                                      '{"text": "..."} (pass --data_format alpaca|messages|sharegpt for instruction data).')
        text = record["text"]
        if not isinstance(text, str):
            raise DataValidationError(f"{at}, field 'text': expected a string, found {type(text).__name__} ({text!r:.60}).")
        if not text.strip():
            raise DataValidationError(f"{at}, field 'text': the text is empty, so there is nothing to learn. Fill it in or remove the record.")
        yield text


def document_end_id(tokenizer) -> int:
    """The id that ends each document: ``<|endoftext|>`` where the vocabulary has it (every Qwen), else the tokenizer's eos."""
    token_id = tokenizer.get_vocab().get(DOCUMENT_END, tokenizer.eos_token_id)
    if token_id is None:
        raise DataValidationError(f"the tokenizer has neither {DOCUMENT_END} nor an eos token to end each document with; use a Qwen checkpoint.")
    return token_id


@dataclass
class PackedText:
    """Raw text packed into blocks, plus what went into them (the training commands print :meth:`summary`)."""

    dataset: Any  # datasets.Dataset with input_ids / attention_mask / labels, every row block_length long
    documents: int
    tokens: int
    block_length: int
    dropped: list[int] = field(default_factory=list)  # records dropped (none: raw text is packed, never dropped)
    truncated: int = 0

    @property
    def kept(self) -> int:
        return len(self.dataset)

    def summary(self) -> str:
        left = self.tokens - self.kept * self.block_length
        return (f"{self.kept} blocks of {self.block_length} tokens packed from {self.documents} documents "
                f"({self.tokens:,} tokens with {DOCUMENT_END} after each; every token trained; the last {left} "
                "tokens, less than a block, dropped)")


def load_raw_text_for_training(tokenizer, path, max_length: int, cache_dir: str | None = None, echo=print) -> PackedText:
    """Validate, tokenise and pack a raw-text file (cached on disk as the records' tokenising pass is)."""
    from datasets import Dataset, Features, List, Value
    from datasets.exceptions import DatasetGenerationError

    file = Path(path)
    end_id = document_end_id(tokenizer)
    fingerprint = fingerprint_of("raw text", str(file.resolve()), file_digest(file) if file.is_file() else None)
    try:
        documents = Dataset.from_generator(_document_rows, features=Features({"text": Value("string")}), cache_dir=cache_dir,
                                           fingerprint=fingerprint, gen_kwargs=dict(path=str(file)))
    except DatasetGenerationError as error:  # datasets wraps what the generator raised
        if isinstance(error.__cause__, DataValidationError):
            raise error.__cause__ from None
        raise
    tokens = documents.map(_stream_of_tokens, batched=True, batch_size=BATCH_SIZE, remove_columns=["text"],
                           fn_kwargs=dict(tokenizer=tokenizer, end_id=end_id), features=Features({"token": Value("int32")}),
                           writer_batch_size=1 << 16, desc=f"Tokenising {path}",
                           new_fingerprint=fingerprint_of("tokens", documents._fingerprint, tokenizer_fingerprint(tokenizer), end_id))
    block_features = Features({name: List(Value("int32")) for name in ("input_ids", "attention_mask", "labels")})
    blocks = tokens.map(_pack_blocks, batched=True, batch_size=max_length * BLOCKS_PER_BATCH, remove_columns=["token"],
                        fn_kwargs=dict(block_length=max_length), features=block_features, desc=f"Packing {path}",
                        new_fingerprint=fingerprint_of("blocks", tokens._fingerprint, max_length, BLOCKS_PER_BATCH))
    packed = PackedText(blocks, documents=len(documents), tokens=len(tokens), block_length=max_length)
    if packed.kept == 0:
        raise DataValidationError(f"{path}: {packed.tokens} tokens in {packed.documents} documents, fewer than one block of "
                                  f"--max_length {max_length}; lower --max_length or add text.")
    echo(f"packed {path}: {packed.summary()}")
    return packed


def _document_rows(path: str):
    for text in iter_documents(path):
        yield {"text": text}


def _stream_of_tokens(batch: dict, tokenizer, end_id: int) -> dict:
    """One row per token: each document's ids (special-token text in the data stays text), then the document end."""
    return {"token": [token for ids in token_ids(tokenizer, batch["text"], split_special_tokens=True) for token in (*ids, end_id)]}


def _pack_blocks(batch: dict, block_length: int) -> dict:
    """Whole blocks of ``block_length`` consecutive tokens, each trained on every token; a shorter remainder is dropped."""
    tokens = batch["token"]
    blocks = [tokens[start:start + block_length] for start in range(0, len(tokens) - block_length + 1, block_length)]
    return {"input_ids": blocks, "attention_mask": [[1] * block_length for _ in blocks], "labels": [list(block) for block in blocks]}


def document_blocks(tokenizer, path, index: int, block_length: int) -> dict:
    """The packed blocks that hold document ``index``, exactly as training packs them (neighbouring documents included).

    Returns ``blocks`` (their ``input_ids`` and ``labels``, equal: every token is trained), the first block's
    number, the document's span in them, and ``dropped_tokens``: its tokens in the stream's dropped remainder.
    """
    end_id, seen, total, pending, span = document_end_id(tokenizer), 0, 0, [], None
    for number, text in enumerate(iter_documents(path)):
        seen = number + 1
        ids = [*token_ids(tokenizer, [text], split_special_tokens=True)[0], end_id]
        if number == index:
            span = (len(pending), len(pending) + len(ids))  # where the document starts in the block it starts in
        pending, total = pending + ids, total + len(ids)
        if span is None:
            pending = pending[len(pending) - total % block_length:] if total % block_length else []
        elif len(pending) >= span[1] + (-span[1]) % block_length:
            break  # the block holding the document's last token is complete
    if span is None:
        raise DataValidationError(f"--index {index}: {path} has {seen} documents (0 to {seen - 1}).")
    whole = len(pending) - len(pending) % block_length
    blocks = [pending[start:start + block_length] for start in range(0, whole, block_length)]
    return {"first_block": (total - len(pending)) // block_length, "document_span": list(span),
            "blocks": [{"input_ids": block, "labels": list(block)} for block in blocks],
            "dropped_tokens": max(0, span[1] - max(whole, span[0]))}

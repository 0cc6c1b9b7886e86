"""Load and validate training records: alpaca, messages and ShareGPT files, one error line per bad record.

    JSON array or JSON Lines ──load_records──▶ validated records (the last answer in ``output``, earlier turns in ``messages``)

Every problem names the file, the record index and the field, and says what to do. Chat records (turns,
reasoning, tool calls) are checked by :mod:`qwen_helpers.data.chat_records`. Rendering and
tokenising the records is :mod:`qwen_helpers.data.encoding`'s job.
"""

from __future__ import annotations

import codecs
import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from .chat_records import REASONING_FIELDS, check_answer, split_reasoning, validate_conversation
from ..common.errors import DataValidationError, FlagError

DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "text"]
_NOTHING = object()  # what next() returns for a source without records


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


def _not_utf8(path: Path, byte: int, offset: int) -> DataValidationError:
    return DataValidationError(
        f"{path}: not UTF-8 text (byte {byte:#04x} at offset {offset}). Convert it first, e.g. "
        f"`iconv -f GBK -t UTF-8 {path} > {path.with_suffix('.utf8' + path.suffix)}` for a file saved in GBK."
    )


def _first_character(path: Path) -> bytes:
    """The file's first non-blank byte (after a UTF-8 BOM), read in chunks: ``b"["`` means a JSON array."""
    with open(path, "rb") as handle:
        chunk = handle.read(1 << 16).removeprefix(codecs.BOM_UTF8)
        while chunk:
            if stripped := chunk.lstrip():
                return stripped[:1]
            chunk = handle.read(1 << 16)
    raise DataValidationError(f"{path}: the file is empty. Expected a JSON array of records or JSON Lines.")


def _read_json_array(path: Path) -> list[Any]:
    """A JSON array file, read whole (it cannot be split into records without parsing it all)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error.object[error.start], error.start) from None
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as error:
        raise DataValidationError(
            f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}. "
            "Fix the file (a JSON array of objects) or save it as JSON Lines, one object per line."
        ) from None


def _read_json_lines(path: Path) -> Iterator[Any]:
    """The objects of a JSON Lines file one line at a time, so memory does not grow with the file."""
    offset = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            start = len(codecs.BOM_UTF8) if line_number == 1 and line.startswith(codecs.BOM_UTF8) else 0
            try:
                text = line[start:].decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(path, error.object[error.start], offset + start + error.start) from None
            offset += len(line)
            if not text.strip():
                continue
            try:
                yield json.loads(text, object_pairs_hook=_object_without_duplicates)
            except json.JSONDecodeError as error:
                raise DataValidationError(
                    f"{path}: malformed JSON on line {line_number}, column {error.colno}: {error.msg}. "
                    "Each line of a JSON Lines file must be one complete JSON object."
                ) from None


def read_raw_records(path: Path) -> Iterator[Any]:
    """The raw records of a file: JSON Lines streamed line by line, a JSON array read whole."""
    if _first_character(path) == b"[":
        yield from _read_json_array(path)
    else:
        yield from _read_json_lines(path)


def detect_format(record: Any, fields: FieldMap = FieldMap()) -> str:
    """A file's record format, from its first record: ``messages``, ``sharegpt`` (``conversations``), ``text`` (raw text) or ``alpaca``."""
    if isinstance(record, dict) and "messages" in record:
        return "messages"
    if isinstance(record, dict) and "conversations" in record:
        return "sharegpt"
    return "text" if isinstance(record, dict) and "text" in record and not {fields.instruction, fields.output} & set(record) else "alpaca"


def load_records(source: str | os.PathLike | Iterable[dict], fields: FieldMap = FieldMap(), data_format: DataFormat = "auto") -> list[dict]:
    """Load a JSON array, a JSONL file or a list of dicts, and validate every record.

    Three formats, detected from the first record unless ``data_format`` forces one: alpaca
    (``instruction``, ``input``, ``output``, ``system``), ``{"messages": [{"role", "content"}]}`` and
    ShareGPT ``{"conversations": [{"from", "value"}]}``. Every record comes back with the kit's keys:
    ``output`` (the last assistant turn: the reference answer), ``instruction`` and ``input`` (the last
    user turn, for display), ``reasoning`` when the answer carries one, and, for multi-turn formats,
    ``messages``: every turn before the answer; chat records with tool calls also get ``tool_calls`` (the
    answer's calls) and ``tools`` (see :mod:`qwen_helpers.data.chat_records`). Unknown extra fields are kept. Anything that cannot be
    trained on raises :class:`DataValidationError` naming the file, the record index and what is wrong.
    """
    return list(iter_records(source, fields, data_format))


def iter_records(source: str | os.PathLike | Iterable[dict], fields: FieldMap = FieldMap(), data_format: DataFormat = "auto") -> Iterator[dict]:
    """:func:`load_records` one record at a time: a JSON Lines file is read line by line, so memory stays flat.

    The checks and their messages are load_records' (it is this, collected); a field map naming a field
    that no record has is reported once every record has been read.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        check_data_file(path)
        if path.suffix.lower() == ".txt":
            raise _raw_text_here(path)
        raw, where = read_raw_records(path), str(path)
    else:
        raw, where = iter(source), "records"
    first = next(raw, _NOTHING)
    if first is _NOTHING:
        raise DataValidationError(f"{where}: no records found.")
    file_format = detect_format(first, fields) if data_format == "auto" else data_format
    if file_format == "text":
        raise _raw_text_here(where)
    keys_seen = set()
    for index, record in enumerate(itertools.chain([first], raw)):
        if data_format == "auto" and (other := _other_format(record, file_format, fields)):
            raise DataValidationError(f"{where}, record {index}: a record in {other} format, while record 0 is in "
                                      f"{file_format} format: the file mixes record formats, which no --data_format "
                                      "reads. Convert the records to one format (or split the file).")
        yield validate_record(record, index, where, file_format, fields)
        if file_format == "alpaca":
            keys_seen.update(record)
    if file_format == "alpaca":
        _check_mapped_fields_exist(keys_seen, where, fields)


def _raw_text_here(where) -> DataValidationError:  # raw_text.py reads raw text, for the training commands only
    return DataValidationError(f"{where}: raw text (a .txt file or {{\"text\": ...}} records) trains with --data_format text on "
                               "train_lora, train_qlora or train_prompt_tuning; this needs instruction or chat records.")


def check_data_file(path: Path, flag: str = "--data_path") -> None:
    """A data path that is missing or a folder, named with its flag and what is expected, before anything reads it."""
    if path.is_dir():
        raise DataValidationError(f"{flag} {path} is a folder; pass a data file in it (a JSON array or JSON Lines).")
    if not path.is_file():
        raise DataValidationError(f"{flag} {path}: no such data file. Check the path (relative to {Path.cwd()}).")


def _other_format(record: Any, file_format: str, fields: FieldMap) -> str | None:
    """The format of a record plainly in another format than the file's first one (its own key says so), else None."""
    if not isinstance(record, dict):
        return None
    found = detect_format(record, fields)
    if found == "alpaca" and fields.instruction not in record:
        return None  # a broken chat record, not an alpaca one: its own validation says what is wrong
    return found if found != file_format else None


def validate_record(record: Any, index: int, where: str, file_format: str, fields: FieldMap = FieldMap()) -> dict:
    """One raw record checked and converted to the kit's keys (see :func:`load_records`); ``file_format`` is not "auto"."""
    if (key := _duplicate_key(record)) is not None:
        raise DataValidationError(
            f"{where}, record {index}: the key '{key}' appears twice, so one of its values would be silently lost. Keep one."
        )
    if is_preference_pair(record) and fields.output not in record:
        raise DataValidationError(
            f"{where}, record {index}: a preference pair (prompt, chosen, rejected), which only train_dpo trains; "
            f"`python -m qwen_helpers.inspect_data --data_path {where}` shows what DPO scores in it."
        )
    if file_format == "alpaca":
        return _validate_alpaca(record, index, where, fields)
    return validate_conversation(record, index, where, file_format)


def _check_mapped_fields_exist(keys_seen: set[str], where: str, fields: FieldMap) -> None:
    """A renamed optional field (``--input_field``, ``--system_field``) that no record has is a typo, not an absence."""
    defaults = FieldMap()
    for flag, name, default in (("input", fields.input, defaults.input), ("system", fields.system, defaults.system)):
        if name != default and name not in keys_seen:
            raise DataValidationError(
                f"{where}: --{flag}_field {name}: no record has a field '{name}'. Fields found: {sorted(keys_seen)}. Fix the flag or drop it."
            )


def is_preference_pair(record: Any) -> bool:
    """A DPO record: ``chosen`` and ``rejected`` answers (after a ``prompt`` or ``messages``)."""
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


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
    check_answer(result["output"], f"{where}, record {index}, field '{fields.output}'")
    if reasoning:
        result["reasoning"] = reasoning
    return result


def label_set(records: list[dict], max_labels: int = 20) -> list[str] | None:
    """The sorted label set when the records look like classification (few distinct, repeated outputs), else None."""
    if any(record.get("tool_calls") or not record["output"].strip() for record in records):
        return None  # answers that call tools (their text may be empty) are generation, however few their texts
    counts = Counter(record["output"].strip() for record in records)
    if len(counts) <= min(max_labels, max(2, len(records) // 4)) and min(counts.values()) >= 2:
        return sorted(counts)
    return None


def detect_task(records: list[dict], task: str = "auto") -> str:
    """'classification' or 'generation': the --task flag, or with 'auto' whether every output is one of a few repeated labels."""
    if task != "auto":
        return task
    return "classification" if label_set(records) is not None else "generation"


def parse_labels(labels: str | list[str] | None, flag: str = "--labels") -> list[str] | None:
    """The --labels value as a list ("a,b,c" or a list; None when not given); a value naming no label, or one label twice, is refused."""
    if labels is None:
        return None
    named = [label.strip() for label in (labels.split(",") if isinstance(labels, str) else labels) if label.strip()]
    if not named:
        raise FlagError(f"{flag} {labels!r} names no label; give them comma-separated (e.g. {flag} 正面,负面,中性), or omit {flag} to use the training answers.")
    repeated = sorted({label for label in named if named.count(label) > 1})
    if repeated:
        raise FlagError(f"{flag} {','.join(named)}: {', '.join(repeated)} is listed more than once; list each label once.")
    return named


def check_labels_fit(records: list[dict], labels: list[str], where: str, flag: str = "--labels") -> list[str]:
    """``labels`` when they are exactly the training answers; else a :class:`FlagError` naming the answers left out or the labels never taught."""
    answers = sorted({record["output"].strip() for record in records})
    unknown = [answer for answer in answers if answer not in labels]
    if unknown:
        raise FlagError(f"{flag} {','.join(labels)}: {where} also answers {unknown[:5]}; add them to {flag} or fix the data.")
    never = [label for label in labels if label not in answers]
    if never:
        raise FlagError(f"{flag} {','.join(labels)}: {where} never answers {never[:5]}, so the model is never taught them "
                        f"(its answers are {answers[:10]}); list only those (check the spelling), or omit {flag}.")
    return labels


def check_labels_known(records: list[dict], labels: list[str], where: str) -> None:
    """Refuse evaluation records whose answer is not in the label set (they could never be predicted)."""
    for index, record in enumerate(records):
        if record["output"].strip() not in labels:
            raise DataValidationError(
                f"{where}, record {index}: the answer {record['output']!r} is not in the label set {labels}. "
                "Pass it in --labels or fix the record."
            )

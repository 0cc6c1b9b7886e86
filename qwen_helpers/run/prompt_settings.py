"""How a trained model is asked: thinking mode, system prompt and record fields, recorded once and read everywhere.

Training records them in ``run_config.json`` (``enable_thinking``, the field flags, ``data_format``, and
``training_system_prompt``: the system prompt every training record shared, or null). A merged folder
carries them in ``prompt_settings.json``, and its chat template's ``enable_thinking`` default is set to the
trained mode, so transformers, vLLM and llama.cpp ask the merged model as training did when nobody says
otherwise. Export (Modelfile, GGUF verification, vLLM check) and inference read them from these files,
never from the current directory; explicit flags (``--system``, ``--enable_thinking``, ``--*_field``) win.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..common.files import RUN_CONFIG, atomic_write_text
from ..data.records import FieldMap, iter_records, load_records, read_raw_records

PROMPT_SETTINGS = "prompt_settings.json"  # in a merged folder: how the adapter it came from was trained to be asked
SYSTEM_PROMPT_KEY = "training_system_prompt"  # in run_config.json
THINKING_DEFAULT_MARK = "{#- qwen_helpers: enable_thinking defaults to the trained mode -#}"
# Chat-template options beyond enable_thinking that a run may set (Qwen3.6's preserve_thinking, Qwen3.8's reasoning_effort)
TEMPLATE_OPTIONS = ("reasoning_effort", "preserve_thinking")
OPTION_DEFAULT_MARK = "{#- qwen_helpers: option defaults of the trained run -#}"


@dataclass(frozen=True)
class PromptSettings:
    """The prompt format a model was trained with (defaults: the kit's, for a model nothing was recorded for)."""

    enable_thinking: bool = False
    system_prompt: str | None = None
    fields: FieldMap = FieldMap()
    data_format: str = "auto"
    template_options: tuple[tuple[str, object], ...] = ()  # (name, value) of TEMPLATE_OPTIONS the run set

    def to_json(self) -> dict:
        return {
            "enable_thinking": self.enable_thinking,
            SYSTEM_PROMPT_KEY: self.system_prompt,
            "field_map": vars(self.fields),
            "data_format": self.data_format,
            **dict(self.template_options),
        }


FIELD_ROLES = {
    "instruction": "the instruction",
    "input": "the optional input",
    "output": "the answer",
    "system": "an optional system prompt",
}


def field_flag(role: str, recorded: bool = True):
    """A ``--{role}_field`` flag for a command that reads a data file; unset (None), it follows the record."""
    default = f"as the adapter (or merged model) was trained, else {role}" if recorded else role
    return field(default=None, metadata={"help": f"Record key holding {FIELD_ROLES[role]}; default: {default}."})


def data_format_flag(recorded: bool = True):
    """A ``--data_format`` flag; unset (None), it follows what training recorded, else auto."""
    default = "as the adapter (or merged model) was trained, else auto" if recorded else "auto"
    return field(
        default=None,
        metadata={"help": f"Record format of the data file (auto detects it per file); default: {default}."},
    )


def field_map_of(args, recorded: PromptSettings | None = None) -> FieldMap:
    """The field map a command reads data with: its ``--*_field`` flags, else the recorded map, else the kit's names."""
    base = (recorded or PromptSettings()).fields
    return FieldMap(*(getattr(args, f"{role}_field", None) or getattr(base, role) for role in FIELD_ROLES))


def data_format_of(args, recorded: PromptSettings | None = None) -> str:
    return getattr(args, "data_format", None) or (recorded or PromptSettings()).data_format


def read_records_as_trained(path: str | os.PathLike, args, recorded: PromptSettings | None = None) -> list[dict]:
    """A data file read with the command's ``--*_field``/``--data_format`` flags, else as training read its data.

    A recorded optional field (input, system) that no record of this file has is absent here, not a typo
    (a test set without the training file's system field); one named by a flag must exist, as in training.
    """
    fields = field_map_of(args, recorded)
    if recorded is not None and Path(path).is_file():
        keys = set().union(*(record for record in read_raw_records(Path(path)) if isinstance(record, dict)))
        absent = {
            role: getattr(FieldMap(), role)
            for role in ("input", "system")
            if getattr(args, f"{role}_field", None) is None and getattr(fields, role) not in keys
        }
        fields = replace(fields, **absent)
    return load_records(path, fields, data_format_of(args, recorded))


def record_system_prompt(record: dict) -> str | None:
    """The system prompt a (validated) record carries: its ``system`` field, or a chat record's first system turn."""
    if "messages" in record:
        first = record["messages"][0] if record["messages"] else {}
        return first.get("content") or None if first.get("role") == "system" else None
    return record.get("system") or None


def shared_system_prompt(records: Iterable[dict]) -> str | None:
    """The system prompt every record has, word for word; None when one has none or two differ (stops reading there)."""
    shared = None
    for record in records:
        prompt = record_system_prompt(record)
        if prompt is None or (shared is not None and prompt != shared):
            return None
        shared = prompt
    return shared


def with_system_prompt(record: dict, system_prompt: str | None) -> dict:
    """The record as a server with a default system prompt (Ollama's SYSTEM) sends it: its own kept, else this one."""
    if not system_prompt or record_system_prompt(record) is not None:
        return record
    if "messages" in record:
        return {**record, "messages": [{"role": "system", "content": system_prompt}, *record["messages"]]}
    return {**record, "system": system_prompt}


def training_system_prompt(
    data_path: str | os.PathLike, fields: FieldMap = FieldMap(), data_format: str = "auto"
) -> str | None:
    """The system prompt every record of a training file shares (read as training read it), for run_config.json."""
    return shared_system_prompt(iter_records(data_path, fields, data_format))


def settings_from_run_config(run: dict) -> PromptSettings:
    """The prompt settings a run_config.json records; a run from before ``training_system_prompt`` re-reads its data.

    That file is found where the run saw it (its relative ``data_path`` taken from the run's recorded ``cwd``),
    not from the current directory; when it is gone, the system prompt is unknown (None).
    """
    fields = FieldMap(*(run.get(f"{name}_field") or name for name in ("instruction", "input", "output", "system")))
    data_format = run.get("data_format") or "auto"
    data_format = "auto" if data_format == "text" else data_format  # raw-text training: the files asked later are chat records
    if SYSTEM_PROMPT_KEY in run:
        system_prompt = run[SYSTEM_PROMPT_KEY]
    else:
        data_path = Path(run["data_path"]) if run.get("data_path") else None
        if data_path is not None and not data_path.is_absolute() and run.get("cwd"):
            data_path = Path(run["cwd"]) / data_path
        system_prompt = (
            training_system_prompt(data_path, fields, data_format) if data_path and data_path.is_file() else None
        )
    return PromptSettings(bool(run.get("enable_thinking", False)), system_prompt, fields, data_format, recorded_template_options(run))


def settings_from_file(path: Path) -> PromptSettings:
    saved = json.loads(path.read_text(encoding="utf-8"))
    return PromptSettings(
        bool(saved.get("enable_thinking", False)),
        saved.get(SYSTEM_PROMPT_KEY),
        FieldMap(**saved.get("field_map", {})),
        saved.get("data_format", "auto"),
        recorded_template_options(saved),
    )


def recorded_prompt_settings(folder: str | os.PathLike | None) -> PromptSettings | None:
    """What a folder records: an adapter's run_config.json, or a merged model's prompt_settings.json; else None."""
    if not folder or not Path(folder).is_dir():
        return None
    if (Path(folder) / RUN_CONFIG).is_file():
        return settings_from_run_config(json.loads((Path(folder) / RUN_CONFIG).read_text(encoding="utf-8")))
    if (Path(folder) / PROMPT_SETTINGS).is_file():
        return settings_from_file(Path(folder) / PROMPT_SETTINGS)
    return None


def write_prompt_settings(folder: str | os.PathLike, settings: PromptSettings) -> Path:
    path = Path(folder) / PROMPT_SETTINGS
    atomic_write_text(path, json.dumps(settings.to_json(), indent=2, ensure_ascii=False))
    return path


def has_thinking_switch(chat_template) -> bool:
    """True for a chat template that reads ``enable_thinking`` (Qwen3's); Qwen2.5's and Qwen1.5's ignore it."""
    return isinstance(chat_template, str) and "enable_thinking" in chat_template


def thinking_default(enable_thinking: bool) -> str:
    """The line put in front of a chat template so that ``enable_thinking`` defaults to ``enable_thinking``."""
    value = "true" if enable_thinking else "false"
    setting = f"{{%- if enable_thinking is not defined %}}{{%- set enable_thinking = {value} %}}{{%- endif %}}"
    return THINKING_DEFAULT_MARK + setting


def template_with_thinking_default(chat_template, enable_thinking: bool):
    """The chat template with ``enable_thinking`` defaulting to the trained mode (Qwen3's own default is thinking mode).

    A request that passes ``enable_thinking`` still decides; one that does not gets the mode the model was trained in.
    Templates without the switch are returned as they are.
    """
    if not has_thinking_switch(chat_template):
        return chat_template
    for earlier in (thinking_default(True), thinking_default(False)):
        chat_template = chat_template.replace(earlier, "", 1)  # wherever it sits: option defaults may come first
    return thinking_default(enable_thinking) + chat_template


def recorded_template_options(saved: dict) -> tuple[tuple[str, object], ...]:
    """The template options a run_config.json or prompt_settings.json records (those set, in TEMPLATE_OPTIONS order)."""
    return tuple((name, saved[name]) for name in TEMPLATE_OPTIONS if saved.get(name) is not None)


def apply_template_options(tokenizer, options: dict, enable_thinking: bool, where: str):
    """Check a run's template options against the checkpoint's template, then make them its defaults; returns the tokenizer."""
    check_template_options(tokenizer.chat_template, options, where, enable_thinking)
    tokenizer.chat_template = template_with_options(tokenizer.chat_template, options)
    return tokenizer


def check_template_options(chat_template, options: dict, where: str, enable_thinking: bool = True) -> None:
    """An option set for a template that never reads it would do nothing: refused, naming the templates that do."""
    from ..common.errors import FlagError

    if "reasoning_effort" in options and not enable_thinking:
        raise FlagError("--reasoning_effort: Qwen3.8's template reads it in thinking mode only, and this run is in "
                        "non-thinking mode; add --enable_thinking True, or drop --reasoning_effort.")
    for name in options:
        if not (isinstance(chat_template, str) and name in chat_template):
            readers = {"reasoning_effort": "Qwen3.8's", "preserve_thinking": "Qwen3.6's and Qwen3.8's"}[name]
            raise FlagError(f"--{name}: the chat template of {where} does not read {name} ({readers} does), so the flag "
                            "would change nothing. Drop it, or use a checkpoint whose template has it.")


def template_with_options(chat_template, options: dict | tuple):
    """The chat template with ``options`` as its defaults: every render that does not pass them gets the run's values.

    Applied to the tokenizer when training starts and when an adapter loads, so training, evaluation, inference, the
    merged folder's template and the GGUF check all render as trained; a request that passes an option still decides.
    """
    options = dict(options)
    if not isinstance(chat_template, str):
        return chat_template
    names = "|".join(TEMPLATE_OPTIONS)
    earlier = rf"(?:\{{%- if (?:{names}) is not defined %\}}\{{%- set (?:{names}) = [^%]*%\}}\{{%- endif %\}})*"
    chat_template = re.sub(earlier + re.escape(OPTION_DEFAULT_MARK) + "\n", "", chat_template, count=1)
    if not options:
        return chat_template
    lines = "".join(f"{{%- if {name} is not defined %}}{{%- set {name} = {json.dumps(value)} %}}{{%- endif %}}"
                    for name, value in options.items())
    return f"{lines}{OPTION_DEFAULT_MARK}\n{chat_template}"

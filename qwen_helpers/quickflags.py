"""Answer ``--help`` and flag mistakes in well under 2 s, before torch and transformers are imported.

A training command's parser holds every ``TrainingArguments`` flag, and building it imports
transformers' trainer, which imports peft, bitsandbytes and torch: 10-15 s on a small machine
before a typo can be reported. So the first full parse of a command records its parser as a
*flag schema* (option names, types, choices, defaults and help texts) in the kit's cache, and
later runs rebuild a plain ``argparse`` parser from it: ``--help`` prints the same text, and an
unknown flag or a value of the wrong type or outside its choices gets the same one-line error,
with nothing heavy imported. Parsing that succeeds then goes on to the real ``HfArgumentParser``,
which stays the one authority on what a run receives.

A schema is keyed by the command, the Python and library versions and the kit's own source, so
an upgrade or an edit can never answer from a stale one: it is simply rebuilt by the next full parse.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from .errors import flag_sentences, parse_flags, strict_parse

SCHEMA_VERSION = 1
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "trl")
_TYPES = {"int": int, "float": float, "str": str}
_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def string_to_bool(value):
    """transformers.hf_argparser.string_to_bool, with its message (the schema's bool fields name it)."""
    if isinstance(value, bool):
        return value
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of the kit's own modules: any edit to a flag, a default or a help text makes a new schema."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def schema_path(command: str) -> Path:
    """Where the schema of ``command`` (a name plus whatever changes its parser) is kept in the kit's cache."""
    from .tiny import cache_root

    key = json.dumps([SCHEMA_VERSION, command, sys.version, _library_versions(), _source_digest()])
    return cache_root() / "flags" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _type_name(action: argparse.Action) -> str:
    if action.choices is not None:
        return "choice"
    kind = getattr(action.type, "__name__", None)
    if kind == "string_to_bool":
        return "bool"
    return kind if kind in _TYPES else "str"  # a type the schema cannot rebuild: any text passes to the real parser


def _default_of(value):
    """The default as JSON, or its text where JSON cannot hold it (an enum member shows as its value either way)."""
    value = getattr(value, "value", value)
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)


_ACTIONS = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
            argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const"}


class UnrecordableParser(Exception):
    """A parser with an action the schema cannot rebuild: such a command always takes the full parse."""


def describe(parser: argparse.ArgumentParser) -> dict:
    """The schema of a built parser: enough to rebuild its help text and its checks of flag names, types and choices."""
    actions = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if type(action) not in _ACTIONS:
            raise UnrecordableParser(f"{action.dest}: {type(action).__name__}")
        actions.append({
            "action": _ACTIONS[type(action)], "option_strings": action.option_strings, "dest": action.dest,
            "nargs": action.nargs, "const": _default_of(action.const), "default": _default_of(action.default),
            "type": _type_name(action), "required": action.required, "help": action.help, "metavar": action.metavar,
            "choices": None if action.choices is None else [str(getattr(c, "value", c)) for c in action.choices],
        })
    return {"description": parser.description, "epilog": parser.epilog, "actions": actions}


def _add_action(parser: argparse.ArgumentParser, spec: dict) -> None:
    options = {"default": spec["default"], "help": spec["help"]}
    if spec["option_strings"]:
        options.update(dest=spec["dest"], required=spec["required"])
    if spec["action"] != "store":
        if spec["action"] == "store_const":
            options["const"] = spec["const"]
        parser.add_argument(*spec["option_strings"], action=spec["action"], **options)
        return
    kind = spec["type"]
    options["type"] = string_to_bool if kind == "bool" else _TYPES.get(kind, str)
    options.update({key: spec[key] for key in ("metavar", "choices", "nargs") if spec[key] is not None})
    if spec["nargs"] == "?":
        options["const"] = spec["const"]
    parser.add_argument(*(spec["option_strings"] or [spec["dest"]]), **options)


def rebuild(schema: dict, prog: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with the recorded flags, types, choices, defaults and help texts."""
    parser = argparse.ArgumentParser(prog=prog, description=schema["description"], epilog=schema["epilog"],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    for spec in schema["actions"]:
        _add_action(parser, spec)
    return parser


def remember(command: str, parser: argparse.ArgumentParser) -> None:
    """Record a fully built parser's schema, once per version of the kit and its libraries; a read-only cache is skipped."""
    path = schema_path(command)
    if path.is_file():
        return
    try:
        schema = json.dumps(describe(parser))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(schema, encoding="utf-8")
        os.replace(temporary, path)
    except (OSError, UnrecordableParser):
        pass


def command_prog() -> str | None:
    """``python -m qwen_helpers.train_lora`` for the usage line, as the user typed it (argparse would say ``train_lora.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return f"python -m {name.removesuffix('.__main__')}" if name.startswith("qwen_helpers") else None


def quick_parse(command: str, argv: list[str]) -> argparse.Namespace | None:
    """Parse ``argv`` with the recorded schema of ``command``; None when there is none yet (the full parse records it).

    ``--help`` prints the usage and exits 0; an unknown flag, a missing value, a wrong type or a value
    outside its choices raises :class:`~qwen_helpers.errors.FlagError`, worded as the full parse would.
    """
    try:
        schema = json.loads(schema_path(command).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return strict_parse(rebuild(schema, prog=command_prog()), argv)


def parse_command_flags(command: str, build_parser, argv: list[str] | None, check=None):
    """A command's flags into its dataclasses: the quick parse (and ``check`` on its namespace) first, then the full one.

    ``build_parser`` returns the command's ``HfArgumentParser`` (importing what it needs); it runs only
    when the quick parse found nothing wrong, and its schema is recorded for the next run.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    quick = quick_parse(command, argv)
    if quick is not None and check is not None:
        with flag_sentences():
            check(quick)
    parser = build_parser()
    remember(command, parser)
    parser.prog = command_prog() or parser.prog
    return parse_flags(parser, argv)


def dataclass_parser(*dataclass_types):
    """``HfArgumentParser`` over ``dataclass_types``, imported only now (it imports transformers)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types)

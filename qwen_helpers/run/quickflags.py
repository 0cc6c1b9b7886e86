"""Answer ``--help`` and a misspelled flag in well under a second, before torch and transformers are imported.

A training command's parser holds every ``TrainingArguments`` flag, and building it imports transformers'
trainer stack (torch, accelerate, peft): about 9 s on a small machine before a typo could be reported, and
importing lazily cannot help, since the parser itself needs those classes. So the first run of a command
records two things in the kit's cache: its help text and the option names its dataclasses define. Later
runs print that help for ``--help``, and name an unknown ``--flag`` with the closest real one, without
importing anything heavy. Nothing is parsed here: the flags are parsed once, by the real ``HfArgumentParser``,
and their values checked by the dataclasses' ``__post_init__``.

A record is keyed by the command, Python and the kit's own source, and holds the versions of the libraries
whose dataclasses it lists; an edit or an upgrade makes the next run record it again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path

from ..common.errors import FlagError, option_names, parse_flags, unknown_flags_message

RECORD_VERSION = 2


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of the kit's own modules: any edit to a flag, a default or a help text makes a new record."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _libraries(parser) -> dict[str, str | None]:
    """Versions of the libraries that define the parser's dataclasses (transformers, trl, ...), the kit's own excepted."""
    roots = {base.__module__.split(".")[0] for dtype in parser.dataclass_types for base in dtype.__mro__}
    return {root: _version(root) for root in sorted(roots - {"builtins", "qwen_helpers", "__main__"})}


def record_path(command: str) -> Path:
    """Where the record of ``command`` (a name plus whatever changes its parser) is kept in the kit's cache."""
    from ..common.tiny import cache_root

    key = json.dumps([RECORD_VERSION, command, sys.version, _source_digest()])
    return cache_root() / "flags" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def remember(command: str, parser) -> None:
    """Record a built parser's help text and option names, once per version; a read-only cache is skipped."""
    path = record_path(command)
    if path.is_file():
        return
    record = {"help": parser.format_help(), "prog": parser.prog, "options": option_names(parser),
              "libraries": _libraries(parser)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        pass


def recorded(command: str) -> dict | None:
    """The record of ``command``, or None when there is none or a library it lists has changed version."""
    try:
        record = json.loads(record_path(command).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(_version(name) != version for name, version in record.get("libraries", {}).items()):
        return None
    return record


def command_prog() -> str | None:
    """``python -m qwen_helpers.train_lora`` for the usage line, as the user typed it (argparse would say ``train_lora.py``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    return f"python -m {name.removesuffix('.__main__')}" if name.startswith("qwen_helpers") else None


def answer_quickly(command: str, argv: list[str]) -> None:
    """From the record of ``command``: print the help and exit 0 for ``--help``; raise for an unknown ``--flag``.

    Anything else (and everything, before the first run has recorded the command) is left to the real parse.
    """
    record = recorded(command)
    if record is None:
        return
    if "-h" in argv or "--help" in argv:
        prog = command_prog() or Path(sys.argv[0]).name  # the command as typed now (the usage line's first word)
        print(record["help"].replace(record["prog"], prog, 1), end="")
        raise SystemExit(0)
    known = set(record["options"])
    unknown = [item for item in argv if item.startswith("--") and item.split("=", 1)[0] not in known]
    if unknown:
        raise FlagError(unknown_flags_message(record["options"], unknown))


def parse_command_flags(command: str, build_parser, argv: list[str] | None):
    """A command's flags into its dataclasses, parsed once; ``--help`` and a misspelled flag answered first, quickly.

    ``build_parser`` returns the command's ``HfArgumentParser`` (importing what it needs).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    answer_quickly(command, argv)
    parser = build_parser()
    parser.prog = command_prog() or parser.prog
    remember(command, parser)
    return parse_flags(parser, argv)


def dataclass_parser(*dataclass_types):
    """``HfArgumentParser`` over ``dataclass_types``, imported only now (it imports transformers)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types)

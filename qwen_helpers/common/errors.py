"""Expected user errors and the command boundary that turns them into one line on stderr and exit code 2.

Every mistake a user can fix (a wrong flag, a missing file, a folder that would be overwritten) raises
a :class:`KitError` whose message names the file, record, field or flag and says what to do. The
command entry points are wrapped in :func:`command_boundary`: a ``KitError`` becomes ``error: ...`` on
one line and exit code 2, with the traceback only under ``--debug``; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import math
import sys
import traceback

EXIT_USER_ERROR = 2  # argparse's own exit code for bad flags; every expected user error uses it
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)
DEBUG_FLAG = "--debug"


class KitError(Exception):
    """A problem the user can fix; the message names the file, record, field or flag and says what to do."""


class FlagError(KitError, ValueError):
    """A command-line flag with a bad value, a bad combination of flags, or a flag that does not exist."""


class DataValidationError(KitError, ValueError):
    """A data file or record that cannot be used, with the file, record and field named."""


class MissingExtraError(KitError, ImportError):
    """A flag that needs an optional package which is not installed; the message gives the install command."""


class ModelFolderError(KitError, ValueError):
    """A --model_path that is missing, empty, or not a checkpoint the kit supports."""


def one_line(message: str) -> str:
    """The message on a single line: an error that scrolls past a screen is not read."""
    return " ".join(str(message).split())


def _flag_error_from_argparse(parser: argparse.ArgumentParser):
    def error(message: str):
        raise FlagError(f"{message}. Run with --help to list every flag.")

    return error


def option_names(parser) -> list[str]:
    """Every option string an ``HfArgumentParser`` gives its dataclasses' fields, by its naming rule: ``--name``,
    ``--dashed-name``, the field's aliases, and ``--no_name`` for a bool that defaults to True."""
    names = {"-h", "--help"}
    for dtype in getattr(parser, "dataclass_types", ()):
        for item in dataclasses.fields(dtype):
            if not item.init:
                continue
            dashed = item.name.replace("_", "-")
            names.update([f"--{item.name}", f"--{dashed}"])
            aliases = item.metadata.get("aliases", [])
            names.update([aliases] if isinstance(aliases, str) else aliases)
            if item.default is True:
                names.update([f"--no_{item.name}", f"--no-{dashed}"])
    return sorted(names)


def unknown_flags_message(known: list[str], unknown: list[str]) -> str:
    """Name each unknown flag with the closest real one, so a typo is fixed in one step."""
    parts = []
    for flag in (item for item in unknown if item.startswith("-")):
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    names = ", ".join(parts) or " ".join(unknown)
    return f"unknown flag or stray value: {names}. Check the spelling; --help lists every flag."


def strict_parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` with every flag problem raised as a :class:`FlagError`.

    Unknown flags are named with the closest real one, and reported before any value problem (a typo
    explains a later complaint). Abbreviated flags are refused: ``--learning_rat`` must not silently
    become ``--learning_rate``.
    """
    parser.allow_abbrev = False
    parser.error = _flag_error_from_argparse(parser)
    namespace, remaining = parser.parse_known_args(args=argv)
    if remaining:
        raise FlagError(unknown_flags_message(option_names(parser), remaining))
    refuse_non_finite(vars(namespace))
    return namespace


# A value each float flag accepts, for the example in refuse_non_finite's sentence (a flag not listed gets none)
FINITE_EXAMPLES = {"learning_rate": "2e-4", "loraplus_lr_ratio": "16", "max_grad_norm": "1.0", "weight_decay": "0.0",
                   "warmup_steps": "0.03", "lora_dropout": "0.05", "temperature": "0.7", "top_p": "0.9",
                   "repetition_penalty": "1.1", "beta": "0.1"}


def refuse_non_finite(values: dict) -> None:
    """Refuse inf and nan in any float flag: Python's float() takes them, and a run or a sampler given one makes NaN."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            example = f" (e.g. --{name} {FINITE_EXAMPLES[name]})" if name in FINITE_EXAMPLES else ""
            raise FlagError(f"--{name} {value}: not a finite number; give an ordinary number{example}.")


@contextlib.contextmanager
def flag_sentences():
    """Raise what a config's ``__post_init__`` or a flag check says as a :class:`FlagError` (a missing extra as
    :class:`MissingExtraError`): sentences about the flags, not bugs."""
    try:
        yield
    except KitError:
        raise
    except ImportError as error:  # a flag that needs an optional extra (--deepspeed): the sentence says what to install
        raise MissingExtraError(str(error)) from error
    except ValueError as error:
        raise FlagError(str(error)) from error


def parse_flags(parser, argv: list[str] | None):
    """The flags into the ``HfArgumentParser``'s dataclasses, parsed once, every problem raised as a :class:`FlagError`.

    Covers what :func:`strict_parse` does, plus the sentences the dataclasses' ``__post_init__`` raise.
    """
    namespace = vars(strict_parse(parser, argv))
    with flag_sentences():  # as HfArgumentParser.parse_args_into_dataclasses builds them, from the one parse
        return tuple(dtype(**{item.name: namespace[item.name] for item in dataclasses.fields(dtype)
                              if item.init and item.name in namespace}) for dtype in parser.dataclass_types)


def strip_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """Take ``--debug`` (alone, or ``--debug True/False``) out of argv; return the rest and whether it was on.

    ``--debug underflow_overflow`` (a ``TrainingArguments`` option) is left in place for the Trainer.
    """
    argv, debug = list(argv), False
    index = 0
    while index < len(argv):
        if argv[index] != DEBUG_FLAG:
            index += 1
            continue
        value = argv[index + 1] if index + 1 < len(argv) else None
        if value is not None and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            debug = value.lower() in ("true", "1", "yes")
            del argv[index : index + 2]
        elif value is None or value.startswith("-"):
            debug = True
            del argv[index]
        else:  # TrainingArguments' own --debug OPTION (e.g. underflow_overflow): leave it to the parser
            index += 2
    return argv, debug


def attach_negative_values(argv: list[str]) -> list[str]:
    """``--flag -1e-3`` as ``--flag=-1e-3``: argparse takes a negative number written with an exponent for a flag
    ("expected one argument"), so the value would never reach the check that explains what is wrong with it."""
    joined, index = [], 0
    while index < len(argv):
        token = argv[index]
        value = argv[index + 1] if index + 1 < len(argv) else None
        if token.startswith("--") and "=" not in token and value is not None and value.startswith("-") and _is_number(value):
            joined.append(f"{token}={value}")
            index += 2
        else:
            joined.append(token)
            index += 1
    return joined


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def report_error(error: BaseException, debug: bool = False) -> int:
    """Print a user error as one ``error: ...`` line on stderr (its traceback first under --debug); return exit code 2."""
    if debug:
        traceback.print_exception(error)
    print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training run; the message says what was kept and how to continue."""


def command_boundary(main):
    """Wrap a command's ``main(argv)``: a :class:`KitError` becomes one line on stderr and exit code 2, Ctrl-C one
    ``interrupted: ...`` line and exit code 130.

    ``--debug`` anywhere in argv shows the traceback as well. Unexpected errors are not caught: their
    traceback is what a bug report needs.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args, **kwargs) -> int:
        argv, debug = strip_debug_flag(sys.argv[1:] if argv is None else argv)
        argv = attach_negative_values(argv)
        try:
            return main(argv, *args, **kwargs)
        except KitError as error:
            return report_error(error, debug)
        except KeyboardInterrupt as interruption:
            if debug:
                traceback.print_exception(interruption)
            said = str(interruption) if isinstance(interruption, RunInterrupted) else "stopped by Ctrl-C."
            print(f"interrupted: {said}", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED

    return wrapper

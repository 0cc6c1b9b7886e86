"""The quick answers: a command's recorded help and option names answer --help and a misspelled flag exactly as the
real parser does, without importing torch or transformers; everything else is parsed once, by the real parser."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_helpers.run import quickflags
from qwen_helpers.common.errors import FlagError, option_names, parse_flags, strict_parse

REPO = Path(__file__).resolve().parent.parent


def real_parsers():
    """The commands' real parsers, built as the commands build them."""
    from qwen_helpers.run.config import DataArguments, KitTrainingArguments, ModelArguments
    from qwen_helpers.export import ExportArguments
    from qwen_helpers.inference import InferenceArguments
    from qwen_helpers.run.methods import get_method

    parsers = {}
    for method in ("lora", "qlora", "prompt_tuning"):
        kind = get_method(method)
        parser = quickflags.dataclass_parser(ModelArguments, DataArguments, kind.arguments, KitTrainingArguments)
        parser.set_defaults(**kind.command_defaults)
        parsers[method] = parser
    parsers["inference"] = quickflags.dataclass_parser(InferenceArguments)
    parsers["export"] = quickflags.dataclass_parser(ExportArguments)
    return parsers


@pytest.fixture(scope="module")
def parsers():
    return real_parsers()


@pytest.mark.parametrize("command", ["lora", "qlora", "prompt_tuning", "inference", "export"])
def test_recorded_option_names_are_the_real_parsers(parsers, command):
    """HfArgumentParser's naming rule, as option_names applies it, matches the options argparse really holds."""
    parser = parsers[command]
    assert option_names(parser) == sorted(parser._option_string_actions)  # the test may look inside; the kit does not


@pytest.mark.parametrize("command", ["lora", "inference"])
def test_recorded_help_is_the_real_help(parsers, command, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "120")
    parser = parsers[command]
    parser.prog = "python -m qwen_helpers.x"
    quickflags.remember(command, parser)
    monkeypatch.setattr(quickflags, "command_prog", lambda: "python -m qwen_helpers.x")
    with pytest.raises(SystemExit) as stop:
        quickflags.answer_quickly(command, ["--help"])
    assert stop.value.code == 0 and capsys.readouterr().out == parser.format_help()


GOOD = [
    [],
    ["--learning_rate", "1e-3", "--lora_r", "16", "--fp16", "False", "--bf16", "--save_strategy", "steps"],
    ["--no_fp16", "--num_train_epochs", "0.5", "--padding_free", "false", "--token_budget", "4096", "--report_to", "none"],
    ["--lr_scheduler_type", "linear", "--optim", "adamw_torch", "--target_modules", "all-linear", "--data_format", "sharegpt"],
]


@pytest.mark.parametrize("argv", GOOD)
def test_one_parse_gives_what_hf_argument_parser_gives(parsers, argv):
    real = parsers["lora"]
    ours = parse_flags(real, argv)
    theirs = real.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    def values(item):  # accelerate's distributed state is a live object, equal only to itself
        return {key: value for key, value in vars(item).items() if key != "distributed_state"}

    assert [values(item) for item in ours] == [values(item) for item in theirs]


def test_a_good_command_line_is_parsed_once(parsers, monkeypatch):
    real, calls = parsers["lora"], []
    parse_known_args = real.parse_known_args
    monkeypatch.setattr(real, "parse_known_args", lambda *a, **k: calls.append(1) or parse_known_args(*a, **k))
    parse_flags(real, GOOD[1])
    assert calls == [1]


@pytest.mark.parametrize("typo, meant", [("--learning_rat", "--learning_rate"), ("--learning", "--learning_rate"),
                                         ("--lora_rr", "--lora_r")])
def test_the_quick_answer_to_a_typo_is_the_real_parsers(parsers, typo, meant, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    quickflags.remember("lora", parsers["lora"])
    with pytest.raises(FlagError) as from_real:
        strict_parse(parsers["lora"], [typo, "1"])
    with pytest.raises(FlagError) as quick:
        quickflags.answer_quickly("lora", [typo, "1"])
    assert str(quick.value) == str(from_real.value) and f"did you mean {meant}?" in str(quick.value)
    quickflags.answer_quickly("lora", ["--lora_r", "eight"])  # values are the real parse's: nothing said here


def test_a_record_is_dropped_when_the_kit_or_a_library_changes(parsers, monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    first = quickflags.record_path("train/lora/{}")
    assert quickflags.record_path("train/qlora/{}") != first
    quickflags.remember("train/lora/{}", parsers["lora"])
    assert set(quickflags.recorded("train/lora/{}")["libraries"]) >= {"transformers"}
    monkeypatch.setattr(quickflags, "_version", lambda name: "0.0.0")
    assert quickflags.recorded("train/lora/{}") is None
    monkeypatch.setattr(quickflags, "_source_digest", lambda: "an edited kit")
    assert quickflags.record_path("train/lora/{}") != first

PROBE = """
import sys
from qwen_helpers.{module} import main
try:
    code = main({argv!r})
except SystemExit as stop:
    code = stop.code
print("RESULT", code, "torch" in sys.modules, "transformers" in sys.modules, flush=True)
"""


def probe(module: str, argv: list[str], cache: Path) -> tuple[str, str]:
    """Run a command's main in a fresh interpreter; return (last stdout line, stderr)."""
    env = {**os.environ, "QWEN_HELPERS_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module, argv=argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.stdout.strip().splitlines()[-1], done.stderr


@pytest.mark.parametrize("module, typo, meant", [("train_lora", "--learning_rat", "--learning_rate"),
                                                 ("inference", "--max_new_tokns", "--max_new_tokens")])
def test_second_run_answers_without_torch_or_transformers(module, typo, meant, tmp_path):
    cold, _ = probe(module, ["--help"], tmp_path)
    assert cold.startswith("RESULT 0") and cold.endswith("True")  # the first builds the real parser with transformers, and records it
    warm, _ = probe(module, ["--help"], tmp_path)
    assert warm == "RESULT 0 False False"
    result, stderr = probe(module, [typo, "4"], tmp_path)  # a misspelled flag: one line, exit 2
    assert result == "RESULT 2 False False"
    assert stderr.strip() == f"error: unknown flag or stray value: {typo} (did you mean {meant}?). Check the spelling; --help lists every flag."


def test_value_checks_are_the_dataclasses_after_the_one_parse(tmp_path):
    """A bad value is not answered from the record: the real parse and __post_init__ check it, once."""
    for argv, named in ((["--learning_rate", "-1"], "--learning_rate must be above 0"), (["--max_length", "8"], "--max_length 8"),
                        (["--lora_alpha", "-32"], "--lora_alpha must be above 0")):
        result, stderr = probe("train_lora", argv, tmp_path)
        assert result == "RESULT 2 True True", argv
        assert stderr.strip().startswith("error: ") and named in stderr and len(stderr.strip().splitlines()) == 1, stderr

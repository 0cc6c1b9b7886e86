"""The quick flag check: a parser rebuilt from a command's recorded schema answers exactly as the real one does,
and a command with a recorded schema answers --help and flag mistakes without importing torch or transformers."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_helpers import quickflags
from qwen_helpers.errors import FlagError, strict_parse

REPO = Path(__file__).resolve().parent.parent


def real_parsers():
    """The commands' real parsers, built as the commands build them."""
    from qwen_helpers.config import DataArguments, KitTrainingArguments, ModelArguments
    from qwen_helpers.export import ExportArguments
    from qwen_helpers.inference import InferenceArguments
    from qwen_helpers.methods import get_method

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


def rebuilt(parser):
    """The parser as the quick path sees it: through the JSON the cache holds."""
    return quickflags.rebuild(json.loads(json.dumps(quickflags.describe(parser))), prog=parser.prog)


def plain(namespace: argparse.Namespace) -> dict:
    """Values as the schema stores them (an enum as its value)."""
    return {key: getattr(value, "value", value) for key, value in vars(namespace).items()}


@pytest.mark.parametrize("command", ["lora", "qlora", "prompt_tuning", "inference", "export"])
def test_rebuilt_help_is_the_real_help(parsers, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert rebuilt(parsers[command]).format_help() == parsers[command].format_help()


GOOD = [
    [],
    ["--learning_rate", "1e-3", "--lora_r", "16", "--fp16", "False", "--bf16", "--save_strategy", "steps"],
    ["--no_fp16", "--num_train_epochs", "0.5", "--padding_free", "false", "--token_budget", "4096", "--report_to", "none"],
    ["--lr_scheduler_type", "linear", "--optim", "adamw_torch", "--target_modules", "all-linear", "--data_format", "sharegpt"],
]
BAD = [
    ["--learning_rat", "1"],  # a typo: named with the real flag
    ["--learning", "1"],  # an abbreviation is a typo too
    ["--lora_r", "eight"],  # wrong type
    ["--fp16", "maybe"],  # not a truthy value
    ["--overflow", "cut"],  # outside the choices
    ["--lora_r"],  # value missing
    ["--output_dir", "a", "stray"],  # a stray value
]


@pytest.mark.parametrize("argv", GOOD)
def test_rebuilt_parser_gives_the_real_values(parsers, argv):
    real = parsers["lora"]
    assert plain(strict_parse(rebuilt(real), argv)) == plain(strict_parse(real, argv))


@pytest.mark.parametrize("argv", BAD)
def test_rebuilt_parser_refuses_what_the_real_one_refuses_with_the_same_words(parsers, argv):
    real = parsers["lora"]
    with pytest.raises(FlagError) as from_real:
        strict_parse(real, argv)
    with pytest.raises(FlagError) as from_schema:
        strict_parse(rebuilt(real), argv)
    assert str(from_schema.value) == str(from_real.value)


def test_schema_key_changes_with_library_versions_and_the_kits_source(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    first = quickflags.schema_path("train/lora/{}")
    assert quickflags.schema_path("train/qlora/{}") != first
    monkeypatch.setattr(quickflags, "_library_versions", lambda: {"transformers": "0.0.0"})
    assert quickflags.schema_path("train/lora/{}") != first
    monkeypatch.undo()
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    monkeypatch.setattr(quickflags, "_source_digest", lambda: "an edited kit")
    assert quickflags.schema_path("train/lora/{}") != first


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
    result, stderr = probe(module, [typo, "4"], tmp_path)
    assert result == "RESULT 2 False False"
    assert stderr.strip() == f"error: unknown flag or stray value: {typo} (did you mean {meant}?). Check the spelling; --help lists every flag."


def test_value_checks_run_on_the_quick_parse(tmp_path):
    probe("train_lora", ["--help"], tmp_path)
    for argv, named in ((["--learning_rate", "-1"], "--learning_rate must be above 0"), (["--max_length", "8"], "--max_length 8"),
                        (["--lora_alpha", "-32"], "--lora_alpha must be above 0"), (["--token_budget", "4"], "--token_budget 4"),
                        (["--model_path", str(tmp_path / "no-such-model")], "no such folder")):
        result, stderr = probe("train_lora", argv, tmp_path)
        assert result == "RESULT 2 False False", argv
        assert stderr.startswith("error: ") and named in stderr, stderr
    result, stderr = probe("train_prompt_tuning", ["--padding_free", "True"], tmp_path)
    assert result.startswith("RESULT 2") and "--padding_free True" in stderr

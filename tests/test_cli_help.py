"""Every command answers --help with its usage and exit code 0 (argparse formats each help text with %, so one
stray percent sign in a field's help breaks the whole command's --help)."""

import importlib

import pytest

COMMANDS = ["train_lora", "train_qlora", "train_prompt_tuning", "train_dpo", "train_grpo", "inference", "export", "benchmark.__main__", "benchmark.suite", "benchmark.data_speed",
            "inspect_data", "make_tiny_qwen", "demo"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_exits_0(module, capsys):
    main = importlib.import_module(f"qwen_helpers.{module}").main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_usage_line_names_the_command_as_typed_and_cli_lists_the_commands():
    """argparse would say ``usage: train_lora.py``; the user typed ``python -m qwen_helpers.train_lora``."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "qwen_helpers.inspect_data", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m qwen_helpers.inspect_data ")
    listed = subprocess.run([sys.executable, "-m", "qwen_helpers.cli", "--help"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "python -m qwen_helpers.train_lora" in listed.stdout

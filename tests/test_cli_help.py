"""Every command answers --help with its usage and exit code 0 (argparse formats each help text with %, so one
stray percent sign in a field's help breaks the whole command's --help)."""

import importlib

import pytest

COMMANDS = ["train_lora", "train_qlora", "train_prompt_tuning", "inference", "export", "benchmark.__main__", "benchmark.suite", "benchmark.data_speed",
            "inspect_data", "make_tiny_qwen", "demo"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage_and_exits_0(module, capsys):
    main = importlib.import_module(f"qwen_helpers.{module}").main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out

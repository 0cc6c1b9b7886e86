"""The README's demo: on the tiny model its adapter answers trained records word for word, and its log is readable."""

import json
import re
from pathlib import Path

import pytest

from qwen_helpers import demo


def test_demo_memorises_its_records_and_prints_clean_loss_lines(tmp_path, capsys):
    args = demo.parse_args(["--output_dir", str(tmp_path / "demo")])
    demo.quiet_library_warnings()
    result = demo.run_demo(args)
    demo.print_report(result, args.model_path)
    printed = capsys.readouterr().out

    assert result.exact >= 2, f"the adapter reproduced {result.exact} of {len(result.trained)} trained answers: {result.after}"
    assert result.after != result.before
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json"} <= {path.name for path in (tmp_path / "demo").iterdir()}
    records = json.loads((tmp_path / "demo" / "run_config.json").read_text())["data_path"]  # what was trained is still there
    assert records == str(tmp_path / "demo.train_records.json") and len(json.loads(Path(records).read_text())) == len(result.trained)
    loss_lines = re.findall(r"^step +\d+/30  loss +(\d+\.\d{4})  learning rate", printed, flags=re.MULTILINE)
    assert len(loss_lines) == 6, printed  # one line per log (logging_steps=5 over 30 steps)
    assert float(loss_lines[-1]) < float(loss_lines[0])
    floor = re.search(r"Why the last loss is not 0: (\d+) of (\d+) trained tokens are the model's first choice, yet they "
                      r"cost (\d+\.\d+) nats each on average; <\|im_end\|> alone costs", printed)
    assert floor and float(floor[3]) > 0.1, printed  # the loss is real...
    assert floor[1] == floor[2] or result.exact < len(result.trained), printed  # ...while every trained token is right
    assert "'loss'" not in printed and "{'" not in printed, "the Trainer's raw log dicts leaked into the demo's output"
    assert f"{result.exact} answered word for word" in printed


def test_demo_refuses_a_folder_that_holds_files(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_held_out_answers_are_labelled_for_what_they_are():
    trained = [{"output": "Hello"}, {"output": "Thanks"}]
    memorised = "a memorised training answer, not this prompt's"
    assert demo.held_out_label("Hello", {"output": "Good morning"}, trained) == memorised
    assert demo.held_out_label("Good morning", {"output": "Good morning"}, trained) == "the reference"
    assert demo.held_out_label("xq!", {"output": "Good morning"}, trained) == "not the reference 'Good morning'"

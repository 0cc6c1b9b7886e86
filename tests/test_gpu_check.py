"""scripts/gpu_check.sh's CPU variant: the same suite code the GPU check runs, on the tiny model, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_variant_writes_the_table_and_decode(tmp_path):
    folder = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    # --repeats 1: one round of the kit vs plain vs TRL part (3 processes instead of the default 3 rounds' 9), for CI's time
    process = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--folder", str(folder), "--repeats", "1"],
                             capture_output=True, text=True, timeout=3600, env=env, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    payload = json.loads((folder / "results.json").read_text())
    rows = {row["run"]: row for row in payload["rows"]}
    assert {f"tiny {name}" for name in ("lora_bf16", "lora_bf16 (plain)", "lora_bf16 (TRL)", "lora_bf16 dynamic", "lora_bf16 dynamic (plain)",
                                        "lora_bf16 padding_free")} == set(rows)
    assert all(row["status"] == "ok" and row["tokens_per_second"] > 0 for row in rows.values())
    assert rows["tiny lora_bf16"]["speed_vs_plain"] > 0 and rows["tiny lora_bf16 padding_free"]["speed_vs_plain"] > 0
    kit, plain, trl = (rows[f"tiny lora_bf16{side}"] for side in ("", " (plain)", " (TRL)"))
    assert kit["speed_vs_trl"] == pytest.approx(kit["tokens_per_second"] / trl["tokens_per_second"])
    # TRL's SFTTrainer trained as many tokens as the kit, counted in each side's forward passes (which tokens:
    # tests/test_benchmark.py::test_trl_reference_tokenises_exactly_the_kits_examples), the answers only
    assert kit["trained_tokens_per_step"] == plain["trained_tokens_per_step"] == trl["trained_tokens_per_step"]
    assert 2 <= kit["trained_tokens_per_step"] < kit["real_tokens_per_step"]
    assert kit["real_tokens_per_step"] == trl["real_tokens_per_step"] == 2 * 32 and trl["trainable"] == kit["trainable"]
    assert any("TRL SFTTrainer: padding_free=True, completion_only_loss=True" in note for note in trl["notes"])
    assert rows["tiny lora_bf16 padding_free"]["real_tokens_per_step"] == rows["tiny lora_bf16 dynamic"]["real_tokens_per_step"]  # same examples
    decode = json.loads((folder / "decode.json").read_text())
    assert [row["model"] for row in decode] == ["LoRA unmerged", "LoRA merged"] and all(row["new_tokens_per_second"] > 0 for row in decode)
    markdown = (folder / "results.md").read_text()
    assert "## Decode" in markdown and "kit / plain tokens/s" in markdown and "kit / TRL tokens/s" in markdown
    for name in ("results.csv", "memory.png", "throughput.png"):
        assert (folder / name).stat().st_size > 0
    assert "LoRA merged" in process.stdout and "| run |" in process.stdout


def test_a_check_with_a_failed_row_exits_1_naming_it(tmp_path, monkeypatch, capsys):
    """The table shows a failed row's status, but the exit code said 0 (a rehearsal's own check caught it)."""
    from qwen_helpers.benchmark import suite

    rows = [{"method": "lora_bf16", "side": "kit", "status": "ok"}, {"method": "lora_bf16", "side": "trl", "status": "error: boom"}]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    monkeypatch.setattr(suite, "run_suite", lambda args: tmp_path)
    assert suite.main(["--device", "cpu"]) == 1
    assert "1 of 2 rows did not complete: lora_bf16 (trl): error: boom" in capsys.readouterr().err
    rows[1]["status"] = "ok"
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    assert suite.main(["--device", "cpu"]) == 0

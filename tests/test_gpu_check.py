"""scripts/gpu_check.sh's CPU variant: the same suite code the GPU check runs, on the tiny model, so the script cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_cpu_variant_writes_the_table_and_decode(tmp_path):
    folder = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    process = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--folder", str(folder)],
                             capture_output=True, text=True, timeout=3600, env=env, cwd=tmp_path)
    assert process.returncode == 0, process.stderr[-3000:]
    payload = json.loads((folder / "results.json").read_text())
    rows = {row["run"]: row for row in payload["rows"]}
    assert {f"tiny {name}" for name in ("lora_bf16", "lora_bf16 (plain)", "lora_bf16 dynamic", "lora_bf16 dynamic (plain)", "lora_bf16 padding_free")} == set(rows)
    assert all(row["status"] == "ok" and row["tokens_per_second"] > 0 for row in rows.values())
    assert rows["tiny lora_bf16"]["speed_vs_plain"] > 0 and rows["tiny lora_bf16 padding_free"]["speed_vs_plain"] > 0
    assert rows["tiny lora_bf16 padding_free"]["real_tokens_per_step"] == rows["tiny lora_bf16 dynamic"]["real_tokens_per_step"]  # same examples
    decode = json.loads((folder / "decode.json").read_text())
    assert [row["model"] for row in decode] == ["LoRA unmerged", "LoRA merged"] and all(row["new_tokens_per_second"] > 0 for row in decode)
    markdown = (folder / "results.md").read_text()
    assert "## Decode" in markdown and "kit / plain tokens/s" in markdown
    for name in ("results.csv", "memory.png", "throughput.png"):
        assert (folder / name).stat().st_size > 0
    assert "LoRA merged" in process.stdout and "| run |" in process.stdout

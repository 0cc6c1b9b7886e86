"""Notebooks 01, 02 and 05 run unchanged on a Qwen3.5 replica: only the parameters cell's values differ.

A cell placed right after the parameters cell (as papermill injects one) sets ``MODEL_PATH = "tiny-qwen3.5"`` (the
hub-shaped Qwen3.5-0.8B replica: vision tower in the folder, 248k vocabulary, hybrid linear attention), writes
to a temporary folder, and shortens the training caps; everything else is the notebook as a learner runs it.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
OVERRIDES = {
    "01_data_prep.ipynb": 'OUTPUT_DIR = {tmp!r} + "/processed"',
    "02_lora_fp16.ipynb": 'OUTPUT_DIR = {tmp!r} + "/lora"',
    "05_inference.ipynb": ('ADAPTERS = []\nQUICK_ADAPTER = {tmp!r} + "/nb05_lora"\nTOOL_ADAPTER = {tmp!r} + "/nb05_tools"\n'
                           'MERGED_DIR = {tmp!r} + "/merged"\nGGUF_DIR = {tmp!r} + "/gguf"\nTEST_RECORDS = 4'),
}


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_notebook_runs_on_a_qwen3_5_replica(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    position = next(index for index, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = f'MODEL_PATH = "tiny-qwen3.5"\n{OVERRIDES[name].format(tmp=str(tmp_path))}'
    nb.cells.insert(position + 1, nbformat.v4.new_code_cell(injected))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    printed = "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs)
    if name == "02_lora_fp16.ipynb":
        assert "padding-free is off" in printed and "Gated DeltaNet" in printed  # the kit padded, and said why

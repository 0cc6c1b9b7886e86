"""Repository hygiene: the conda and pip dependency lists agree, and notebooks are committed clean and well-formed."""

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _environment_pip_requirements() -> list[str]:
    lines = (REPO / "environment.yml").read_text(encoding="utf-8").splitlines()
    start = lines.index("  - pip:") + 1
    return [line.strip()[2:] for line in lines[start:] if line.strip().startswith("- ")]


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert _environment_pip_requirements() == expected


def test_notebooks_exist_in_order():
    names = [path.name for path in NOTEBOOKS]
    assert names[:2] == ["01_data_prep.ipynb", "02_lora_fp16.ipynb"]
    numbered = [name[:3] for name in names if name[2] == "_"]  # 02b_, 02c_: side lessons after their numbered one
    assert numbered == [f"{i:02d}_" for i in range(1, len(numbered) + 1)]
    assert all(name[2] == "_" or (name[2].isalpha() and name[3] == "_" and f"{name[:2]}_" in numbered)
               for name in names)


def _committed(path: Path) -> bool:
    result = subprocess.run(["git", "ls-files", "--error-unmatch", str(path)], cwd=REPO, capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    if not _committed(path):
        pytest.skip("not committed yet")
    committed = subprocess.run(["git", "show", f"HEAD:notebooks/{path.name}"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    cells = [cell for cell in json.loads(committed)["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] and cell["execution_count"] is None for cell in cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_tagged_parameters_cell(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert cells[0]["cell_type"] == "markdown"
    first_code = next(cell for cell in cells if cell["cell_type"] == "code")
    assert "parameters" in first_code["metadata"].get("tags", [])
    assert "import" not in "".join(first_code["source"])  # literals only


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_ends_on_a_figure_it_would_draw_twice(path):
    """Jupyter draws a pyplot figure at the end of its cell and again as the cell's value: a cell must not end on a
    call of qwen_helpers.notebook.plots (end it with plt.show(), or assign the figure)."""
    import ast

    import qwen_helpers.notebook.plots as plots

    figure_makers = {name for name in dir(plots) if name.startswith("plot_")}
    for index, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code" or not "".join(cell["source"]).strip():
            continue
        tree = ast.parse("".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!"))))
        last = tree.body[-1] if tree.body else None
        called = last.value.func if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call) else None
        name = getattr(called, "id", getattr(called, "attr", None))
        assert name not in figure_makers, f"cell {index} ends on {name}(...): its figure would be drawn twice"

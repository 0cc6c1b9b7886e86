"""The package's shape: folders are floors, imports point down them (common <- data <- run <- models <- ... <- commands),
no module imports in a cycle, every module imports on its own, files stay small."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen_helpers"

# The layers are the package's folders, lowest first. A module may import its own folder and the folders below it,
# never above. The package root holds only the commands users run (``python -m qwen_helpers.X``); the benchmark is a
# command too. ``notebook`` (widgets, plots) sits just below the commands, so no core module can import it.
FLOORS = ["common", "data", "run", "models", "evaluation", "training", "deploy", "notebook", "benchmark"]
COMMANDS = len(FLOORS)  # the root's floor
# Floors that must not import each other although their ranks differ: training and deploy are siblings.
SIBLINGS = {frozenset({"training", "deploy"})}
MAX_LINES = 400


def module_names() -> list[str]:
    """Every module of the package, by dotted name under qwen_helpers ('data.records'; a folder's __init__ as 'data')."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return names


def folder_of(module: str) -> str | None:
    """The folder a module lives in (None for the package root)."""
    return module.split(".")[0] if (PACKAGE / module.split(".")[0]).is_dir() else None


def floor_of(module: str) -> int:
    folder = folder_of(module)
    if folder is None:
        return COMMANDS
    assert folder in FLOORS, f"qwen_helpers/{folder}/: a folder with no floor; add it to FLOORS in tests/test_architecture.py."
    return FLOORS.index(folder)


def path_of(module: str) -> Path:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    return path if path.is_file() else PACKAGE / module.replace(".", "/") / "__init__.py"


def package_imports(module: str) -> set[str]:
    """Modules of the package that ``module`` imports anywhere in its file (function-level imports included)."""
    path = path_of(module)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    return imports_in(path.read_text(encoding="utf-8"), package_parts) - {module}


def _existing(parts: list[str]) -> str | None:
    """The dotted name of the package module ``parts`` names, if it is one."""
    if parts and ((PACKAGE.joinpath(*parts).with_suffix(".py")).is_file() or (PACKAGE.joinpath(*parts) / "__init__.py").is_file()):
        return ".".join(parts)
    return None


def imports_in(source: str, package_parts: list[str]) -> set[str]:
    """Package modules imported by ``source``, a file inside qwen_helpers/<package_parts>: ``from .x import y`` counts
    y when y is a module, else x."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "qwen_helpers"):
            if node.level:
                target = [*package_parts[: len(package_parts) - (node.level - 1)], *(node.module.split(".") if node.module else [])]
            else:
                target = node.module.split(".")[1:]
            for alias in node.names:
                imported.add(_existing([*target, alias.name]) or _existing(target) or "")
        elif isinstance(node, ast.Import):
            imported.update(_existing(alias.name.split(".")[1:]) or "" for alias in node.names if alias.name.startswith("qwen_helpers."))
    return {name for name in imported if name}


# One interpreter imports the heavy libraries once, then forks a child per module; the child imports that module
# before any other of the package, as a fresh interpreter would (50 fresh interpreters cost ~10 s of torch each).
IMPORT_EACH_ALONE = """
import json, os, sys, traceback
import torch, numpy, datasets, accelerate, peft, transformers, matplotlib.pyplot  # not the package: libraries only
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments
results = {}
for module in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            assert not any(name.startswith("qwen_helpers") for name in sys.modules)
            __import__("qwen_helpers." + module)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc()[-2000:].encode())
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[module] = "" if status == 0 else message or f"exit status {status}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def imported_alone() -> dict[str, str]:
    """module -> '' if it imports as the first module of the package in a new process, else the traceback."""
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *module_names()], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", module_names())
def test_module_imports_alone_in_a_fresh_interpreter(module, imported_alone):
    """An import cycle shows up as an ImportError when the module is the first one imported."""
    assert imported_alone[module] == "", imported_alone[module]


def test_imports_point_down_the_floors():
    problems = []
    for module in module_names():
        for imported in package_imports(module):
            here, there = floor_of(module), floor_of(imported)
            if there > here:
                problems.append(f"{module} (floor {here}) imports {imported} (floor {there}, above it)")
            elif frozenset({folder_of(module), folder_of(imported)}) in SIBLINGS:
                problems.append(f"{module} imports {imported}: sibling floors stay apart")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_root_holds_only_commands():
    """Every module at the package root is a command: a main() and a ``python -m qwen_helpers.X`` entry."""
    not_commands = [path.name for path in PACKAGE.glob("*.py")
                    if path.name not in ("__init__.py", "__main__.py")
                    and not ("def main(" in (text := path.read_text(encoding="utf-8")) and 'if __name__ == "__main__"' in text)]
    assert not not_commands, f"modules at the root that are not commands (move them into their layer's folder): {not_commands}"


def test_every_folder_is_a_floor():
    folders = sorted(path.parent.name for path in PACKAGE.glob("*/__init__.py"))
    assert folders == sorted(FLOORS), f"folders {folders} vs FLOORS {sorted(FLOORS)}"


def test_no_import_cycles():
    """Over every module, the benchmark's included, with no folding: plain <-> worker would show."""
    graph = {module: package_imports(module) for module in module_names()}
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        if node in done:
            return
        if node in visiting:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        visiting.add(node)
        for neighbour in sorted(graph.get(node, ())):
            if neighbour != node.rsplit(".", 1)[0]:  # a module importing its own folder's __init__ is not a cycle
                visit(neighbour, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_stay_small():
    long = {
        str(path.relative_to(PACKAGE)): count
        for path in PACKAGE.rglob("*.py")
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_the_import_parser_sees_hidden_imports():
    """Function-level, absolute and package-relative imports all count, so an upward import cannot hide in a function."""
    source = ("import torch\n\ndef f():\n    from ..training.sft import train\n    from qwen_helpers.cli import main\n"
              "    import qwen_helpers.demo\n    from ..data import records\n")
    assert imports_in(source, ["run"]) == {"training.sft", "cli", "demo", "data.records"}
    assert imports_in("from ..models.loading import load_base_model\n", ["benchmark"]) == {"models.loading"}
    assert floor_of("training.sft") > floor_of("run.precision") and floor_of("cli") == COMMANDS

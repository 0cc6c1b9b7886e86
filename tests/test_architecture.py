"""The package's shape: every module imports on its own, imports point one way (leaves <- core <- commands), files stay small."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen_helpers"

# Leaves import only other leaves; the core imports leaves and core; commands import anything.
# widgets and plots are leaves that the core never imports (they draw; the core computes).
LAYERS = {
    "leaf": {"tiny", "adapter_folder", "records", "chat_records", "tool_calls", "chat_spans", "data", "data_files", "raw_text", "fingerprints", "metrics", "plots", "widgets", "precision", "methods", "config", "allocator",
             "presets", "files", "errors", "checks", "flag_checks", "quickflags", "llama_child", "prompt_settings"},
    "core": {"lora_variants", "modeling", "train", "held_out", "adapters", "generation", "evaluation", "classification", "merge", "batching", "speed", "gguf_export", "ollama", "serving", "callbacks", "run_folder", "plan",
             "preference", "preference_training", "rewards", "grpo_training"},
    "command": {"cli", "inference", "export", "train_lora", "train_qlora", "train_prompt_tuning", "demo", "benchmark", "make_tiny_qwen",
                "inspect_data", "__main__", "train_dpo", "train_grpo"},
}
RANK = {"leaf": 0, "core": 1, "command": 2}
DISPLAY_ONLY = {"widgets", "plots"}
MAX_LINES = 400


def module_names() -> list[str]:
    """Every module of the package, by dotted name under qwen_helpers ('benchmark.worker' for a subpackage's module)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            names.append(".".join(parts))
    return names


def layer_of(module: str) -> str:
    """The layer of a module (a subpackage's modules share the layer of the subpackage)."""
    top = module.split(".")[0]
    for layer, members in LAYERS.items():
        if top in members:
            return layer
    raise AssertionError(f"qwen_helpers/{top}: no layer assigned; add it to LAYERS in tests/test_architecture.py.")


def package_imports(module: str) -> set[str]:
    """Top-level qwen_helpers modules that ``module`` imports anywhere in its file (function-level imports included)."""
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.is_file():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    own_top = module.split(".")[0]
    return {name for name in imports_in(path.read_text(encoding="utf-8"), package_parts) if name != own_top}


def imports_in(source: str, package_parts: list[str]) -> set[str]:
    """Top-level qwen_helpers names imported by ``source``, a file inside qwen_helpers/<package_parts>."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            imported.update([target[0]] if target else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qwen_helpers":
            rest = node.module.split(".")[1:]
            imported.update([rest[0]] if rest else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("qwen_helpers."))
    return {name for name in imported if (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()}


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


def test_imports_point_one_way():
    problems = []
    for module in module_names():
        layer = layer_of(module)
        for imported in package_imports(module):
            if RANK[layer_of(imported)] > RANK[layer]:
                problems.append(f"{module} ({layer}) imports {imported} ({layer_of(imported)})")
            if imported in DISPLAY_ONLY and layer != "command" and module.split(".")[0] not in DISPLAY_ONLY:
                problems.append(f"{module} ({layer}) imports {imported}, a display leaf only commands and notebooks use")
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_cycles():
    graph = {module.split(".")[0]: set() for module in module_names()}
    for module in module_names():
        graph[module.split(".")[0]] |= package_imports(module)
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        if node in done:
            return
        if node in visiting:
            cycles.append(" -> ".join(path[path.index(node):] + [node]))
            return
        visiting.add(node)
        for neighbour in sorted(graph.get(node, ())):
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
    source = "import torch\n\ndef f():\n    from .train import train\n    from qwen_helpers.cli import main\n    import qwen_helpers.demo\n"
    assert imports_in(source, []) == {"train", "cli", "demo"}
    assert imports_in("from ..modeling import load_base_model\n", ["benchmark"]) == {"modeling"}
    assert RANK[layer_of("train")] > RANK[layer_of("precision")]

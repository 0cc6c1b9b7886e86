"""Shared fixtures: the tiny Qwen checkpoint (built once per cache), its tokenizer, and small data files."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers on two cores: one torch thread each (set before torch is imported, inherited by the commands,
    # notebook kernels and torchrun ranks the tests start). Tiny models gain little from a second thread, and two
    # workers with two threads each spin-wait on each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "replica: runs a command on every checkpoint replica (slow on a CPU); -m 'not replica' skips them")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup): the notebooks run in order in one worker (05 reads what 02-04 wrote to
    outputs/), and so does the browser test's JupyterLab; everything else is spread over the workers."""
    for item in items:
        if item.nodeid.startswith("notebooks/"):
            item.add_marker(pytest.mark.xdist_group("notebooks"))
        elif item.nodeid.startswith("tests/test_browser.py"):
            item.add_marker(pytest.mark.xdist_group("browser"))
DATA = REPO / "data"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from qwen_helpers.common.tiny import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from qwen_helpers.models.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def small_train_file(tmp_path) -> str:
    """The first 16 generation records: enough for a few training steps."""
    records = json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path / "small_train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)

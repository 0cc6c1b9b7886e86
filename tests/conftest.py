"""Shared fixtures: the tiny Qwen checkpoint (built once per cache), its tokenizer, and small data files."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "replica: runs a command on every checkpoint replica (slow on a CPU); -m 'not replica' skips them")
DATA = REPO / "data"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from qwen_helpers.tiny import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from qwen_helpers.modeling import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def small_train_file(tmp_path) -> str:
    """The first 16 generation records: enough for a few training steps."""
    records = json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:16]
    path = tmp_path / "small_train.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)

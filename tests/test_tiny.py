"""The embedded tiny Qwen: real architecture classes, Qwen's vocabulary, deterministic, offline, self-repairing."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwen_helpers.common import tiny


def _weights_digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_loads_with_plain_auto_classes(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == 151936 == model.get_input_embeddings().weight.shape[0]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    non_embedding = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert 1_000_000 < non_embedding < 10_000_000
    assert tokenizer.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(tiny_path).eos_token_id == [151645, 151643]


def test_build_is_deterministic_and_repairs_damage(tiny_path, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_HELPERS_CACHE", str(tmp_path))
    fresh = tiny.tiny_model_path("qwen2")
    assert fresh.parent == tmp_path
    assert _weights_digest(fresh) == _weights_digest(tiny.Path(tiny_path))  # two builds, identical weights

    (fresh / "model.safetensors").write_bytes(b"damaged")
    assert not tiny.is_complete_build(fresh)
    repaired = tiny.tiny_model_path("qwen2")
    assert tiny.is_complete_build(repaired) and _weights_digest(repaired) == _weights_digest(tiny.Path(tiny_path))


def test_make_tiny_qwen_command_builds_qwen3(tmp_path):
    from qwen_helpers.make_tiny_qwen import main

    assert main([str(tmp_path / "q3"), "--arch", "qwen3"]) == 0
    config = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q3")
    logits = model(torch.tensor([[9707, 1879]])).logits
    assert logits.shape == (1, 2, 151936) and torch.isfinite(logits).all()


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="--arch"):
        tiny.tiny_config("qwen1")

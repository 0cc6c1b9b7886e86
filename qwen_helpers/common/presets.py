"""Qwen2.5 and Qwen3 architecture presets: the public config.json shapes, for benchmarks with random weights.

Memory and speed depend on the shapes, never on the weight values, so a random model of the right
architecture measures what the real checkpoint would, without a download. Each preset is written out
as the keyword arguments of ``Qwen2Config`` / ``Qwen3Config`` (copied from the public config.json of
the base checkpoints); :func:`parameter_breakdown` counts parameters analytically and the tests check
the totals against the published figures (Qwen2.5-0.5B 494,032,768; Qwen2.5-7B 7,615,616,512;
Qwen3-8B 8,190,735,360).
"""

from __future__ import annotations

import os
from pathlib import Path

from .tiny import TINY_ALIASES, VOCAB_SIZE, cache_root, resolve_model_path

_COMMON = dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0)
_QWEN25 = dict(model_type="qwen2", max_position_embeddings=32768, **_COMMON)
_QWEN3 = dict(model_type="qwen3", max_position_embeddings=40960, head_dim=128, **_COMMON)

PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, **_QWEN25),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, **_QWEN25),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, **_QWEN25),
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True, **_QWEN3),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True, **_QWEN3),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=True, **_QWEN3),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=151936, tie_word_embeddings=False, **_QWEN3),
}
CPU_PRESET_LIMIT = 1_000_000_000  # parameters; above this a CPU run takes minutes per step and tens of GB
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def preset_names() -> list[str]:
    """Every name ``--preset`` accepts: the tiny models, then the public architectures."""
    return ["tiny", "tiny-qwen3", *PRESETS]


def preset_config(name: str):
    """The ``Qwen2Config`` / ``Qwen3Config`` of a preset (the tiny ones come from the cached tiny checkpoint)."""
    from transformers import AutoConfig, Qwen2Config, Qwen3Config

    if name in TINY_ALIASES:
        return AutoConfig.from_pretrained(resolve_model_path(name))
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is not known. Choose one of: {', '.join(preset_names())}.")
    kwargs = dict(PRESETS[name])
    config_class = Qwen3Config if kwargs.pop("model_type") == "qwen3" else Qwen2Config
    return config_class(**kwargs)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer in one decoder layer."""
    hidden, inner, head_dim = config.hidden_size, config.intermediate_size, _head_dim(config)
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "q_proj": (hidden, q_dim), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim), "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden),
    }


def parameter_breakdown(config) -> dict[str, int]:
    """Parameters by kind: embedding, lm_head (0 when tied), decoder linear weights, biases, norms."""
    layers = config.num_hidden_layers
    shapes = linear_shapes(config)
    has_bias = config.model_type == "qwen2"  # Qwen2/2.5 have q/k/v biases; Qwen3 has none
    has_qk_norm = config.model_type == "qwen3"  # Qwen3 normalises q and k per head
    biases = sum(shapes[name][1] for name in ("q_proj", "k_proj", "v_proj")) if has_bias else 0
    norms = 2 * config.hidden_size + (2 * _head_dim(config) if has_qk_norm else 0)
    embedding = config.vocab_size * config.hidden_size
    return {
        "embedding": embedding,
        "lm_head": 0 if config.tie_word_embeddings else embedding,
        "linear": layers * sum(inputs * outputs for inputs, outputs in shapes.values()),
        "biases": layers * biases,
        "norms": layers * norms + config.hidden_size,
    }


def count_preset_parameters(config) -> int:
    """Total parameters of the architecture, counted from the shapes alone."""
    return sum(parameter_breakdown(config).values())


def lora_trainable_parameters(config, target_modules, rank: int) -> int:
    """LoRA parameters: r x (in + out) per adapted linear layer, in every decoder layer."""
    names = LINEAR_NAMES if target_modules == "all-linear" else target_modules
    shapes = linear_shapes(config)
    return config.num_hidden_layers * sum(rank * sum(shapes[name]) for name in names)


def meta_model(config):
    """The architecture instantiated on the ``meta`` device: real modules and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_preset_fits_device(name: str, device: str) -> None:
    """Refuse politely to run a multi-billion-parameter preset on a CPU."""
    if name in TINY_ALIASES or device != "cpu":
        return
    total = count_preset_parameters(preset_config(name))
    if total > CPU_PRESET_LIMIT:
        raise ValueError(
            f"--preset {name} has {total / 1e9:.1f} B parameters: on a CPU one training step would take minutes and "
            f"tens of GB of RAM. Run it on a GPU, or use --preset tiny or qwen2.5-0.5b / qwen3-0.6b here."
        )


def preset_checkpoint(name: str, device: str) -> str:
    """A loadable folder for the preset: the tiny checkpoint, or a random-weight one built once and cached.

    The random model is instantiated directly on ``device`` in bf16 (seconds on a GPU), saved with the
    Qwen tokenizer, and then loaded by the kit's own ``load_base_model`` like any checkpoint, so every
    method (QLoRA's 4-bit quantisation included) goes through the kit's one loading path.
    """
    if name in TINY_ALIASES:
        return resolve_model_path(name)
    check_preset_fits_device(name, device)
    folder = cache_root() / "presets" / f"{name}-random"
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return str(folder)
    return str(_build_random_checkpoint(name, folder, device))


def _build_random_checkpoint(name: str, folder: Path, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = preset_config(name)
    if config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"preset {name}: vocabulary {config.vocab_size} is smaller than the Qwen tokenizer's.")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = folder.with_name(f".{folder.name}-{os.getpid()}")
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(resolve_model_path("tiny")).save_pretrained(staging)  # the Qwen tokenizer, as shipped
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    staging.rename(folder)
    return folder

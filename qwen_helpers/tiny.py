"""The embedded tiny Qwen: a real Qwen2/Qwen3 architecture with small dimensions and the real Qwen tokenizer.

Everything in the kit defaults to ``model_path="tiny"`` so that every notebook, command and test runs
offline on a laptop CPU. The model has random weights (it writes noise), but it has the real
vocabulary, special tokens and chat template, so formatting, masking, stopping and saving are
exercised exactly as on a real Qwen.

The tokenizer is rebuilt from the BPE ranks Alibaba ships in the ``dashscope`` package
(``dashscope/resources/qwen.tiktoken``), which are the ranks of every Qwen tokenizer since Qwen1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_ALIASES = ("tiny", "tiny-qwen2", "tiny-qwen3")
VOCAB_SIZE = 151936  # Qwen2/2.5/3 embedding rows (151,643 BPE ranks + specials + padding to a multiple of 128)

# Qwen2.5's special tokens at their real ids (tokenizer_config.json of Qwen2.5-*-Instruct).
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
# Tokens that are real special tokens (never split, skipped when decoding); the rest are ordinary added tokens.
CONTROL_TOKENS = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}

# Small but real shapes: a few million parameters besides the 151,936-row embedding.
TINY_DIMENSIONS = dict(
    hidden_size=128,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in every Qwen2.5/Qwen3 size
    max_position_embeddings=2048,
    # Wider than Qwen's 0.02: with tied 128-dim embeddings, 0.02 caps every logit near ±2.6, so a random
    # model could barely lower its loss; 0.1 lets a minute of CPU training visibly move the loss curve.
    initializer_range=0.1,
)
TINY_SEED = 0
_BUILD_MARKER = "tiny_qwen_build.json"  # written last: its presence and checksums mean the build is complete


def chat_template() -> str:
    """Return Qwen2.5's ChatML chat template (the one in Qwen2.5-*-Instruct's tokenizer_config.json)."""
    return (Path(__file__).with_name("qwen2_5_chat_template.jinja")).read_text(encoding="utf-8")


def qwen_tiktoken_path() -> Path:
    """Return the path of Qwen's BPE ranks inside the installed ``dashscope`` package."""
    try:
        import dashscope
    except ImportError as error:
        raise ImportError(
            "The tiny Qwen tokenizer is built from the BPE ranks in the `dashscope` package. "
            "Install it with `pip install dashscope` (it is a dependency of this kit: `pip install -e .`)."
        ) from error
    path = Path(dashscope.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed dashscope package; reinstall it.")
    return path


def build_qwen_tokenizer():
    """Build Qwen2.5's fast tokenizer offline: BPE ranks from dashscope, Qwen2 pre-tokenisation, real special ids."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab, merges = TikTokenConverter(vocab_file=str(qwen_tiktoken_path())).extract_vocab_merges_from_model(
        str(qwen_tiktoken_path())
    )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",  # replaced by <|im_end|> below, once the ids are in place
        pad_token="<|endoftext|>",  # padding differs from EOS, so label masking must go by position
        model_max_length=32768,
    )
    for token, token_id in sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1]):
        tokenizer.add_tokens([AddedToken(token, special=token in CONTROL_TOKENS, normalized=False)])
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != token_id:
            raise RuntimeError(f"special token {token} got id {actual}, expected {token_id}")
    tokenizer.eos_token = "<|im_end|>"  # as in Qwen2.5-*-Instruct: an assistant turn ends with <|im_end|>
    tokenizer.chat_template = chat_template()
    return tokenizer


def tiny_config(arch: str = "qwen2"):
    """Return a Qwen2Config or Qwen3Config with the tiny dimensions and Qwen's vocabulary and special ids."""
    from transformers import Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B/1.5B/3B and Qwen3-0.6B/1.7B/4B
        bos_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        eos_token_id=SPECIAL_TOKENS["<|im_end|>"],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        **TINY_DIMENSIONS,
    )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=TINY_DIMENSIONS["hidden_size"] // TINY_DIMENSIONS["num_attention_heads"], **common)
    raise ValueError(f"--arch must be 'qwen2' or 'qwen3', got {arch!r}.")


def make_tiny_qwen(output_dir: str | os.PathLike, arch: str = "qwen2") -> Path:
    """Build the tiny checkpoint (model, tokenizer, generation config) into ``output_dir``; deterministic."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch)
    torch.manual_seed(TINY_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        eos_token_id=[SPECIAL_TOKENS["<|im_end|>"], SPECIAL_TOKENS["<|endoftext|>"]],
        pad_token_id=SPECIAL_TOKENS["<|endoftext|>"],
        do_sample=False,  # greedy by default: the tiny model is random, so sampling only adds noise
    )
    model.save_pretrained(output_dir)
    build_qwen_tokenizer().save_pretrained(output_dir)
    marker = {"arch": arch, "seed": TINY_SEED, "checksums": _checksums(output_dir)}
    (output_dir / _BUILD_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return output_dir


def _checksums(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != _BUILD_MARKER
    }


def is_complete_build(folder: Path) -> bool:
    """True when ``folder`` holds a finished tiny build whose files still match their checksums."""
    marker = folder / _BUILD_MARKER
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))["checksums"]
    except (ValueError, KeyError):
        return False
    return _checksums(folder) == expected


def cache_root() -> Path:
    """Where the tiny checkpoint is cached: ``$QWEN_HELPERS_CACHE``, else ``outputs/`` of a source checkout."""
    if os.environ.get("QWEN_HELPERS_CACHE"):
        return Path(os.environ["QWEN_HELPERS_CACHE"])
    repo_root = Path(__file__).resolve().parent.parent
    if (repo_root / "pyproject.toml").is_file():
        return repo_root / "outputs" / "cache"
    return Path.home() / ".cache" / "qwen_helpers"


def _file_signature(folder: Path) -> tuple:
    """Name, size and modification time of each file: a cheap stat that changes whenever a file does."""
    if not folder.is_dir():
        return ()
    return tuple((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.iterdir()) if path.is_file())


@functools.lru_cache(maxsize=16)
def _verified_build(folder: Path, signature: tuple) -> bool:
    """:func:`is_complete_build`, hashed once per process for as long as the files' stat signature is unchanged."""
    return is_complete_build(folder)


def tiny_model_path(arch: str = "qwen2") -> Path:
    """Return the cached tiny checkpoint's folder, building it first if it is missing or damaged."""
    folder = cache_root() / f"tiny-{arch}"
    if _verified_build(folder, _file_signature(folder)):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent notebooks never see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=folder.parent))
    try:
        make_tiny_qwen(staging, arch)
        if folder.exists() and not is_complete_build(folder):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process finished first; its build is identical
            if not is_complete_build(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_model_path(model_path: str | os.PathLike) -> str:
    """Map ``tiny`` / ``tiny-qwen2`` / ``tiny-qwen3`` to the cached build; pass anything else through."""
    name = str(model_path)
    if name in TINY_ALIASES:
        return str(tiny_model_path("qwen3" if name == "tiny-qwen3" else "qwen2"))
    return name


def is_tiny(model_path: str | os.PathLike) -> bool:
    """True for the tiny aliases and for folders built by :func:`make_tiny_qwen`."""
    return str(model_path) in TINY_ALIASES or (Path(model_path) / _BUILD_MARKER).is_file()

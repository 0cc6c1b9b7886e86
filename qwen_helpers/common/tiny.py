"""The embedded tiny Qwen: a real Qwen2/Qwen3 architecture with small dimensions and the real Qwen tokenizer.

Everything in the kit defaults to ``model_path="tiny"`` so that every notebook, command and test runs
offline on a laptop CPU. The model has random weights (it writes noise), but it has the real
vocabulary, special tokens and chat template, so formatting, masking, stopping and saving are
exercised exactly as on a real Qwen.

Beside it, :data:`REPLICAS` rebuild the folder layouts of released checkpoints on the same tiny weights
(Qwen2.5 base and instruct, Qwen1.5 chat, Qwen3 and Qwen3 base, a folder without a chat template):
their config and generation-config values, tokenizer eos and added tokens, and their real chat
templates (``*_chat_template.jinja``, each citing its source). ``model_path="tiny-qwen2.5-base"`` etc.

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
from dataclasses import dataclass, field
from pathlib import Path

from . import qwen3_5

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
# Qwen3 adds four ordinary added tokens after Qwen2.5's (tokenizer_config.json of Qwen3-0.6B / Qwen3-8B).
QWEN3_EXTRA_TOKENS = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}
# Qwen1.5's tokenizer has only the three control tokens (tokenizer_config.json of Qwen1.5-7B-Chat).
QWEN1_5_TOKENS = {token: SPECIAL_TOKENS[token] for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
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


def chat_template(name: str = "qwen2_5") -> str:
    """Return a released Qwen chat template, byte for byte: ``qwen2_5`` (the default), ``qwen1_5`` or ``qwen3``.

    Each ``.jinja`` file starts with one comment line naming the checkpoint it was copied from;
    that line is dropped so the text saved into ``tokenizer_config.json`` is the released one.
    """
    text = Path(__file__).with_name(f"{name}_chat_template.jinja").read_text(encoding="utf-8")
    first, _, rest = text.partition("\n")
    return rest if first.startswith("{#-") else text


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


def build_qwen_tokenizer(added_tokens: dict[str, int] = SPECIAL_TOKENS):
    """Build Qwen2.5's fast tokenizer offline: BPE ranks from dashscope, Qwen2 pre-tokenisation, real special ids.

    ``added_tokens`` picks the family's added tokens (Qwen1.5: the three control tokens; Qwen3: Qwen2.5's plus four).
    """
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
    for token, token_id in sorted(added_tokens.items(), key=lambda item: item[1]):
        tokenizer.add_tokens([AddedToken(token, special=token in CONTROL_TOKENS, normalized=False)])
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != token_id:
            raise RuntimeError(f"special token {token} got id {actual}, expected {token_id}")
    tokenizer.eos_token = "<|im_end|>"  # as in Qwen2.5-*-Instruct: an assistant turn ends with <|im_end|>
    tokenizer.chat_template = chat_template()
    return tokenizer


ARCHES = ("qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe")  # --arch of make_tiny_qwen
QWEN3_5_ARCHES = ("qwen3_5", "qwen3_5_moe")  # hybrid linear attention, vision tower, 248k vocabulary


def tiny_config(arch: str = "qwen2"):
    """The tiny config of ``arch`` (see :data:`ARCHES`) with the family's real vocabulary and special ids."""
    from transformers import Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if arch in QWEN3_5_ARCHES:
        return qwen3_5.tiny_config(arch, TINY_DIMENSIONS, TINY_DIMENSIONS["initializer_range"])
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
    head_dim = TINY_DIMENSIONS["hidden_size"] // TINY_DIMENSIONS["num_attention_heads"]
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=head_dim, **common)
    if arch == "qwen3_moe":  # Qwen3-30B-A3B's layout (every layer sparse, no shared expert), 4 experts of which 2 route
        return Qwen3MoeConfig(head_dim=head_dim, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                              decoder_sparse_step=1, norm_topk_prob=True, **common)
    raise ValueError(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}.")


def build_model(config):
    """The tiny model of ``config``, as its releases ship it: Qwen3.5 as the vision-language class, the rest text-only."""
    import transformers

    if config.model_type in QWEN3_5_ARCHES:
        name = "Qwen3_5MoeForConditionalGeneration" if config.model_type == "qwen3_5_moe" else "Qwen3_5ForConditionalGeneration"
        return getattr(transformers, name)(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def build_tokenizer(arch: str, added_tokens: dict):
    """The family's tokenizer: Qwen3.5's for the qwen3_5 types, else Qwen2's with ``added_tokens``."""
    if arch in QWEN3_5_ARCHES:
        return qwen3_5.build_tokenizer(frozenset(CONTROL_TOKENS))
    return build_qwen_tokenizer(added_tokens)


ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS["<|endoftext|>"], SPECIAL_TOKENS["<|im_start|>"], SPECIAL_TOKENS["<|im_end|>"]
# generation_config.json of the chat/instruct releases (Qwen2.5-7B-Instruct, Qwen1.5-7B-Chat): sampling, stop at either end token.
_CHAT_GENERATION = dict(bos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], do_sample=True,
                        repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
# generation_config.json of the base releases (Qwen2.5-7B, Qwen3-8B-Base): greedy, stop at <|endoftext|> only.
_BASE_GENERATION = dict(bos_token_id=ENDOFTEXT, eos_token_id=ENDOFTEXT, do_sample=False, max_new_tokens=2048)

# generation_config.json of Qwen3-8B: the thinking-mode sampling settings Qwen recommends.
_QWEN3_GENERATION = dict(bos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], do_sample=True,
                         temperature=0.6, top_p=0.95, top_k=20)
# Qwen3-Instruct-2507's model card: temperature 0.7, top_p 0.8, top_k 20 (no thinking mode).
_QWEN3_INSTRUCT_GENERATION = {**_QWEN3_GENERATION, "temperature": 0.7, "top_p": 0.8}
# The Qwen3.5 replicas keep Qwen3's recommended sampling (their generation_config.json files are not available offline;
# what the kit reads from them is the stop ids, which are the tokenizer's).
_QWEN3_5_GENERATION = {**_QWEN3_GENERATION, "bos_token_id": qwen3_5.ENDOFTEXT, "pad_token_id": qwen3_5.ENDOFTEXT,
                       "eos_token_id": [qwen3_5.IM_END, qwen3_5.ENDOFTEXT]}
_QWEN3_5_BASE_GENERATION = dict(bos_token_id=qwen3_5.ENDOFTEXT, eos_token_id=qwen3_5.ENDOFTEXT, do_sample=False, max_new_tokens=2048)


@dataclass(frozen=True)
class Replica:
    """The settings of one released checkpoint folder that the kit must handle, rebuilt on the tiny weights."""

    arch: str  # one of ARCHES: "qwen2" (Qwen2ForCausalLM, also Qwen1.5/2/2.5), "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"
    template: str | None  # chat_template(name), or None when the folder ships none
    eos_token: str  # tokenizer_config.json "eos_token"
    config_eos_token_id: int  # config.json "eos_token_id"
    generation: dict  # generation_config.json
    added_tokens: dict = field(default_factory=lambda: SPECIAL_TOKENS)
    source: str = ""  # the released checkpoint whose files these values come from


REPLICAS = {
    "qwen2.5-instruct": Replica("qwen2", "qwen2_5", "<|im_end|>", IM_END, _CHAT_GENERATION, source="Qwen/Qwen2.5-7B-Instruct"),
    "qwen2.5-base": Replica("qwen2", "qwen2_5", "<|endoftext|>", ENDOFTEXT, _BASE_GENERATION, source="Qwen/Qwen2.5-7B"),
    "qwen1.5-chat": Replica("qwen2", "qwen1_5", "<|im_end|>", IM_END, _CHAT_GENERATION, QWEN1_5_TOKENS, source="Qwen/Qwen1.5-7B-Chat"),
    "qwen3": Replica("qwen3", "qwen3", "<|im_end|>", IM_END, _QWEN3_GENERATION, {**SPECIAL_TOKENS, **QWEN3_EXTRA_TOKENS},
                     source="Qwen/Qwen3-8B"),
    # Qwen3 base checkpoints ship the same hybrid-thinking template as Qwen3, with <|endoftext|> as eos.
    "qwen3-base": Replica("qwen3", "qwen3", "<|endoftext|>", ENDOFTEXT, _BASE_GENERATION, {**SPECIAL_TOKENS, **QWEN3_EXTRA_TOKENS},
                          source="Qwen/Qwen3-8B-Base"),
    # A folder converted or trimmed by hand: a Qwen2.5 base without any chat template (the kit falls back to ChatML).
    "no-template": Replica("qwen2", None, "<|endoftext|>", ENDOFTEXT, _BASE_GENERATION, source="Qwen/Qwen2.5-7B without chat_template"),
    # Qwen3-2507: the Qwen3 architecture and tokenizer, an instruct-only template without thinking.
    "qwen3-2507-instruct": Replica("qwen3", "qwen3_instruct_2507", "<|im_end|>", IM_END, _QWEN3_INSTRUCT_GENERATION,
                                   {**SPECIAL_TOKENS, **QWEN3_EXTRA_TOKENS}, source="Qwen/Qwen3-4B-Instruct-2507"),
    # Qwen3 MoE: routed experts as fused 3-D parameters (peft target_parameters), Qwen3's tokenizer and template.
    "qwen3-moe": Replica("qwen3_moe", "qwen3", "<|im_end|>", IM_END, _QWEN3_GENERATION, {**SPECIAL_TOKENS, **QWEN3_EXTRA_TOKENS},
                         source="Qwen/Qwen3-30B-A3B"),
    # Qwen3.5 / 3.6 / 3.8: saved as the released vision-language class, tokenizer_config.json naming Qwen2Tokenizer
    # as on the hub, the 248k tokenizer and the released templates (0.8B/2B think off by default, 4B and up on).
    "qwen3.5": Replica("qwen3_5", "qwen3_5_nothink", "<|im_end|>", qwen3_5.IM_END, _QWEN3_5_GENERATION, source="Qwen/Qwen3.5-0.8B"),
    "qwen3.5-think": Replica("qwen3_5", "qwen3_5_think", "<|im_end|>", qwen3_5.IM_END, _QWEN3_5_GENERATION, source="Qwen/Qwen3.5-4B"),
    "qwen3.5-base": Replica("qwen3_5", "qwen3_5_think", "<|endoftext|>", qwen3_5.ENDOFTEXT, _QWEN3_5_BASE_GENERATION,
                            source="Qwen/Qwen3.5-4B-Base"),
    "qwen3.6": Replica("qwen3_5", "qwen3_6", "<|im_end|>", qwen3_5.IM_END, _QWEN3_5_GENERATION, source="Qwen/Qwen3.6-27B"),
    "qwen3.8": Replica("qwen3_5", "qwen3_8", "<|im_end|>", qwen3_5.IM_END, _QWEN3_5_GENERATION, source="Qwen/Qwen3.8-27B"),
    "qwen3.5-moe": Replica("qwen3_5_moe", "qwen3_5_think", "<|im_end|>", qwen3_5.IM_END, _QWEN3_5_GENERATION,
                           source="Qwen/Qwen3.5-35B-A3B"),
}
# model_path aliases: "tiny" is the seed's checkpoint (Qwen2.5-Instruct files, greedy generation); the rest are replicas.
_DEFAULT_ALIASES = {"tiny": None, "tiny-qwen2": None}
TINY_ALIASES = (*_DEFAULT_ALIASES, *(f"tiny-{name}" for name in REPLICAS))


def make_tiny_qwen(output_dir: str | os.PathLike, arch: str = "qwen2", like: str | None = None) -> Path:
    """Build the tiny checkpoint into ``output_dir``; deterministic.

    With ``like``, the folder copies a released checkpoint's settings (see :data:`REPLICAS`): its architecture,
    ``config.json`` / ``generation_config.json`` values, tokenizer eos and added tokens, and chat template.
    """
    import torch
    from transformers import GenerationConfig

    if like is not None and like not in REPLICAS:
        raise ValueError(f"--like {like!r} is not a known replica; choose one of {', '.join(REPLICAS)}.")
    replica = REPLICAS.get(like)
    arch = replica.arch if replica else arch
    if arch not in ARCHES or (arch in QWEN3_5_ARCHES and replica is None):
        raise ValueError(f"--arch {arch!r}: build one of {', '.join(ARCHES[:3])}, or a Qwen3.5 replica with --like qwen3.5 (or another of {', '.join(REPLICAS)}).")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch)
    if replica:
        getattr(config, "text_config", config).eos_token_id = replica.config_eos_token_id
    torch.manual_seed(TINY_SEED)
    model = build_model(config).to(torch.float32)
    model.generation_config = GenerationConfig(**replica.generation) if replica else GenerationConfig(
        bos_token_id=ENDOFTEXT,
        eos_token_id=[IM_END, ENDOFTEXT],
        pad_token_id=ENDOFTEXT,
        do_sample=False,  # greedy by default: the tiny model is random, so sampling only adds noise
    )
    model.save_pretrained(output_dir)
    tokenizer = build_tokenizer(arch, replica.added_tokens if replica else SPECIAL_TOKENS)
    if replica:
        tokenizer.eos_token = replica.eos_token
        tokenizer.chat_template = chat_template(replica.template) if replica.template else None
    tokenizer.save_pretrained(output_dir)
    if replica and replica.template is None:
        _drop_chat_template(output_dir)
    if arch in QWEN3_5_ARCHES:  # as the released folders: transformers picks Qwen3_5Tokenizer from config.json
        _edit_json(output_dir / "tokenizer_config.json", tokenizer_class=qwen3_5.HUB_TOKENIZER_CLASS)
    marker = {"arch": arch, "like": like, "seed": TINY_SEED, "checksums": _checksums(output_dir)}
    (output_dir / _BUILD_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return output_dir


def _edit_json(path: Path, **values) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _drop_chat_template(folder: Path) -> None:
    """Remove every trace of a chat template, as in a folder that never had one."""
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


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
    repo_root = Path(__file__).resolve().parents[2]
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


def _cache_name(arch: str = "qwen2", like: str | None = None) -> str:
    return f"replica-{like}" if like else f"tiny-{arch}"


def alias_cache_folder(model_path: str | os.PathLike) -> Path | None:
    """The cache folder a tiny alias names, built or not (None for anything else): what the alias puts at risk."""
    name = str(model_path)
    if name in _DEFAULT_ALIASES:
        return cache_root() / _cache_name("qwen2")
    if name in TINY_ALIASES:
        return cache_root() / _cache_name(like=name.removeprefix("tiny-"))
    return None


def tiny_model_path(arch: str = "qwen2", like: str | None = None) -> Path:
    """Return the cached tiny checkpoint's (or replica's) folder, building it first if it is missing or damaged."""
    name = _cache_name(arch, like)
    folder = cache_root() / name
    if _verified_build(folder, _file_signature(folder)):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so concurrent notebooks never see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        make_tiny_qwen(staging, arch, like)
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
    """Map ``tiny`` / ``tiny-qwen2`` and ``tiny-<replica>`` (``tiny-qwen3``, ``tiny-qwen2.5-base``, ...) to cached builds."""
    name = str(model_path)
    if name in _DEFAULT_ALIASES:
        return str(tiny_model_path("qwen2"))
    if name in TINY_ALIASES:
        return str(tiny_model_path(like=name.removeprefix("tiny-")))
    return name

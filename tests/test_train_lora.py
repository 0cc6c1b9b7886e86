"""The LoRA training path: the command, precision policy, checkpointing gradients, target modules, output rules, NaN guard."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from qwen_helpers.models import loading as modeling

from qwen_helpers.run import precision
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.run.methods import build_lora_config
from qwen_helpers.training.callbacks import NanGuardCallback
from qwen_helpers.training.run_folder import OutputDirExistsError
from qwen_helpers.training.sft import train

ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "run_config.json", "loss_history.json", "tokenizer.json"}


def _args(output_dir, data_path, **training):
    defaults = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-3, save_strategy="no", disable_tqdm=True)
    return ModelArguments(), DataArguments(data_path=data_path), KitTrainingArguments(**{**defaults, **training})


def _lora_state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_command_writes_only_the_adapter_and_plain_peft_loads_it(tmp_path, small_train_file, tiny_path):
    output = tmp_path / "lora"
    command = [sys.executable, "-m", "qwen_helpers.train_lora", "--data_path", small_train_file, "--output_dir", str(output),
               "--fp16", "True", "--max_steps", "3", "--disable_tqdm", "True"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "precision: fp32 (--fp16 True asked, but there is no CUDA GPU" in run.stdout
    assert "trainable params: 20,480" in run.stdout and f"adapter saved to {output}" in run.stdout
    files = {path.name for path in output.iterdir()}
    assert ADAPTER_FILES | {"loss_plot.png"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}  # never the full model
    adapter = load_file(output / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    history = json.loads((output / "loss_history.json").read_text())
    assert [record["step"] for record in history if "loss" in record] == [1, 2, 3]

    from qwen_helpers.models.adapters import load_model_with_adapter

    kit_model, tokenizer = load_model_with_adapter(str(output))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(output)).eval()
    inputs = tokenizer(["<|im_start|>user\n你好<|im_end|>\n"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(kit_model(**inputs).logits, plain(**inputs).logits)


def test_loss_falls_and_is_finite(tmp_path, small_train_file):
    model_args, data_args, training_args = _args(tmp_path / "run", small_train_file, max_steps=24)
    result = train(model_args, data_args, training_args, "lora", LoraArguments())
    losses = result.train_losses
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_fp16_base_keeps_lora_weights_in_fp32(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float16)
    model = get_peft_model(model, build_lora_config(LoraArguments()))
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    frozen = [p for name, p in model.named_parameters() if "q_proj.base_layer" in name]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert frozen and all(p.dtype == torch.float16 and not p.requires_grad for p in frozen)


def test_precision_policy(monkeypatch):
    on_cpu = KitTrainingArguments(output_dir="x", fp16=True)
    assert not on_cpu.fp16 and "no CUDA GPU" in on_cpu.precision_notice
    assert precision.base_dtype(on_cpu) == torch.float32

    class GpuArgs:
        fp16, bf16, use_cpu, dataloader_pin_memory = True, False, False, True

    monkeypatch.setattr(precision, "device_type", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    gpu = GpuArgs()
    assert "fp16 mixed" in precision.apply_precision_policy(gpu) and gpu.fp16
    assert precision.base_dtype(gpu) == torch.float16
    gpu.fp16, gpu.bf16 = False, True
    with pytest.raises(ValueError, match="no bf16 support.*--fp16 True"):
        precision.apply_precision_policy(gpu)


def test_gradient_checkpointing_still_reaches_lora(tiny_path, tokenizer):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), build_lora_config(LoraArguments(lora_dropout=0.0)))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.base_model.model.model.gradient_checkpointing
    batch = tokenizer(["Hello world, 你好"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_target_modules_list_the_real_ones(tmp_path, small_train_file):
    model_args, data_args, training_args = _args(tmp_path / "run", small_train_file)
    with pytest.raises(ValueError, match=r"c_attn not found in Qwen2ForCausalLM.*Qwen1.*Its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        train(model_args, data_args, training_args, "lora", LoraArguments(target_modules="c_attn"))


class InterruptAtSave(TrainerCallback):
    """Stop the run (as Ctrl-C would) once the checkpoint of step ``step`` is complete."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_is_resumed_and_a_finished_one_keeps_no_checkpoint(tmp_path, small_train_file):
    from qwen_helpers.common.files import staging_folders
    from qwen_helpers.training.run_folder import ResumeError

    output = tmp_path / "run"
    model_args, data_args, training_args = _args(output, small_train_file, save_strategy="steps", save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(model_args, data_args, training_args, "lora", LoraArguments(), callbacks=[InterruptAtSave(2)])
    (staging,) = staging_folders(output)
    assert not output.exists() and [path.name for path in staging.glob("checkpoint-*")] == ["checkpoint-2"]  # to resume
    with pytest.raises(OutputDirExistsError, match="an interrupted run left its files"):
        train(model_args, data_args, training_args, "lora", LoraArguments())
    resume = replace(training_args, resume_from_checkpoint="True")
    resumed = train(model_args, data_args, resume, "lora", LoraArguments())
    assert [record["step"] for record in resumed.history if "loss" in record] == [1, 2, 3, 4]  # continued, not restarted; history whole
    assert resumed.trainer.state.global_step == 4 and staging_folders(output) == []
    assert not list(output.glob("checkpoint-*")) and (output / "adapter_model.safetensors").is_file()  # finished: none
    with pytest.raises(OutputDirExistsError, match="--overwrite_output_dir True") as refused:
        train(model_args, data_args, training_args, "lora", LoraArguments())
    assert "--resume_from_checkpoint" not in str(refused.value)  # a finished run has nothing to continue
    with pytest.raises(ResumeError, match="A finished run keeps none"):
        train(model_args, data_args, resume, "lora", LoraArguments())


class PoisonAfter(TrainerCallback):
    """From step ``step`` on, make the model's loss NaN (a forward hook), and remember the adapter before that."""

    def __init__(self, step):
        self.step, self.poisoned, self.good = step, False, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step and not self.poisoned:
            self.good = _lora_state(model)
            self.poisoned = True
            model.get_base_model().lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))


def test_nan_guard_stops_and_keeps_the_last_good_adapter(tmp_path, small_train_file):
    output = tmp_path / "run"
    model_args, data_args, training_args = _args(output, small_train_file, max_steps=12)
    poison = PoisonAfter(step=2)
    result = train(model_args, data_args, training_args, "lora", LoraArguments(), callbacks=[poison])
    assert result.stopped_by_nan_guard
    assert result.trainer.state.global_step == 2 + NanGuardCallback().patience  # stopped early, not at 12
    saved = load_file(Path(output) / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, tensor in _lora_state(result.model).items():
        assert torch.equal(tensor, poison.good[name])
    assert json.loads((output / "run_config.json").read_text())["stopped_by_nan_guard"] is True
    history = json.loads((output / "loss_history.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    losses = [record["loss"] for record in history if "loss" in record]
    assert losses[2:] == [None] * NanGuardCallback().patience  # logged as NaN, not hidden as 0.0


class BreakWeightsAt(TrainerCallback):
    """At the end of step ``step``, set the LoRA B matrices to NaN (as a step at --learning_rate inf does)."""

    def __init__(self, step):
        self.step, self.good = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            self.good = _lora_state(model)
        if state.global_step == self.step:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "lora_B" in name:
                        parameter.fill_(float("nan"))


def test_nan_guard_never_keeps_non_finite_weights_although_the_logged_loss_was_finite(tmp_path, small_train_file):
    output = tmp_path / "run"
    model_args, data_args, training_args = _args(output, small_train_file, max_steps=2)  # ends within patience
    broken = BreakWeightsAt(step=2)  # step 2's loss was computed before the weights broke: finite
    result = train(model_args, data_args, training_args, "lora", LoraArguments(), callbacks=[broken])
    assert result.stopped_by_nan_guard
    saved = load_file(Path(output) / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    for name, tensor in _lora_state(result.model).items():
        assert torch.equal(tensor, broken.good[name])  # the weights after step 1, the last finite ones


class BreakWeightsFrom(BreakWeightsAt):
    """From the end of step ``step`` on, the LoRA B matrices are NaN after every step (a diverged run)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= self.step:
            self.step = state.global_step
        super().on_step_end(args, state, control, model=model, **kwargs)


def test_nan_guard_step_is_not_evaluated_so_no_restored_copy_becomes_the_best(tmp_path, small_train_file):
    """Weights break from step 3; the guard stops at step 5 (patience 3) and restores step 2's copy. Step 5 is also an
    evaluation step: evaluating the copy there made it the best checkpoint "of step 5" (it was step 2's weights)."""
    output = tmp_path / "run"
    model_args, data_args, training_args = _args(output, small_train_file, max_steps=12, eval_strategy="steps", eval_steps=5,
                                                 save_strategy="best", load_best_model_at_end=True, metric_for_best_model="eval_loss")
    data_args = replace(data_args, eval_data_path=small_train_file)
    broken = BreakWeightsFrom(step=3)
    result = train(model_args, data_args, training_args, "lora", LoraArguments(), callbacks=[broken])
    assert result.stopped_by_nan_guard and result.trainer.state.global_step == 5
    assert not [record for record in result.history if "eval_loss" in record]  # step 5 was not evaluated
    assert not result.trainer.state.best_global_step  # so no step claims to be the best
    for name, tensor in _lora_state(result.model).items():
        assert torch.equal(tensor, broken.good[name])  # the last finite weights, step 2's


def test_nan_guard_ignores_fp16_overflow_steps_but_not_a_nan_loss():
    from types import SimpleNamespace

    def stopped_after(fp16: bool, logs: dict) -> bool:
        guard, control = NanGuardCallback(), SimpleNamespace(should_training_stop=False, should_save=True)
        for _ in range(guard.patience):
            guard.on_log(SimpleNamespace(fp16=fp16), None, control, logs=logs)
        return control.should_training_stop

    overflow = {"loss": 2.0, "grad_norm": float("inf")}  # the loss scaler skipped the step and halved its scale
    assert not stopped_after(fp16=True, logs=overflow)
    assert stopped_after(fp16=False, logs=overflow)
    assert stopped_after(fp16=True, logs={"loss": float("nan"), "grad_norm": float("inf")})


def test_use_cpu_keeps_the_model_on_the_cpu_where_a_gpu_is_visible(tmp_path, monkeypatch):
    from qwen_helpers.training.sft import load_model_for_training

    monkeypatch.setattr(modeling, "_local_device", lambda: "cuda:0")  # what a GPU machine would pick by default
    training_args = KitTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    model = load_model_for_training(ModelArguments(), training_args)
    assert model.device.type == "cpu"

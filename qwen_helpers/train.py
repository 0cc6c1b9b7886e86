"""The one training path: load the base, attach an adapter (LoRA or a soft prompt), train with Trainer, save the adapter.

LoRA, prompt tuning and QLoRA differ only in how the base is loaded (fp16/bf16/fp32 or 4-bit NF4) and
which peft config wraps it; full fine-tuning (the benchmark's baseline) is the same path with no adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import Trainer, TrainerCallback, set_seed

from .batching import check_token_budget, kit_trainer_class, make_training_collator, resolve_padding_free
from .config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments, to_json_dict
from .data import load_dataset_for_training
from .modeling import (
    base_dtype,
    build_quantization_config,
    check_target_modules,
    count_parameters,
    load_base_model,
    load_tokenizer,
)
from .speed import apply_cpu_allocator_setting, check_liger
from .tiny import resolve_model_path

logger = logging.getLogger("qwen_helpers")
Method = Literal["lora", "prompt_tuning", "full"]
RUN_CONFIG = "run_config.json"
LOSS_HISTORY = "loss_history.json"


class OutputDirExistsError(FileExistsError):
    """The output folder already holds a previous run."""


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool) -> None:
    """Refuse to write into a non-empty folder unless asked to overwrite or resume: a previous run is never lost silently."""
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise OutputDirExistsError(
            f"--output_dir {output_dir} already holds files from an earlier run. Choose another folder, "
            "pass --overwrite_output_dir True to replace them, or --resume_from_checkpoint True to continue that run."
        )


def check_output_dir_on_main_process(training_args: KitTrainingArguments, resuming: bool) -> None:
    """Check the output folder on the main process only and share its verdict, so every rank stops with the same error or none does."""
    verdict = [None]
    if training_args.process_index == 0:
        try:
            check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resuming)
        except OutputDirExistsError as error:
            verdict = [str(error)]
    if training_args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        raise OutputDirExistsError(verdict[0])


def check_distributed_launch(training_args: KitTrainingArguments) -> None:
    """Refuse several launched processes that did not join one run: each would train alone and overwrite the same folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise RuntimeError(
            f"This command was launched as {launched} processes (WORLD_SIZE={launched}), but training did not become "
            "distributed, so each process would train alone and write the same --output_dir. Without a GPU, add "
            "--use_cpu True (the processes then talk over gloo); with GPUs, check that PyTorch sees them "
            "(python -c 'import torch; print(torch.cuda.device_count())')."
        )


def describe_distributed(trainer: Trainer) -> str:
    """One line for the main process: the strategy, the number of processes and the global batch they make together."""
    args, state = trainer.args, trainer.accelerator.state
    strategy = state.distributed_type.value
    if state.deepspeed_plugin is not None:
        strategy += f" ZeRO-{state.deepspeed_plugin.zero_stage}"
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return (
        f"distributed: {strategy}, world size {args.world_size}; global batch {args.per_device_train_batch_size} per device "
        f"x {args.gradient_accumulation_steps} accumulation x {args.world_size} processes = {global_batch}"
    )


def build_lora_config(lora_args: LoraArguments, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """``LoraConfig`` from the kit's LoRA arguments (a causal LM unless ``task_type`` says otherwise)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.target_module_list(),
        modules_to_save=modules_to_save,
        bias="none",
    )


def build_prompt_tuning_config(prompt_args: PromptTuningArguments, model_path: str):
    """``PromptTuningConfig``; with TEXT init, peft tokenises the init text with the base's own tokenizer."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    text_init = prompt_args.prompt_tuning_init == "TEXT"
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=prompt_args.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=prompt_args.prompt_init_text if text_init else None,
        tokenizer_name_or_path=resolve_model_path(model_path) if text_init else None,
    )


def describe_text_init(tokenizer, prompt_args: PromptTuningArguments) -> str:
    """Say how peft 0.21 fits the init text to num_virtual_tokens (PromptEmbedding.__init__): it cuts or repeats the tokens."""
    if prompt_args.prompt_tuning_init != "TEXT":
        return f"prompt init: RANDOM, {prompt_args.num_virtual_tokens} virtual tokens with N(0, 1) entries (torch.nn.Embedding's default; peft does not rescale them)"
    ids = tokenizer(prompt_args.prompt_init_text)["input_ids"]  # peft's own call, special tokens included
    n = prompt_args.num_virtual_tokens
    how = "used as is" if len(ids) == n else (f"repeated {math.ceil(n / len(ids))}x and cut to {n}" if len(ids) < n else f"cut to its first {n} tokens")
    return f"prompt init: TEXT {prompt_args.prompt_init_text!r} = {len(ids)} tokens {[tokenizer.decode([token]) for token in ids]}, {how}"


def attach_adapter(model, method: Method, model_path: str, lora_args=None, prompt_args=None):
    """Wrap the base with a peft adapter (or, for full fine-tuning, leave every weight trainable)."""
    from peft import get_peft_model

    if method == "full":
        return model
    if method == "lora":
        check_target_modules(model, lora_args.target_module_list())
        return get_peft_model(model, build_lora_config(lora_args))
    if method == "prompt_tuning":
        return get_peft_model(model, build_prompt_tuning_config(prompt_args, model_path))
    raise ValueError(f"Unknown method {method!r}: use 'lora', 'prompt_tuning' or 'full'.")


def load_model_for_training(model_args: ModelArguments, training_args: KitTrainingArguments):
    """The base under the precision policy: fp16/bf16/fp32, or 4-bit prepared for k-bit training."""
    device = str(training_args.device)  # the Trainer's device: honours --use_cpu and LOCAL_RANK
    if not model_args.load_in_4bit:
        return load_base_model(model_args.model_path, base_dtype(training_args), attn_implementation=model_args.attn_implementation, device=device)
    from peft import prepare_model_for_kbit_training

    compute_dtype = base_dtype(training_args)
    model = load_base_model(
        model_args.model_path,
        dtype=compute_dtype,
        quantization_config=build_quantization_config(model_args, compute_dtype),
        attn_implementation=model_args.attn_implementation,
        device=device,
    )
    return prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=bool(training_args.activation_checkpointing),
        gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs or {"use_reentrant": False},
    )


class LossHistoryCallback(TrainerCallback):
    """Collect every logged training and evaluation record (step, loss, learning rate, grad norm)."""

    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.history.append({"step": state.global_step, "epoch": state.epoch, **logs})

    def train_losses(self) -> list[float]:
        return train_losses(self.history)


def train_losses(history: list[dict]) -> list[float]:
    """The training losses of a logged history, in order (evaluation records carry eval_loss instead)."""
    return [record["loss"] for record in history if "loss" in record]


class NanGuardCallback(TrainerCallback):
    """Stop a run whose loss or gradient norm stays non-finite, and put back the last good trainable weights.

    The trainable weights are small for adapters, so a copy is kept at every good log; after
    ``patience`` bad logs in a row the run stops and that copy is restored before saving.
    Under DDP, FSDP and DeepSpeed every rank logs the same values (the loss is averaged over all
    ranks before logging, the gradient norm is the global one), so all ranks stop at the same step.
    """

    ADVICE = (
        "The loss became NaN/inf and the run was stopped; the adapter saved is the last good one. "
        "Try: a lower --learning_rate (e.g. half), --bf16 True instead of --fp16 True on Ampere+ GPUs "
        "(Qwen2.5+ activations can overflow fp16), --max_grad_norm 0.3, or checking the data for empty answers."
    )

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.bad_logs = 0
        self.triggered = False
        self.last_good: dict[str, torch.Tensor] | None = None

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        # Under fp16 loss scaling an inf gradient norm is the scaler's normal overflow signal (the step is
        # skipped and the scale halved), so only the loss counts there.
        keys = ("loss",) if args.fp16 else ("loss", "grad_norm")
        values = [logs.get(key) for key in keys if logs and logs.get(key) is not None]
        if not values:
            return
        if all(math.isfinite(value) for value in values):
            self.bad_logs = 0
            if model is not None:
                self.last_good = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
            return
        self.bad_logs += 1
        if self.bad_logs >= self.patience:
            self.triggered = True
            control.should_training_stop = True
            control.should_save = False
            if model is not None and self.last_good is not None:
                with torch.no_grad():
                    for name, parameter in model.named_parameters():
                        if name in self.last_good:
                            parameter.copy_(self.last_good[name])
            logger.warning(self.ADVICE)


@dataclass
class TrainResult:
    """What a run produced: the trained model and tokenizer, the trainer, the loss history and where it was saved."""

    model: object
    tokenizer: object
    trainer: Trainer
    history: list[dict]
    output_dir: str
    parameters: object
    precision: str
    stopped_by_nan_guard: bool = False
    data_report: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def train_losses(self) -> list[float]:
        return train_losses(self.history)


def resolve_resume(training_args: KitTrainingArguments):
    """``--resume_from_checkpoint True`` means the last checkpoint in the output folder; a path is used as given."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value in (None, "", "False", "false"):
        return None
    if value in ("True", "true", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint: no checkpoint-* folder in {training_args.output_dir}. "
                "Checkpoints are written by --save_strategy steps|epoch; start a fresh run instead."
            )
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder.")
    return value


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: KitTrainingArguments,
    method: Method = "lora",
    lora_args: LoraArguments | None = None,
    prompt_args: PromptTuningArguments | None = None,
    callbacks: list | None = None,
    save: bool = True,
) -> TrainResult:
    """Train one adapter end to end and save it (adapter weights, tokenizer, run config, loss history) to output_dir."""
    if method == "full" and save:
        raise ValueError("Full fine-tuning is the benchmark's baseline only; the kit saves adapters, never full weights.")
    check_distributed_launch(training_args)
    resume = resolve_resume(training_args)
    check_output_dir_on_main_process(training_args, resume is not None)
    notes = [training_args.precision_notice, f"device: {training_args.device}"]
    check_liger(training_args, model_args.model_path)  # before anything loads: a run that cannot use it stops now
    check_token_budget(training_args.token_budget, data_args.max_length)
    padding_free, batching_note = resolve_padding_free(training_args.padding_free, method, model_args.attn_implementation)
    notes += [batching_note, *filter(None, [apply_cpu_allocator_setting(training_args)])]

    tokenizer = load_tokenizer(model_args.model_path)
    with training_args.main_process_first(desc="tokenising"):
        train_data = load_dataset_for_training(tokenizer, data_args.data_path, data_args.max_length, data_args.overflow, data_args.field_map())
        eval_data = (
            load_dataset_for_training(tokenizer, data_args.eval_data_path, data_args.max_length, data_args.overflow, data_args.field_map())
            if data_args.eval_data_path
            else None
        )
    notes.append(f"data: {data_args.data_path}: {train_data.summary()}")
    if method == "prompt_tuning":
        notes.append(describe_text_init(tokenizer, prompt_args))

    set_seed(training_args.seed)  # the adapter's initial weights are reproducible, and the same on every rank
    model = attach_adapter(load_model_for_training(model_args, training_args), method, model_args.model_path, lora_args, prompt_args)
    parameters = count_parameters(model)
    notes.append(str(parameters))

    history, nan_guard = LossHistoryCallback(), NanGuardCallback()
    trainer = kit_trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        data_collator=make_training_collator(tokenizer, padding_free, model_args.attn_implementation),
        processing_class=tokenizer,
        callbacks=[history, nan_guard, *(callbacks or [])],
        token_budget=training_args.token_budget,
        padding_free=padding_free,
        # prompt tuning shifts positions by its virtual tokens; Liger's fused loss never materialises the logits anyway
        trained_logits_only=method != "prompt_tuning" and not training_args.use_liger_kernel,
    )
    if trainer.budget_sampler is not None:
        notes.append(trainer.budget_sampler.describe())
    if training_args.world_size > 1:
        notes.append(describe_distributed(trainer))
        print(f"rank {training_args.process_index}/{training_args.world_size} ready on {training_args.device}", flush=True)
    if training_args.should_log:
        for note in notes:
            print(note, flush=True)
    trainer.train(resume_from_checkpoint=resume)
    result = TrainResult(
        model=model,
        tokenizer=tokenizer,
        trainer=trainer,
        history=history.history,
        output_dir=training_args.output_dir,
        parameters=parameters,
        precision=training_args.precision_notice,
        stopped_by_nan_guard=nan_guard.triggered,
        data_report=train_data.summary(),
        notes=notes,
    )
    if save:
        save_run(result, model_args, data_args, training_args, lora_args if method == "lora" else prompt_args, method)
    return result


def save_run(result: TrainResult, model_args, data_args, training_args, method_args, method: Method) -> None:
    """Write the adapter (never the full model), tokenizer, effective config and loss history to the output folder."""
    trainer = result.trainer
    trainer.save_model(result.output_dir)  # a PeftModel saves only adapter_model.safetensors + adapter_config.json
    if not trainer.is_world_process_zero():
        return
    configs = [model_args, data_args, training_args] + ([method_args] if method_args is not None else [])
    run_config = {"method": method, "load_in_4bit": model_args.load_in_4bit, **to_json_dict(*configs)}
    run_config["stopped_by_nan_guard"] = result.stopped_by_nan_guard
    write_run_files(result.output_dir, run_config, result.history)


def write_run_files(output_dir: str, run_config: dict, history: list[dict]) -> None:
    """Save the effective configuration and the loss history as JSON beside the adapter."""
    output = Path(output_dir)
    (output / RUN_CONFIG).write_text(json.dumps(run_config, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    (output / LOSS_HISTORY).write_text(json.dumps(history, indent=2), encoding="utf-8")

"""The one training path: load the base, attach an adapter (LoRA or a soft prompt), train with Trainer, save the adapter.

LoRA, prompt tuning and QLoRA differ only in how the base is loaded (fp16/bf16/fp32 or 4-bit NF4) and
which peft config wraps it; full fine-tuning (the benchmark's baseline) is the same path with no adapter.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .batching import check_token_budget, kit_trainer_class, make_training_collator, resolve_padding_free
from .callbacks import LossHistoryCallback, NanGuardCallback, train_losses
from .checks import base_summary, check_model_path
from .flag_checks import (check_classification_flags, check_data_files, check_evaluation_data, check_lora_variant_on_4bit,
                          check_prompt_fits_model, check_resume_flags, check_training_flags)
from .held_out import HeldOutScorer, best_and_stop, best_of_run, held_out_scorer, held_out_task, judged_by, stop_reason
from .config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments, write_run_config
from .data import chat_tokens_to_train
from .data_files import load_dataset_for_training
from .files import (base_weights_size, folder_size, human_bytes, model_fingerprint, recorded_path, remove_folders,
                    swap_in)
from .lora_variants import describe_variants, loraplus_optimizer, save_as_plain_lora, save_initial_adapter
from .methods import get_method
from .modeling import base_config_of, build_quantization_config, check_target_modules, count_parameters, load_base_model, load_tokenizer
from .precision import base_dtype
from .prompt_settings import SYSTEM_PROMPT_KEY, training_system_prompt
from .run_folder import (OutputPlan, complete_checkpoints, drop_checkpoints, plan_output_on_main_process,
                         resumed_history, training_inputs)
from .speed import apply_cpu_allocator_setting, check_liger

logger = logging.getLogger("qwen_helpers")


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
    accumulation, processes = args.gradient_accumulation_steps, args.world_size
    if getattr(args, "token_budget", None):  # --per_device_train_batch_size plays no part: each rank fills its own budget
        budget = args.token_budget
        return (f"distributed: {strategy}, world size {processes}; global batch up to {budget} tokens per device x {accumulation} "
                f"accumulation x {processes} processes = up to {budget * accumulation * processes} tokens")
    per_device = args.per_device_train_batch_size
    return (
        f"distributed: {strategy}, world size {processes}; global batch {per_device} per device "
        f"x {accumulation} accumulation x {processes} processes = {per_device * accumulation * processes}"
    )


def describe_text_init(tokenizer, prompt_args: PromptTuningArguments) -> str:
    """Say how peft 0.21 fits the init text to num_virtual_tokens (PromptEmbedding.__init__): it cuts or repeats the tokens."""
    if prompt_args.prompt_tuning_init != "TEXT":
        return f"prompt init: RANDOM, {prompt_args.num_virtual_tokens} virtual tokens with N(0, 1) entries (torch.nn.Embedding's default; peft does not rescale them)"
    ids = tokenizer(prompt_args.prompt_init_text)["input_ids"]  # peft's own call, special tokens included
    n = prompt_args.num_virtual_tokens
    how = "used as is" if len(ids) == n else (f"repeated {math.ceil(n / len(ids))}x and cut to {n}" if len(ids) < n else f"cut to its first {n} tokens")
    return f"prompt init: TEXT {prompt_args.prompt_init_text!r} = {len(ids)} tokens {[tokenizer.decode([token]) for token in ids]}, {how}"


def attach_adapter(model, method: str, model_path: str, lora_args=None, prompt_args=None, tokenizer=None):
    """Wrap the base with the method's peft adapter (see :mod:`qwen_helpers.methods`); full fine-tuning leaves every weight trainable.

    With the base's ``tokenizer``, LoRA on a base checkpoint also trains its ``<|im_start|>``/``<|im_end|>`` rows
    (:func:`qwen_helpers.data.chat_tokens_to_train`, ``--train_chat_tokens``); without one (the benchmark's
    random-weight presets) only the LoRA matrices train.
    """
    from peft import get_peft_model

    kind = get_method(method)
    if kind.trains_base_weights:
        return model
    if kind.adapts_linear_layers:
        check_target_modules(model, lora_args.target_module_list())
        chat_tokens, notice = chat_tokens_to_train(tokenizer, lora_args.train_chat_tokens) if tokenizer is not None else ([], None)
        if notice:
            print(notice, flush=True)
        return get_peft_model(model, kind.peft_config(lora_args, model_path, trainable_token_indices=chat_tokens))
    return get_peft_model(model, kind.peft_config(prompt_args, model_path))


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
    initial_adapter_dir: str | None = None  # PiSSA/OLoRA's start, for saving the adapter converted to plain LoRA
    held_out: HeldOutScorer | None = None  # the task's metric at each evaluation during training, answers by step
    stopped_because: str = ""
    target_dir: str = ""  # where output_dir goes when the run is published (output_dir is the staging folder until then)
    stale_runs: list[str] = field(default_factory=list)

    @property
    def train_losses(self) -> list[float]:
        return train_losses(self.history)


class KitTrainer(kit_trainer_class()):
    """The kit's ``Trainer`` (token-budget batches, see :mod:`qwen_helpers.batching`) whose saves hold the adapter only.

    No tokenizer copy per checkpoint (18.6 MB each for Qwen's; the final folder gets one) and no
    ``training_args.bin`` anywhere: it is a pickle of every flag, ``--hub_token`` included, while
    run_config.json keeps the effective arguments with tokens redacted.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        processing_class, collator = self.processing_class, self.data_collator
        self.processing_class = self.data_collator = None  # _save writes the tokenizer of either
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.processing_class, self.data_collator = processing_class, collator
        Path(output_dir or self.args.output_dir, "training_args.bin").unlink(missing_ok=True)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: KitTrainingArguments,
    method: str = "lora",
    lora_args: LoraArguments | None = None,
    prompt_args: PromptTuningArguments | None = None,
    callbacks: list | None = None,
    save: bool = True,
    publish: bool = True,
) -> TrainResult:
    """Train one adapter end to end and save it (adapter weights, tokenizer, run config, loss history) to output_dir.

    ``method`` is a name of :data:`qwen_helpers.methods.METHODS` ("lora", "prompt_tuning", "qlora", "full").
    The run writes into a staging folder beside output_dir and replaces output_dir only once everything is
    saved, so an interrupted run leaves the previous folder untouched and ``--resume_from_checkpoint True``
    continues it. ``publish=False`` leaves the swap to the caller (:func:`publish_run`), for files added after training.
    """
    kind = get_method(method)
    if kind.load_in_4bit and not model_args.load_in_4bit:
        raise ValueError(f"method {method!r} trains on a 4-bit base: pass ModelArguments(load_in_4bit=True) (--load_in_4bit True).")
    if kind.trains_base_weights and save:
        raise ValueError("Full fine-tuning is the benchmark's baseline only; the kit saves adapters, never full weights.")
    method_args = kind.method_arguments(lora_args, prompt_args)
    check_training_flags(training_args, method_args)
    if kind.adapts_linear_layers and lora_args is not None:
        check_lora_variant_on_4bit(lora_args, model_args.load_in_4bit)
    check_data_files(data_args)  # a missing --eval_data_path now, named, not after tokenising the training data
    check_token_budget(training_args.token_budget, data_args.max_length)
    check_liger(training_args, model_args.model_path)  # before anything loads: a run that cannot use it stops now
    base_config = check_model_path(model_args.model_path)
    if kind.prepends_virtual_tokens and prompt_args:
        check_prompt_fits_model(prompt_args.num_virtual_tokens, data_args.max_length, model_args.model_path,
                                base_config)
    task, labels = (prompt_args.task, prompt_args.labels) if kind.prepends_virtual_tokens and prompt_args else ("auto", None)
    check_classification_flags(data_args, task, labels)  # a bad --labels now, not after training
    check_evaluation_data(data_args, training_args)  # evaluation during training needs held-out data
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no":
        # a metric this task produces
        check_evaluation_data(data_args, training_args, held_out_task(data_args, task, labels)[0])
    check_distributed_launch(training_args)
    # the output may be, hold or lie in none of the inputs; nothing is written before this check
    inputs = training_inputs(model_args.model_path, data_args.data_path, data_args.eval_data_path,
                             training_args.deepspeed)
    plan = plan_output_on_main_process(training_args, staged=save, inputs=inputs)
    check_resume_flags(plan.resume_from, method_args)  # another --lora_r fails only after loading, as a size mismatch
    target_args = training_args
    if save:  # the Trainer writes checkpoints and the adapter into the staging folder; the target changes only at the swap
        training_args = copy.copy(training_args)
        training_args.output_dir = plan.staging
    try:
        return _train_into(plan, model_args, data_args, training_args, target_args, method, lora_args, prompt_args, callbacks, save, publish)
    except BaseException:  # an error or Ctrl-C: keep the staging folder only if it holds something to resume
        if save and training_args.process_index == 0 and not complete_checkpoints(plan.staging):
            remove_folders([plan.staging])
        raise


def _train_into(plan: OutputPlan, model_args, data_args, training_args, target_args, method, lora_args, prompt_args, callbacks, save, publish) -> TrainResult:
    """The body of :func:`train` once the output is planned: load, attach, train, save into the staging folder, publish."""
    kind = get_method(method)
    notes = [training_args.precision_notice, f"device: {training_args.device}"]
    if plan.resume_from:
        notes.append(f"resuming from {plan.resume_from}")
    padding_free, batching_note = resolve_padding_free(training_args.padding_free, method, model_args.attn_implementation)
    notes += [batching_note, *filter(None, [apply_cpu_allocator_setting(training_args)])]

    tokenizer = load_tokenizer(model_args.model_path)
    with training_args.main_process_first(desc="tokenising"):
        train_data = load_dataset_for_training(tokenizer, data_args.data_path, data_args.max_length, data_args.overflow, data_args.field_map(),
                                               data_args.data_format, data_args.enable_thinking)
        eval_data = (
            load_dataset_for_training(tokenizer, data_args.eval_data_path, data_args.max_length, data_args.overflow, data_args.field_map(),
                                      data_args.data_format, data_args.enable_thinking)
            if data_args.eval_data_path
            else None
        )
    notes.append(f"data: {data_args.data_path}: {train_data.summary()}")
    # read now, as the data was: export and inference take the system prompt from run_config.json, not from this file
    system_prompt = training_system_prompt(data_args.data_path, data_args.field_map(), data_args.data_format)
    if kind.prepends_virtual_tokens:
        notes.append(describe_text_init(tokenizer, prompt_args))

    set_seed(training_args.seed)  # the adapter's initial weights are reproducible, and the same on every rank
    model = attach_adapter(load_model_for_training(model_args, training_args), method, model_args.model_path, lora_args, prompt_args, tokenizer)
    parameters = count_parameters(model)
    lora_variant_args = lora_args if kind.adapts_linear_layers else None  # DoRA, rsLoRA, PiSSA/OLoRA, LoRA+ (lora_variants.py)
    notes += [str(parameters), *filter(None, [describe_variants(lora_variant_args)])]
    on_main = save and training_args.process_index == 0
    initial_adapter_dir = save_initial_adapter(model, lora_variant_args) if on_main else None

    history, nan_guard = LossHistoryCallback(), NanGuardCallback()
    held_out = held_out_scorer(tokenizer, data_args, training_args, prompt_args if kind.prepends_virtual_tokens else None)
    early_stopping = (
        EarlyStoppingCallback(training_args.early_stopping_patience) if training_args.early_stopping_patience else None
    )
    if held_out is not None:
        notes.append(held_out.describe())
    trainer = KitTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data.dataset,
        eval_dataset=eval_data.dataset if eval_data else None,
        data_collator=make_training_collator(tokenizer, padding_free, model_args.attn_implementation),
        processing_class=tokenizer,
        callbacks=[history, nan_guard, *([early_stopping] if early_stopping else []), *(callbacks or [])],
        optimizers=(loraplus_optimizer(model, lora_variant_args, training_args), None),  # None: the Trainer's own
        held_out_scorer=held_out,
        token_budget=training_args.token_budget,
        padding_free=padding_free,
        # prompt tuning shifts positions by its virtual tokens; Liger's fused loss never materialises the logits anyway
        trained_logits_only=not kind.prepends_virtual_tokens and not training_args.use_liger_kernel,
    )
    if any(isinstance(callback, ProgressCallback) for callback in callbacks or []):  # the caller's progress display replaces the default one
        for default in [c for c in trainer.callback_handler.callbacks if type(c) in (ProgressCallback, PrinterCallback)]:
            trainer.remove_callback(default)
    if trainer.budget_sampler is not None:
        notes.append(trainer.budget_sampler.describe())
    if training_args.world_size > 1:
        notes.append(describe_distributed(trainer))
        print(f"rank {training_args.process_index}/{training_args.world_size} ready on {training_args.device}", flush=True)
    if training_args.should_log:
        for note in notes:
            print(note, flush=True)
    earlier_history = resumed_history(plan.resume_from)  # read first: the run may delete that checkpoint (--save_total_limit)
    trainer.train(resume_from_checkpoint=plan.resume_from)
    result = TrainResult(
        model=model,
        tokenizer=tokenizer,
        trainer=trainer,
        history=earlier_history + history.history,
        output_dir=training_args.output_dir,
        parameters=parameters,
        precision=training_args.precision_notice,
        stopped_by_nan_guard=nan_guard.triggered,
        data_report=train_data.summary(),
        notes=notes,
        initial_adapter_dir=initial_adapter_dir,
        target_dir=target_args.output_dir,
        stale_runs=plan.stale,
        held_out=held_out,
        stopped_because=stop_reason(trainer, early_stopping, nan_guard.triggered),
    )
    if save:
        method_args = kind.method_arguments(lora_args, prompt_args)
        save_run(result, model_args, data_args, target_args, method_args, method, system_prompt)
        if publish:
            publish_run(result)
    return result


def save_run(result: TrainResult, model_args, data_args, training_args, method_args, method: str,
             system_prompt: str | None = None) -> None:
    """Write the adapter (never the full model), tokenizer, effective config and loss history into the run's staging folder."""
    trainer = result.trainer
    trainer.save_model(result.output_dir)  # a PeftModel saves only adapter_model.safetensors + adapter_config.json
    trainer.accelerator.wait_for_everyone()  # every rank's part is written before the main process completes the folder
    if not trainer.is_world_process_zero():
        return
    if result.initial_adapter_dir:  # PiSSA/OLoRA: what is saved must work on the original base, not on the residual one
        save_as_plain_lora(result.model, result.output_dir, result.initial_adapter_dir)
    result.tokenizer.save_pretrained(result.output_dir)  # the final folder carries the tokenizer; checkpoints do not
    configs = [model_args, data_args, training_args] + ([method_args] if method_args is not None else [])
    # absolute paths mean the same from any folder; the base's fingerprint catches a folder that is not that base
    paths = dict(model_path=recorded_path(model_args.model_path), data_path=recorded_path(data_args.data_path),
                 eval_data_path=recorded_path(data_args.eval_data_path),
                 output_dir=os.path.abspath(training_args.output_dir))
    write_run_config(result.output_dir, *configs, method=method, history=result.history,
                     stopped_by_nan_guard=result.stopped_by_nan_guard,
                     **{SYSTEM_PROMPT_KEY: system_prompt},  # the one every training record shared, or None
                     base_model=base_summary(base_config_of(result.model)),  # a later load checks the base without it
                     base_fingerprint=model_fingerprint(model_args.model_path), **paths, **best_and_stop(result))
    if result.held_out is not None:
        best = best_of_run(trainer, result.history)
        last = max(result.held_out.answers, default=None)
        step = best[0] if best and trainer.args.load_best_model_at_end else last  # the answers of the saved adapter
        result.held_out.write_answer_table(result.output_dir, result.model, step)


def publish_run(result: TrainResult) -> None:
    """Swap the completed staging folder in as the output folder (main process), without its checkpoints, and drop
    interrupted runs it replaces."""
    if result.output_dir == result.target_dir:
        return
    if result.trainer.is_world_process_zero():
        drop_checkpoints(result.output_dir)  # they exist to resume an interrupted run; this one finished
        swap_in(result.output_dir, result.target_dir)
        remove_folders(result.stale_runs)
    result.output_dir = result.target_dir


def report(result, model_path: str) -> str:
    """The closing lines of a run: where the adapter went, its size against the base, the loss curve."""
    output = Path(result.output_dir)
    adapter = folder_size(output, "adapter_model.*")
    base = base_weights_size(model_path)
    losses = result.train_losses
    lines = [
        f"loss: {losses[0]:.3f} (first log) -> {losses[-1]:.3f} (last log) over {len(losses)} logs" if losses else "loss: nothing logged",
        f"adapter saved to {output}/ ({human_bytes(adapter)}"
        + (f"; the base model's weights are {human_bytes(base)}, {base / max(adapter, 1):,.0f}x larger)" if base else ")"),
        f"loss curve: {output / 'loss_plot.png'}",
    ]
    stopped = getattr(result, "stopped_because", "")
    if stopped:
        lines.insert(1, f"stopped: {stopped}")
    judged = best_of_run(result.trainer, result.history) if hasattr(result, "trainer") else None
    if judged is not None:
        metric = judged_by(result.trainer.args)[0]
        last = result.trainer.state.global_step
        saved = ("its adapter is the one saved" if result.trainer.args.load_best_model_at_end or judged[0] == last
                 else f"the adapter saved is step {last}'s; --load_best_model_at_end True saves the best")
        lines.insert(2, f"best held-out {metric}: {judged[1]:.4g} at step {judged[0]} ({saved})")
    if getattr(result, "held_out", None) is not None:
        lines.append(f"held-out answers before and after: {output / 'heldout_answers.jsonl'}")
    return "\n".join(lines)

"""The one training path: load the base, attach an adapter (LoRA or a soft prompt), train with Trainer, save the adapter.

LoRA, prompt tuning and QLoRA differ only in how the base is loaded (fp16/bf16/fp32 or 4-bit NF4) and
which peft config wraps it; full fine-tuning (the benchmark's baseline) is the same path with no adapter.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from transformers import EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .batching import kit_trainer_class, make_training_collator
from .callbacks import LossHistoryCallback, NanGuardCallback, train_losses
from ..models.checks import base_summary
from ..run.config import KitTrainingArguments, ModelArguments, PromptTuningArguments, write_run_config
from ..data.encoding import chat_tokens_to_train
from ..data.loading import load_dataset_for_training
from ..common.files import base_weights_size, folder_size, human_bytes, remove_folders, swap_in
from ..evaluation.held_out import HeldOutScorer, best_and_stop, best_of_run, held_out_scorer, judged_by, stop_reason
from .lora_variants import describe_variants, loraplus_optimizer, save_as_plain_lora, save_initial_adapter
from ..run.methods import Method, get_method
from ..models.loading import (base_config_of, build_quantization_config, check_target_modules, count_parameters, load_base_model,
                              lora_targets)
from .plan import RunPlan, plan_from_arguments
from ..run.precision import base_dtype
from ..run.prompt_settings import SYSTEM_PROMPT_KEY, training_system_prompt
from .run_folder import drop_checkpoints, keep_only_what_resumes, recorded_run_paths, resumed_history
from .speed import apply_cpu_allocator_setting

logger = logging.getLogger("qwen_helpers")


def describe_distributed(trainer: Trainer) -> str:
    """One line for the main process: the strategy, the number of processes and the global batch they make together."""
    args, state = trainer.args, trainer.accelerator.state
    strategy = state.distributed_type.value
    if state.deepspeed_plugin is not None:
        strategy += f" ZeRO-{state.deepspeed_plugin.zero_stage}"
    if getattr(state, "fsdp_plugin", None) is not None:  # FSDP1 (FullyShardedDataParallel) or FSDP2 (fully_shard)
        strategy += str(state.fsdp_plugin.fsdp_version)
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
    """Wrap the base with the method's peft adapter (see :mod:`qwen_helpers.run.methods`); full fine-tuning leaves every weight trainable.

    With the base's ``tokenizer``, LoRA on a base checkpoint also trains its ``<|im_start|>``/``<|im_end|>`` rows
    (:func:`qwen_helpers.data.encoding.chat_tokens_to_train`, ``--train_chat_tokens``); without one (the benchmark's
    random-weight presets) only the LoRA matrices train.
    """
    kind = get_method(method)
    rows = []
    if kind.adapts_linear_layers and tokenizer is not None:
        rows, notice = chat_tokens_to_train(tokenizer, lora_args.train_chat_tokens)
        if notice:
            print(notice, flush=True)
    return wrap_with_adapter(model, kind, lora_args if kind.adapts_linear_layers else prompt_args, model_path, rows)


def wrap_with_adapter(model, kind: Method, method_args, model_path: str, chat_token_rows=()):
    """``get_peft_model`` with the method's peft config (full fine-tuning: the model as it is)."""
    from peft import get_peft_model

    if kind.trains_base_weights:
        return model
    if not kind.adapts_linear_layers:
        return get_peft_model(model, kind.peft_config(method_args, model_path))
    check_target_modules(model, method_args.target_module_list())
    modules, parameters, notes = lora_targets(model, method_args.target_module_list())
    if parameters and method_args.lora_dropout:
        notes.append(f"note: --lora_dropout {method_args.lora_dropout} becomes 0 for this run: peft trains fused experts "
                     "(target_parameters) without dropout, and one LoraConfig holds one dropout (adapter_config.json records 0)")
    for note in notes:
        print(note, flush=True)
    return get_peft_model(model, kind.peft_config(method_args, model_path, list(chat_token_rows), (modules, parameters)))


def load_model_for_training(model_args: ModelArguments, training_args: KitTrainingArguments, dtype=None):
    """The base under the precision policy (or in ``dtype``, a plan's): fp16/bf16/fp32, or 4-bit prepared for k-bit training."""
    device = str(training_args.device)  # the Trainer's device: honours --use_cpu and LOCAL_RANK
    compute_dtype = dtype if dtype is not None else base_dtype(training_args)
    if not model_args.load_in_4bit:
        return load_base_model(model_args.model_path, compute_dtype, attn_implementation=model_args.attn_implementation, device=device)
    from peft import prepare_model_for_kbit_training

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
    """The kit's ``Trainer`` (token-budget batches, see :mod:`qwen_helpers.training.batching`) whose saves hold the adapter only.

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


def kit_trainer(plan: RunPlan, model, train_dataset, eval_dataset=None, callbacks=(), held_out_scorer=None,
                tokenizer=None) -> KitTrainer:
    """The run's ``Trainer``, as the plan decided it: its collator and batches (padding-free, token budget), the
    LoRA+ optimiser when asked, logits only where the loss reads them. Call ``.train()`` on it."""
    args = plan.training
    tokenizer = tokenizer if tokenizer is not None else plan.tokenizer
    return KitTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=make_training_collator(tokenizer, plan.padding_free, plan.model.attn_implementation),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        optimizers=(loraplus_optimizer(model, plan.lora_args, args), None),  # None: the Trainer's own
        held_out_scorer=held_out_scorer,
        token_budget=args.token_budget,
        padding_free=plan.padding_free,
        # prompt tuning shifts positions by its virtual tokens; Liger's fused loss never materialises the logits anyway
        trained_logits_only=not plan.method.prepends_virtual_tokens and not args.use_liger_kernel,
    )


def train(plan: RunPlan, *arguments, callbacks: list | None = None, publish: bool = True, **argument_kwargs) -> TrainResult:
    """Train one adapter end to end as ``plan`` (:func:`qwen_helpers.training.plan.plan_run`) says, and save it.

    The adapter weights, tokenizer, run config and loss history go to a staging folder beside the output
    folder, which replaces it only once everything is saved, so an interrupted run leaves the previous folder
    untouched and ``--resume_from_checkpoint True`` continues it. ``publish=False`` leaves the swap to the caller
    (:func:`publish_run`), for files added after training. For notebooks and tests, ``train(model_args,
    data_args, training_args, method, lora_args=..., prompt_args=..., save=...)`` plans the run first
    (:func:`qwen_helpers.training.plan.plan_from_arguments`).
    """
    if not isinstance(plan, RunPlan):
        plan = plan_from_arguments(plan, *arguments, **argument_kwargs)
    with keep_only_what_resumes(plan.output.staging, plan.target_dir, plan.save and plan.training.process_index == 0):
        return _train_into(plan, callbacks, publish)


def evaluate_once_at_the_end(trainer, has_eval_data: bool, stopped_by_nan_guard: bool) -> None:
    """--eval_data_path without --eval_strategy: one evaluation of the final adapter (logged, printed, in the loss
    history), so held-out data given to a run is never read for nothing."""
    if has_eval_data and trainer.args.eval_strategy == "no" and not stopped_by_nan_guard:
        trainer.evaluate()


def _train_into(plan: RunPlan, callbacks, publish) -> TrainResult:
    """The body of :func:`train`: load, attach, train, save into the staging folder, publish."""
    model_args, data_args, training_args = plan.model, plan.data, plan.training
    tokenizer, method_args = plan.tokenizer, plan.method_args
    notes = plan.notes()
    notes += list(filter(None, [apply_cpu_allocator_setting(training_args)]))

    with training_args.main_process_first(desc="tokenising"):
        train_data, eval_data = (
            load_dataset_for_training(tokenizer, path, data_args.max_length, data_args.overflow, data_args.field_map(),
                                      data_args.data_format, plan.enable_thinking) if path else None
            for path in (data_args.data_path, data_args.eval_data_path)
        )
    notes.append(f"data: {data_args.data_path}: {train_data.summary()}")
    # read now, as the data was: export and inference take the system prompt from run_config.json, not from this file
    raw_text = data_args.data_format == "text"  # no chat template, so no system prompt
    system_prompt = None if raw_text else training_system_prompt(data_args.data_path, data_args.field_map(), data_args.data_format)
    if plan.prompt_args is not None:
        notes.append(describe_text_init(tokenizer, plan.prompt_args))

    set_seed(training_args.seed)  # the adapter's initial weights are reproducible, and the same on every rank
    base = load_model_for_training(model_args, training_args, plan.dtype)
    model = wrap_with_adapter(base, plan.method, method_args, model_args.model_path, plan.chat_token_rows)
    parameters = count_parameters(model)
    notes += [str(parameters), *filter(None, [describe_variants(plan.lora_args)])]  # DoRA, rsLoRA, PiSSA/OLoRA, LoRA+
    on_main = plan.save and training_args.process_index == 0
    initial_adapter_dir = save_initial_adapter(model, plan.lora_args) if on_main else None

    history, nan_guard = LossHistoryCallback(), NanGuardCallback()
    held_out = held_out_scorer(tokenizer, data_args, training_args, plan.task, plan.labels)
    early_stopping = (
        EarlyStoppingCallback(training_args.early_stopping_patience) if training_args.early_stopping_patience else None
    )
    if held_out is not None:
        notes.append(held_out.describe())
    trainer = kit_trainer(plan, model, train_data.dataset, eval_data.dataset if eval_data else None,
                          [history, nan_guard, *([early_stopping] if early_stopping else []), *(callbacks or [])],
                          held_out)
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
    resume_from = plan.output.resume_from
    earlier_history = resumed_history(resume_from)  # read first: the run may delete that checkpoint (--save_total_limit)
    trainer.train(resume_from_checkpoint=resume_from)
    evaluate_once_at_the_end(trainer, eval_data is not None, nan_guard.triggered)
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
        target_dir=plan.target_dir,
        stale_runs=plan.output.stale,
        held_out=held_out,
        stopped_because=stop_reason(trainer, early_stopping, nan_guard.triggered),
    )
    if plan.save:
        target_args = copy.copy(training_args)
        target_args.output_dir = plan.target_dir  # the run config records the folder the user named
        save_run(result, model_args, data_args, target_args, method_args, plan.method.name, system_prompt)
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
    paths = recorded_run_paths(model_args.model_path, training_args.output_dir, data_path=data_args.data_path,
                               eval_data_path=data_args.eval_data_path)
    write_run_config(result.output_dir, *configs, method=method, history=result.history,
                     stopped_by_nan_guard=result.stopped_by_nan_guard,
                     **{SYSTEM_PROMPT_KEY: system_prompt},  # the one every training record shared, or None
                     base_model=base_summary(base_config_of(result.model)),  # a later load checks the base without it
                     **paths, **best_and_stop(result),
                     # the launch's strategy and global batch: neither is a flag (accelerate's config decides them)
                     **({"distributed": describe_distributed(trainer).removeprefix("distributed: ")} if trainer.args.world_size > 1 else {}))
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

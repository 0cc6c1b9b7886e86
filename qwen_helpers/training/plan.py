"""Resolve a training run once: from the argument dataclasses to a frozen :class:`RunPlan`.

Each argument dataclass checks its own flags in ``__post_init__`` (ranges, choices, combinations within one
group). :func:`plan_run` makes every decision that needs two groups, the data or the base model, once:

    ModelArguments, DataArguments, KitTrainingArguments, LoraArguments | PromptTuningArguments
        --plan_run--> RunPlan(method, precision and dtype, batching, task and labels, chat-token rows,
                              thinking mode, output folder)  --> train(plan), kit_trainer(plan, ...), the benchmark

Nothing downstream checks a flag again: the command, the notebooks and the benchmark share these checks.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field

from .batching import check_token_budget, resolve_padding_free
from ..models.checks import check_model_path, model_type_of
from ..run.config import DataArguments, KitTrainingArguments, ModelArguments
from ..common.errors import FlagError
from ..run.flag_checks import (check_classification_flags, check_data_files, check_evaluation_data, check_lora_variant_on_4bit,
                          check_prompt_fits_model, check_raw_text_flags, check_resume_flags)
from ..evaluation.held_out import held_out_task
from ..run.methods import Method, get_method
from ..run.prompt_settings import apply_template_options
from ..run.precision import Precision
from .run_folder import OutputPlan, plan_output_on_main_process, training_inputs
from .speed import check_liger


@dataclass(frozen=True)
class RunPlan:
    """Everything a training run decided before loading a model; frozen, so no step downstream re-decides it.

    ``training.output_dir`` is where the Trainer writes (the staging folder of a saved run); ``target_dir`` is the
    folder the user named, which the finished run replaces.
    """

    model: ModelArguments
    data: DataArguments
    training: KitTrainingArguments
    method: Method
    method_args: object | None  # LoraArguments, PromptTuningArguments, or None (full fine-tuning)
    precision: Precision
    dtype: object  # torch dtype of the frozen base weights (the precision's; the benchmark's full row asks fp32)
    padding_free: bool
    batching_note: str
    task: str  # "generation" or "classification", from --task or the training answers
    labels: tuple[str, ...] | None  # the label set of classification data
    chat_token_rows: tuple[int, ...]  # embedding rows trained besides LoRA (base checkpoints' <|im_start|>/<|im_end|>)
    chat_token_notice: str | None
    enable_thinking: bool  # Qwen3's thinking mode, for training and every prompt of the run
    output: OutputPlan
    target_dir: str
    save: bool
    tokenizer: object = field(repr=False, compare=False)
    base_config: dict | None = field(default=None, repr=False, compare=False)
    thinking_notice: str | None = None

    @property
    def lora_args(self):
        return self.method_args if self.method.adapts_linear_layers else None

    @property
    def prompt_args(self):
        return self.method_args if self.method.prepends_virtual_tokens else None

    def notes(self) -> list[str]:
        """The lines a run prints about its decisions, before loading the model."""
        notes = [self.training.precision_notice, f"device: {self.training.device}"]
        if self.output.resume_from:
            notes.append(f"resuming from {self.output.resume_from}")
        notes += [self.batching_note, *([self.chat_token_notice] if self.chat_token_notice else [])]
        return [*notes, *([self.thinking_notice] if self.thinking_notice else [])]


def check_fsdp_on_gpus(training_args: KitTrainingArguments) -> None:
    """Refuse an FSDP launch on CPU processes: accelerate turns only a world of GPUs (or other accelerators) into FSDP
    and runs CPU processes without sharding whatever the config says, so the run would not be what was asked."""
    import accelerate
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(training_args.fsdp)
    state = training_args.distributed_state  # accelerate's PartialState, set up with the device (honours --use_cpu)
    world = state.distributed_type if state is not None else DistributedType.NO
    instead = {DistributedType.MULTI_CPU: "plain data parallel (MULTI_CPU, each process holding the whole model)",
               DistributedType.NO: "separate single-process runs"}.get(world)
    if asked and instead and training_args.device.type == "cpu":
        raise FlagError(
            f"FSDP was asked for (an accelerate config with distributed_type: FSDP, or --fsdp), but these processes run "
            f"on the CPU, where accelerate {accelerate.__version__} shards nothing: it would train them as {instead}. "
            "FSDP needs GPUs; to try several processes on a CPU, launch with configs/ddp.yaml and --use_cpu True."
        )


def check_distributed_launch(training_args: KitTrainingArguments) -> None:
    """Refuse several launched processes that did not join one run: each would train alone and overwrite the same folder."""
    check_fsdp_on_gpus(training_args)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size == 1:
        raise RuntimeError(
            f"This command was launched as {launched} processes (WORLD_SIZE={launched}), but training did not become "
            "distributed, so each process would train alone and write the same --output_dir. Without a GPU, add "
            "--use_cpu True (the processes then talk over gloo); with GPUs, check that PyTorch sees them "
            "(python -c 'import torch; print(torch.cuda.device_count())')."
        )


def _method_checks(method: Method, method_args, model_args: ModelArguments, save: bool) -> None:
    """The method against the other groups: its argument dataclass, its 4-bit base, whether it can be saved."""
    if method.arguments is not None and not isinstance(method_args, method.arguments):
        raise FlagError(f"method {method.name!r} takes {method.arguments.__name__}, got {type(method_args).__name__}.")
    if method.load_in_4bit and not model_args.load_in_4bit:
        raise FlagError(f"method {method.name!r} trains on a 4-bit base: pass ModelArguments(load_in_4bit=True) "
                        "(--load_in_4bit True).")
    if method.trains_base_weights and save:
        raise FlagError("Full fine-tuning is the benchmark's baseline only; the kit saves adapters, never full weights.")
    if method.adapts_linear_layers:
        check_lora_variant_on_4bit(method_args, model_args.load_in_4bit)


def _task_and_labels(data_args: DataArguments, training_args: KitTrainingArguments, prompt_args) -> tuple[str, list | None]:
    """The data's task and label set, and the evaluation flags that depend on them."""
    task, labels = (prompt_args.task, prompt_args.labels) if prompt_args is not None else ("auto", None)
    if data_args.data_format == "text":  # raw text: no answers; its held-out measure is the eval loss
        check_evaluation_data(data_args, training_args)
        return "generation", None
    check_classification_flags(data_args, task, labels)  # a bad --labels now, not after training
    check_evaluation_data(data_args, training_args)  # evaluation during training needs held-out data
    detected, label_set = held_out_task(data_args, task, labels)
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no":
        check_evaluation_data(data_args, training_args, detected)  # a metric this task produces
    return detected, label_set


def plan_run(model_args: ModelArguments, data_args: DataArguments, training_args: KitTrainingArguments,
             method: str | Method = "lora", method_args=None, save: bool = True, tokenizer=None) -> RunPlan:
    """Check a run's arguments against each other, the data and the base, and decide everything before a model loads.

    ``save=True`` (the commands) plans a staging folder beside ``--output_dir`` that the finished run replaces it
    with; ``save=False`` (notebooks, the benchmark) only checks the output folder. ``tokenizer`` saves a second
    load when the caller has the base's already.
    """
    from ..data.encoding import chat_tokens_to_train
    from ..models.loading import load_tokenizer

    kind = method if isinstance(method, Method) else get_method(method)
    _method_checks(kind, method_args, model_args, save)
    check_data_files(data_args)  # a missing --eval_data_path now, named, not after tokenising the training data
    check_token_budget(training_args.token_budget, data_args.max_length)
    check_liger(training_args, model_args.model_path)  # before anything loads: a run that cannot use it stops now
    base_config = check_model_path(model_args.model_path)
    padding_free, batching_note = resolve_padding_free(training_args.padding_free, kind.name, model_args.attn_implementation,
                                                       model_type_of(model_args.model_path, base_config))
    prompt_args = method_args if kind.prepends_virtual_tokens else None
    if prompt_args is not None:
        check_prompt_fits_model(prompt_args.num_virtual_tokens, data_args.max_length, model_args.model_path, base_config)
    task_flags = (prompt_args.task, prompt_args.labels) if prompt_args is not None else ("auto", None)
    if check_raw_text_flags(data_args, training_args.metric_for_best_model, *task_flags, method_args, training_args):
        # decided once: every reader below, and run_config.json, see "text"; no chat-token rows (no chat turns)
        data_args = dataclasses.replace(data_args, data_format="text")
        if kind.adapts_linear_layers:
            method_args = dataclasses.replace(method_args, train_chat_tokens=False)
    task, labels = _task_and_labels(data_args, training_args, prompt_args)
    check_distributed_launch(training_args)
    # the output may be, hold or lie in none of the inputs; nothing is written before this check
    inputs = training_inputs(model_args.model_path, data_args.data_path, data_args.eval_data_path, training_args.deepspeed)
    output = plan_output_on_main_process(training_args, staged=save, inputs=inputs)
    check_resume_flags(output.resume_from, method_args)  # another --lora_r fails only after loading, as a size mismatch
    runs_in = training_args
    if save:  # the Trainer writes checkpoints and the adapter into the staging folder; the target changes at the swap
        runs_in = copy.copy(training_args)
        runs_in.output_dir = output.staging
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_args.model_path)
    apply_template_options(tokenizer, data_args.template_options(), data_args.enable_thinking, model_args.model_path)
    rows, notice = chat_tokens_to_train(tokenizer, method_args.train_chat_tokens) if kind.adapts_linear_layers else ([], None)
    return RunPlan(
        model=model_args, data=data_args, training=runs_in, method=kind, method_args=method_args,
        precision=training_args.precision, dtype=training_args.precision.dtype, padding_free=padding_free,
        batching_note=batching_note, task=task, labels=tuple(labels) if labels else None,
        chat_token_rows=tuple(rows), chat_token_notice=notice, enable_thinking=data_args.enable_thinking,
        output=output, target_dir=training_args.output_dir, save=save, tokenizer=tokenizer, base_config=base_config,
        thinking_notice=thinking_notice(tokenizer, data_args.enable_thinking),
    )


def thinking_notice(tokenizer, enable_thinking: bool) -> str | None:
    """One line when the run's thinking mode is not the template's own default (chosen, so it is said)."""
    from ..data.chat_spans import thinking_default

    default = thinking_default(tokenizer)
    if default is None or default == enable_thinking:
        return None
    if enable_thinking:
        return ("thinking: on (--enable_thinking True); this checkpoint's template answers without thinking unless asked, "
                "and every prompt of this run (inference, merge, serving) asks in thinking mode, as recorded")
    return ("thinking: off (--enable_thinking False, the kit's default: answers are trained without reasoning); this "
            "checkpoint's template thinks by default, and prompts of this run pre-fill an empty think block as trained. "
            "Records with reasoning: pass --enable_thinking True")


def plan_from_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: KitTrainingArguments,
                        method: str | Method = "lora", lora_args=None, prompt_args=None, save: bool = True) -> RunPlan:
    """:func:`plan_run` with the method's arguments given by kind (``lora_args=``/``prompt_args=``), as notebooks pass them."""
    kind = method if isinstance(method, Method) else get_method(method)
    method_args = {"lora": lora_args, "prompt_tuning": prompt_args}.get(kind.adapter)
    if kind.arguments is not None and method_args is None:
        method_args = kind.arguments()  # the method's defaults
    return plan_run(model_args, data_args, training_args, kind, method_args, save=save)

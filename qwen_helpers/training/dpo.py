"""DPO on LoRA with TRL's ``DPOTrainer``: the kit's data, model loading, output folder and NaN rules around TRL's loss.

    preference file ──preference.load_preference_records──▶ pairs ──tokenize_preference──▶ prompt/chosen/rejected ids
    base (+ --adapter_path SFT adapter, continued) ──KitDPOTrainer (TRL's DPO loss, reference = start)──▶ LoRA adapter

Reference model: with a peft model and no ``ref_model``, TRL 1.16 copies the "default" adapter into a frozen
"ref" adapter and scores the reference with it. From a fresh LoRA (B = 0) that copy is the base; from an SFT
adapter it is the SFT model, which DPO should stay close to. Only the "default" adapter is saved.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

from trl import DPOConfig, DPOTrainer

from .callbacks import LossHistoryCallback, NanGuardCallback
from ..models.checks import base_summary, check_continued_adapter, check_model_path
from ..run.flag_checks import refuse_ignored
from ..run.objective_checks import PREFERENCE_IGNORES, check_dpo_config, check_preference_flags
from ..run.config import KitTrainingArguments, LoraArguments, ModelArguments, TemplateOptions, write_run_config
from ..common.errors import FlagError
from ..common.files import remove_folders, swap_in
from ..run.prompt_settings import apply_template_options
from ..models.loading import base_config_of, count_parameters, load_tokenizer
from ..data.preference import load_preference_records, tokenize_preference
from ..run.prompt_settings import SYSTEM_PROMPT_KEY, shared_system_prompt
from .run_folder import (drop_checkpoints, keep_only_what_resumes, plan_output_on_main_process, recorded_run_paths, resumed_history,
                         training_inputs)
from .sft import TrainResult, attach_adapter, evaluate_once_at_the_end, load_model_for_training


@dataclass
class PreferenceDataArguments(TemplateOptions):
    """Preference pairs and where DPO starts."""

    data_path: str = field(
        default="data/preference.json", metadata={"help": "Preference pairs: prompt (or messages), chosen, rejected."}
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "Held-out pairs: reward margin and accuracy logged at each evaluation."}
    )
    enable_thinking: bool = field(
        default=False,
        metadata={"help": "Qwen3: render prompts in thinking mode (default: non-thinking, as SFT and inference)."},
    )
    adapter_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this SFT LoRA adapter: it is trained further, and a frozen copy of it is the reference."
        },
    )

    def __post_init__(self):
        if self.adapter_path and not (Path(self.adapter_path) / "adapter_config.json").is_file():
            raise FlagError(
                f"--adapter_path {self.adapter_path}: no adapter_config.json there; "
                "give a folder a training command wrote."
            )


@dataclass
class KitDPOConfig(KitTrainingArguments, DPOConfig):
    """TRL's ``DPOConfig`` (``--beta``, ``--loss_type``, ...) with the kit's defaults and precision policy.

    The kit's TrainingArguments defaults win over DPOConfig's (logging every step, precision policy,
    --activation_checkpointing off where TRL turns gradient checkpointing on); DPO's own fields keep TRL's.
    """

    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where the adapter and run files go."})
    learning_rate: float = field(
        default=5e-5, metadata={"help": "Peak learning rate (DPO on LoRA: 5e-6 to 5e-5 on a real Qwen)."}
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "How far from the reference the policy may move: higher stays closer (TRL's beta)."},
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Longest prompt + answer in tokens; longer pairs are dropped and counted."}
    )

    # what TRL's DPOTrainer logs at an evaluation, the choices of --metric_for_best_model (not SFT's answer scores)
    LOGGED_EVAL_METRICS: ClassVar[tuple[str, ...]] = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen",
                                                      "rewards/rejected")

    def __post_init__(self):
        refuse_ignored(PREFERENCE_IGNORES, (self,), "train_dpo does not use it")  # before the SFT checks' advice
        super().__post_init__()
        check_dpo_config(self)  # before any model loads: TRL would refuse these after it, or train on them silently


class AdapterTrainerMixin:
    """What the kit's DPO and GRPO trainers add to TRL's: chat-token rows that work with its fused LM head (a readable
    ``lm_head.bias``, the rows in the "ref" copy), and only the trained adapter saved."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        copy_token_rows_to_reference(self.model)
        expose_lm_head_bias(self.model)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, selected_adapters=["default"])


def copy_token_rows_to_reference(model) -> None:
    """Finish TRL 1.16's frozen "ref" copy of the adapter: its copy loop matches names containing ``.default.``.

    peft names trained chat-token rows ``...token_adapter.trainable_tokens_delta.default`` (no dot after), so TRL
    leaves the "ref" rows at the base's values, and a continued SFT adapter's reference would score ``<|im_start|>``
    and ``<|im_end|>`` with the base's rows: nonzero rewards before the first step, a reference that is not the start.
    """
    import torch

    if "ref" not in getattr(model, "peft_config", {}):
        return
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".default"):
                model.get_parameter(name.removesuffix("default") + "ref").copy_(parameter)


class KitDPOTrainer(AdapterTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on pairs the kit has tokenised, saving only the trained adapter (never TRL's "ref" copy)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:  # the kit's tokens: its prompt format and trained spans, not TRL's
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


def load_start_model(
    model_args: ModelArguments, data_args: PreferenceDataArguments, lora_args: LoraArguments, config, tokenizer
):
    """The base with a fresh LoRA adapter (chat-token rows trained on a base checkpoint, as in SFT), or with
    ``--adapter_path``'s SFT adapter loaded trainable (its token rows too)."""
    from peft import PeftModel

    base = load_model_for_training(model_args, config)
    if data_args.adapter_path:
        return PeftModel.from_pretrained(base, data_args.adapter_path, is_trainable=True)
    return attach_adapter(base, "lora", model_args.model_path, lora_args, tokenizer=tokenizer)


def expose_lm_head_bias(model) -> None:
    """Let TRL 1.16's fused LM head read ``lm_head.bias`` when peft trains chat-token rows (a base checkpoint's).

    TRL's fused head (``trl.trainer.utils.add_fused_lm_head``) projects with ``lm_head.weight`` and ``lm_head.bias``.
    On a base checkpoint the LM head is peft's ``TrainableTokensWrapper``: it serves ``weight`` (the base rows with
    the active adapter's trained token rows merged in, so the policy and its "ref" copy score with their own rows)
    but raises AttributeError for ``bias``. Qwen's LM head has no bias, so the wrapper gets a plain ``bias = None``.
    """
    from peft.utils.other import TrainableTokensWrapper

    head = model.get_output_embeddings()
    if isinstance(head, TrainableTokensWrapper) and "bias" not in vars(head):
        if head.original_module.bias is not None:
            raise FlagError(
                "this model's LM head has a bias, which TRL's fused LM head cannot read through peft's trainable "
                "token rows; pass --train_chat_tokens False (or an adapter trained without them)."
            )
        head.bias = None  # a plain attribute, not a parameter: nothing new is trained or saved


def train_dpo(
    model_args: ModelArguments,
    data_args: PreferenceDataArguments,
    lora_args: LoraArguments,
    config: KitDPOConfig,
    callbacks: list | None = None,
) -> TrainResult:
    """Train a LoRA adapter with DPO and save it (adapter, tokenizer, run_config.json, loss_history.json) to output_dir.

    Every record is checked before the model loads; the run writes into a staging folder that replaces
    output_dir only once everything is saved (:mod:`qwen_helpers.training.run_folder`).
    """
    check_preference_flags("train_dpo", config, lora_args, data_args.eval_data_path)
    check_model_path(model_args.model_path)
    train_pairs = load_preference_records(data_args.data_path)
    eval_pairs = load_preference_records(data_args.eval_data_path) if data_args.eval_data_path else None
    # the output may be, hold or lie in none of the inputs (the base, the data, the SFT adapter it continues)
    inputs = training_inputs(model_args.model_path, data_args.data_path, data_args.eval_data_path, config.deepspeed)
    if data_args.adapter_path:  # trained on --model_path, and the base it records is an input too
        inputs |= check_continued_adapter(data_args.adapter_path, model_args.model_path)
    plan = plan_output_on_main_process(config, staged=True, inputs=inputs)
    target = config.output_dir
    config = copy.copy(config)
    config.output_dir = plan.staging
    with keep_only_what_resumes(plan.staging, target, config.process_index == 0):
        result = _train_into(
            model_args, data_args, lora_args, config, train_pairs, eval_pairs, callbacks, plan.resume_from, target
        )
    result.target_dir, result.stale_runs = target, plan.stale
    return result


def _train_into(
    model_args, data_args, lora_args, config, train_pairs, eval_pairs, callbacks, resume_from, target
) -> TrainResult:
    """Tokenise, load, train with TRL's DPO loss and save into the staging folder (``config.output_dir``)."""
    from transformers import set_seed

    tokenizer = load_tokenizer(model_args.model_path)
    apply_template_options(tokenizer, data_args.template_options(), data_args.enable_thinking, model_args.model_path)
    train_data, dropped = tokenize_preference(tokenizer, train_pairs, config.max_length, data_args.enable_thinking)
    eval_data = (
        tokenize_preference(tokenizer, eval_pairs, config.max_length, data_args.enable_thinking)[0]
        if eval_pairs
        else None
    )
    notes = [
        config.precision_notice,
        f"data: {data_args.data_path}: {len(train_data)} pairs" + (f", {dropped} too long dropped" if dropped else ""),
    ]
    set_seed(config.seed)
    model = load_start_model(model_args, data_args, lora_args, config, tokenizer)
    notes.append(str(count_parameters(model)))
    history, nan_guard = LossHistoryCallback(), NanGuardCallback()
    trainer = KitDPOTrainer(
        model=model,
        args=config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=[history, nan_guard, *(callbacks or [])],
    )
    if config.should_log:
        print("\n".join(filter(None, notes)), flush=True)
    earlier_history = resumed_history(resume_from)  # read first: the run may delete that checkpoint (--save_total_limit)
    trainer.train(resume_from_checkpoint=resume_from)
    evaluate_once_at_the_end(trainer, eval_data is not None, nan_guard.triggered)
    result = TrainResult(
        model=trainer.model,
        tokenizer=tokenizer,
        trainer=trainer,
        history=earlier_history + history.history,  # a resumed run's history covers every step
        output_dir=config.output_dir,
        parameters=count_parameters(model),
        precision=config.precision_notice,
        stopped_by_nan_guard=nan_guard.triggered,
        data_report=notes[1],
        notes=notes,
    )
    # export and inference ask as training did
    save_adapter_run(trainer, tokenizer, "dpo", result.history, nan_guard.triggered, model_args, data_args, lora_args,
                     shared_system_prompt(pair["chosen"] for pair in train_pairs), target)
    return result


def save_adapter_run(trainer, tokenizer, method: str, history: list[dict], stopped_by_nan_guard: bool, model_args, data_args,
                     lora_args, system_prompt: str | None, target_dir: str) -> None:
    """The adapter, its tokenizer and run_config.json into ``trainer.args.output_dir`` (the staging folder): DPO's and GRPO's.

    The record is SFT's: paths absolute (a relative --model_path means the same from any folder), the base's
    fingerprint, and ``target_dir`` as the output folder (the staging folder is gone once the run is published)."""
    config = trainer.args
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        inputs = {key: getattr(data_args, key) for key in ("data_path", "eval_data_path", "adapter_path") if hasattr(data_args, key)}
        write_run_config(config.output_dir, model_args, data_args, lora_args, config, method=method, history=history,
                         stopped_by_nan_guard=stopped_by_nan_guard, base_model=base_summary(base_config_of(trainer.model)),
                         **recorded_run_paths(model_args.model_path, target_dir, **inputs), **{SYSTEM_PROMPT_KEY: system_prompt})


def publish(result: TrainResult) -> None:
    """Swap the completed staging folder in as the output folder, without its checkpoints (they exist to resume an
    interrupted run; this one finished), and drop the interrupted runs it replaces."""
    if result.trainer.is_world_process_zero():
        drop_checkpoints(result.output_dir)
        swap_in(result.output_dir, result.target_dir)
        remove_folders(result.stale_runs)
    result.output_dir = result.target_dir


def finish_command(result: TrainResult, name: str, title: str, plot, summary) -> int:
    """The end of ``train_dpo`` / ``train_grpo``: the plot joins the run, the run is published, the summary printed.

    ``plot(history, title=title)`` returns the figure saved as ``{name}_plot.png``; ``summary(history)`` its lines.
    Returns the exit code: 2 when the NaN guard stopped the run.
    """
    import sys

    if not result.trainer.is_world_process_zero():
        return 0
    from ..common.files import save_figure

    save_figure(plot(result.history, title=title), Path(result.output_dir) / f"{name}_plot.png")
    publish(result)
    print("\n".join(summary(result.history)), flush=True)
    print(f"adapter saved to {result.output_dir}/ (metrics: loss_history.json, plot: {name}_plot.png)", flush=True)
    if result.stopped_by_nan_guard:
        print(NanGuardCallback.ADVICE, file=sys.stderr)
        return 2
    return 0


def preference_summary(history: list[dict]) -> list[str]:
    """First and last logged reward margin and accuracy, on training batches and held-out pairs."""
    lines = []
    for prefix, label in (("", "train"), ("eval_", "held-out")):
        margins = [
            (r[f"{prefix}rewards/margins"], r.get(f"{prefix}rewards/accuracies"))
            for r in history
            if f"{prefix}rewards/margins" in r
        ]
        if margins:
            (first, first_accuracy), (last, last_accuracy) = margins[0], margins[-1]
            lines.append(
                f"{label} reward margin {first:+.3f} -> {last:+.3f}, "
                f"preference accuracy {first_accuracy:.2f} -> {last_accuracy:.2f} "
                f"over {len(margins)} logs"
            )
    return lines


def answer_logps(model, tokenizer, pairs: list[dict], enable_thinking: bool = False) -> list[dict]:
    """Per pair, the summed log-probability of its chosen and of its rejected answer after the prompt: the tokens DPO
    scores (:func:`tokenize_pair`'s, ``<|im_end|>`` included). Run it with the adapter off and on: ``beta`` times
    the change of each is TRL's reward, and their difference its margin."""
    import torch

    from ..data.preference import tokenize_pair
    from ..models.generation import token_logprobs

    rows = []
    for pair in pairs:
        ids = tokenize_pair(tokenizer, pair, enable_thinking)
        sums = {}
        for key in ("chosen", "rejected"):
            logps = token_logprobs(model, ids["prompt_ids"] + ids[f"{key}_ids"], start=len(ids["prompt_ids"]))
            answer = torch.tensor(ids[f"{key}_ids"], device=logps.device)
            sums[key] = logps.gather(-1, answer[:, None]).sum().item()
        rows.append(sums)
    return rows

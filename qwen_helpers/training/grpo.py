"""GRPO on LoRA with TRL's ``GRPOTrainer``: prompts rendered the kit's way, rewards from :mod:`qwen_helpers.training.rewards`.

    prompt file ──load_prompt_records──▶ kit prompts (the checkpoint's chat template, Qwen3 enable_thinking) + columns
    base (+ --adapter_path) ──GRPOTrainer: sample --num_generations per prompt, score, group-normalise──▶ LoRA adapter

Generation stops at the kit's stop tokens (:func:`qwen_helpers.models.generation.stop_token_ids`: ``<|im_end|>`` and
``<|endoftext|>``), set on the model's generation config, which TRL reads. With ``--beta`` > 0 the reference is
the start model (TRL disables the adapter), and the KL to it is logged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer

from .callbacks import LossHistoryCallback, NanGuardCallback
from ..models.checks import check_continued_adapter, check_model_path
from ..run.flag_checks import refuse_ignored
from ..run.objective_checks import PREFERENCE_IGNORES, check_grpo_config, check_preference_flags
from ..run.config import KitTrainingArguments, LoraArguments, ModelArguments, TemplateOptions
from ..data.encoding import format_prompt
from ..common.errors import FlagError, KitError
from ..run.prompt_settings import apply_template_options
from ..models.loading import count_parameters, load_tokenizer
from ..data.preference import prompt_messages
from ..run.prompt_settings import shared_system_prompt
from .dpo import AdapterTrainerMixin, load_start_model, save_adapter_run
from ..data.raw_text import refuse_raw_text
from ..data.records import DataValidationError, read_raw_records, validate_record
from .rewards import COLUMNS_NEEDED, REWARDS, reward_names
from .run_folder import keep_only_what_resumes, plan_output_on_main_process, resumed_history, training_inputs
from .sft import TrainResult


@dataclass
class PromptDataArguments(TemplateOptions):
    """Prompts to sample answers for, the rewards that score them, and where GRPO starts."""

    data_path: str = field(
        default="data/grpo_toy.json",
        metadata={"help": "Prompts: 'prompt' (text or messages) plus any columns rewards read."},
    )
    reward: str = field(
        default="language", metadata={"help": f"Comma-separated reward functions: {', '.join(REWARDS)}."}
    )
    enable_thinking: bool = field(
        default=False, metadata={"help": "Qwen3: sample in thinking mode (pair it with --reward think_format)."}
    )
    adapter_path: str | None = field(
        default=None, metadata={"help": "Start from this SFT LoRA adapter, trained further."}
    )

    def __post_init__(self):
        reward_names(self.reward)
        if self.adapter_path and not (Path(self.adapter_path) / "adapter_config.json").is_file():
            raise FlagError(
                f"--adapter_path {self.adapter_path}: no adapter_config.json there; "
                "give a folder a training command wrote."
            )


@dataclass
class KitGRPOConfig(KitTrainingArguments, GRPOConfig):
    """TRL's ``GRPOConfig`` with the kit's TrainingArguments defaults; values for the tiny toy (real Qwen: help)."""

    output_dir: str = field(default="outputs/grpo", metadata={"help": "Where the adapter and run files go."})
    learning_rate: float = field(
        default=1e-5, metadata={"help": "Peak learning rate (1e-6 to 1e-5 on a real Qwen with LoRA)."}
    )
    num_generations: int | None = field(
        default=4, metadata={"help": "Completions sampled per prompt (the group; 8-16 on a GPU)."}
    )
    max_completion_length: int | None = field(
        default=16, metadata={"help": "Longest completion in tokens (256-1024 for GSM8K)."}
    )
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Completions per step: prompts x --num_generations."}
    )
    beta: float = field(
        default=0.04, metadata={"help": "KL penalty to the start model (TRL's default 0.0 skips it and logs no KL)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log rewards every N steps."})
    # KitTrainingArguments carries every TrainingArguments default, so GRPOConfig's own must be restated here
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep the data's columns: reward functions read them (answer, language)."}
    )

    def __post_init__(self):
        refuse_ignored(PREFERENCE_IGNORES, (self,), "train_grpo does not use it")  # before the SFT checks' advice
        super().__post_init__()
        check_grpo_config(self)  # before any model loads: TRL would refuse these after it, or train on them silently


def load_prompt_records(path: str | Path, rewards: list[str]) -> list[dict]:
    """The prompt records, each checked: a prompt (text or messages) and every column the chosen rewards read."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            f"{path}: no such prompt file. Check --data_path (paths are relative to {Path.cwd()})."
        )
    refuse_raw_text(path, "prompt records: a 'prompt' (or 'messages') and the columns its rewards read; data/grpo_toy.json shows them")
    records = []
    for index, record in enumerate(read_raw_records(path)):
        at = f"{path}, record {index}"
        if not isinstance(record, dict):
            raise DataValidationError(f"{at}: expected an object with 'prompt', found {type(record).__name__}.")
        messages = prompt_messages(record, at)
        validate_record({"messages": [*messages, {"role": "assistant", "content": "-"}]}, index, str(path), "messages")
        for name in rewards:
            column = COLUMNS_NEEDED.get(name)
            if column and column not in record:
                raise DataValidationError(
                    f"{at}: the {name} reward reads the '{column}' column, which this record lacks; "
                    f"add it or drop {name}."
                )
        records.append({**{k: v for k, v in record.items() if k not in ("prompt", "messages")}, "messages": messages})
    if not records:
        raise DataValidationError(f"{path}: no records found.")
    return records


def prompt_dataset(tokenizer, records: list[dict], enable_thinking: bool):
    """A ``datasets.Dataset`` whose ``prompt`` is the kit's rendered prompt text; other columns pass to the rewards."""
    from datasets import Dataset

    rows = [
        {**{k: v for k, v in r.items() if k != "messages"}, "prompt": format_prompt(tokenizer, r, enable_thinking)}
        for r in records
    ]
    return Dataset.from_list(rows)


class KitGRPOTrainer(AdapterTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer with a complete "ref" copy (``--beta`` > 0 from an SFT adapter), saving only the trained
    adapter, and reward functions whose every value is checked (:func:`checked_reward`)."""

    def __init__(self, *args, reward_funcs=None, **kwargs):
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        super().__init__(*args, reward_funcs=[checked_reward(f) if callable(f) and not isinstance(f, str) and
                                              not hasattr(f, "config") else f for f in funcs], **kwargs)


class RewardError(KitError, ValueError):
    """A reward function returned something that is not one finite number per completion."""


def checked_reward(function):
    """``function`` with its values checked at every call: one finite number per completion, or a :class:`RewardError`
    naming the function and the completion. TRL would turn None into NaN and average NaN/inf away (an all-NaN reward
    trains "successfully" and saves an unchanged adapter), and a string would be a traceback deep in the trainer."""
    import functools
    import math
    import numbers

    name = getattr(function, "__name__", type(function).__name__)

    @functools.wraps(function)
    def checked(prompts, completions, **kwargs):
        values = function(prompts, completions, **kwargs)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise RewardError(f"reward function {name} returned {type(values).__name__} of "
                              f"{len(values) if hasattr(values, '__len__') else 'no'} values for {len(completions)} "
                              "completions: return a list with one number per completion.")
        for value, completion in zip(values, completions):
            if not (isinstance(value, numbers.Real) and math.isfinite(value)):
                raise RewardError(f"reward function {name} returned {value!r} for the completion {str(completion)[:80]!r}: "
                                  "a reward must be a finite number (0.0 for 'no credit'); fix the function.")
        return values

    return checked


def train_grpo(
    model_args: ModelArguments,
    data_args: PromptDataArguments,
    lora_args: LoraArguments,
    config: KitGRPOConfig,
    reward_funcs: list | None = None,
    callbacks: list | None = None,
) -> TrainResult:
    """Train a LoRA adapter with GRPO and save it (adapter, tokenizer, run_config, loss history) to output_dir.

    ``reward_funcs`` replaces ``--reward``'s functions (a notebook's own). Every record is checked before the
    model loads; the run writes into a staging folder that replaces output_dir once saved.
    """
    from ..models.generation import stop_token_ids

    check_preference_flags("train_grpo", config, lora_args)
    check_model_path(model_args.model_path)
    records = load_prompt_records(data_args.data_path, [] if reward_funcs else reward_names(data_args.reward))
    # the output may be, hold or lie in none of the inputs (the base, the prompts, the SFT adapter it continues)
    inputs = training_inputs(model_args.model_path, data_args.data_path, None, config.deepspeed)
    if data_args.adapter_path:  # trained on --model_path, and the base it records is an input too
        inputs |= check_continued_adapter(data_args.adapter_path, model_args.model_path)
    plan = plan_output_on_main_process(config, staged=True, inputs=inputs)
    target, config = config.output_dir, copy.copy(config)
    config.output_dir = plan.staging
    with keep_only_what_resumes(plan.staging, target, config.process_index == 0):
        tokenizer = load_tokenizer(model_args.model_path)
        apply_template_options(tokenizer, data_args.template_options(), data_args.enable_thinking, model_args.model_path)
        dataset = prompt_dataset(tokenizer, records, data_args.enable_thinking)
        model = load_start_model(model_args, data_args, lora_args, config, tokenizer)
        model.generation_config.eos_token_id = stop_token_ids(tokenizer)  # TRL stops at these (and the tokenizer's eos)
        history, nan_guard = LossHistoryCallback(), NanGuardCallback()
        trainer = KitGRPOTrainer(
            model=model,
            reward_funcs=reward_funcs or [REWARDS[n] for n in reward_names(data_args.reward)],
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[history, nan_guard, *(callbacks or [])],
        )
        if config.should_log:
            print(
                f"{config.precision_notice}\ndata: {data_args.data_path}: {len(dataset)} prompts\n"
                f"{count_parameters(model)}",
                flush=True,
            )
        earlier_history = resumed_history(plan.resume_from)  # read first: --save_total_limit may delete it
        trainer.train(resume_from_checkpoint=plan.resume_from)
        history.history[:0] = earlier_history  # a resumed run's history covers every step
        save_adapter_run(trainer, tokenizer, "grpo", history.history, nan_guard.triggered, model_args, data_args, lora_args,
                         shared_system_prompt(records), target)  # export and inference ask as training did
    return TrainResult(
        model=trainer.model,
        tokenizer=tokenizer,
        trainer=trainer,
        history=history.history,
        output_dir=config.output_dir,
        parameters=count_parameters(model),
        precision=config.precision_notice,
        stopped_by_nan_guard=nan_guard.triggered,
        target_dir=target,
        stale_runs=plan.stale,
    )


def reward_summary(history: list[dict]) -> list[str]:
    """First and last logged mean reward (total and per function), completion length and KL."""
    logs = [record for record in history if "reward" in record]
    if not logs:
        return ["no rewards logged"]
    first, last = logs[0], logs[-1]
    keys = [
        "reward",
        *sorted(k for k in first if k.startswith("rewards/") and k.endswith("/mean")),
        "completions/mean_length",
        "kl",
    ]
    return [
        f"{key}: {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} (step {last['step']})"
        for key in keys
        if key in first
    ]


def sample_completions(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
                       top_k: int | None = None, temperature: float = 1.0, seed: int = 0) -> list[list[str]]:
    """``num_generations`` sampled completions per rendered prompt, as GRPO samples a group (its stop tokens, top-k and
    temperature), from a fixed seed: the same weights and seed give the same completions, before or after a reload,
    and the global random state is untouched, so showing completions does not change what a later run samples."""
    import torch

    from ..models.generation import stop_token_ids

    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(model.device)
    with torch.no_grad(), torch.random.fork_rng():  # the caller's random state (a training run's) is left as it was
        torch.manual_seed(seed)
        output = model.generate(**batch, do_sample=True, top_k=top_k or None, temperature=temperature,
                                max_new_tokens=max_new_tokens, num_return_sequences=num_generations,
                                eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[index : index + num_generations] for index in range(0, len(texts), num_generations)]


def zero_spread_lines(history: list[dict]) -> list[str]:
    """Per logged step, the share of prompt groups whose completions all scored the same (TRL's
    ``frac_reward_zero_std``): their advantages are 0, so those prompts teach nothing at that step."""
    logs = [record for record in history if "frac_reward_zero_std" in record]
    return [f"step {record['step']}: reward {record['reward']:.3f}, spread (std) {record.get('reward_std', float('nan')):.3f}, "
            f"groups with no spread {record['frac_reward_zero_std']:.0%}" for record in logs]

"""DPO and GRPO benchmark rows: the kit's ``train_dpo`` / ``train_grpo`` (TRL's trainers), timed like the SFT rows.

Both run what users run (``python -m qwen_helpers.train_dpo | train_grpo``'s library call) on the SFT rows'
workload, so the figures sit beside them: each synthetic record of ``--seq_len`` tokens becomes a
preference pair (chosen: its answer; rejected: as many other words), or a prompt whose completion
is generated up to ``--seq_len`` tokens in all. TRL is the reference here, so these rows have no plain
twin. GRPO's step is two phases: sampling (``model.generate`` under ``no_grad``) and the optimisation
step; the generation timer times the first, so the row reports both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .measure import finish, rss_bytes, step_timer, training_arguments

REJECTED_WORD = "no"  # the rejected answer repeats another one-token word, so both answers have the same length
GRPO_REWARD = "length_penalty"  # a reward that reads no data column; its value does not change the step's cost


def prompt_turns(record: dict) -> list[dict]:
    """The record's turns before its answer, its (possibly empty) system prompt kept, so lengths stay as sized."""
    system = [{"role": "system", "content": record["system"]}] if "system" in record else []
    return [*system, {"role": "user", "content": record["instruction"]}]


def preference_pairs(records: list[dict]) -> list[dict]:
    """TRL's preference format from the benchmark's instruction records: same prompt, two answers of equal length."""
    return [{"prompt": prompt_turns(record), "chosen": record["output"],
             "rejected": " ".join([REJECTED_WORD] * len(record["output"].split()))} for record in records]


def grpo_prompts(records: list[dict]) -> list[dict]:
    """GRPO's prompts from the benchmark's records (their answers are what the model generates instead)."""
    return [{"prompt": prompt_turns(record)} for record in records]


def generations_per_prompt(batch_size: int) -> int | None:
    """GRPO's group size for ``batch_size`` completions per step: 4 or 2 when it divides the batch, else None."""
    return next((size for size in (4, 2) if batch_size % size == 0), None)


def generation_timer(warmup_steps: int):
    """A ``TrainerCallback`` that times the policy's ``generate`` calls of the timed steps (GRPO's sampling phase).

    At ``on_train_begin`` it wraps the model's ``generate`` (the object GRPOTrainer unwraps on one process);
    a call made while ``global_step`` is k belongs to step k + 1, so calls from ``warmup_steps`` on are timed.
    """
    from transformers import TrainerCallback

    from ..models.loading import synchronize

    class GenerationTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.calls, self.state = 0.0, 0, None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.state, generate = state, model.generate

            def timed_generate(*positional, **keywords):
                synchronize()
                started = time.perf_counter()
                output = generate(*positional, **keywords)
                synchronize()
                if self.state.global_step >= warmup_steps:
                    self.seconds += time.perf_counter() - started
                    self.calls += 1
                return output

            model.generate = timed_generate

    return GenerationTimer()


def split_generation(row: dict, timer) -> dict:
    """GRPO's step split in two: generation seconds per step and the optimisation step's own time and tokens/s."""
    steps = row["timed_steps"]
    generation = timer.seconds / steps
    optimisation = max(row["step_seconds"] - generation, 1e-9)
    return {"generation_seconds_per_step": generation, "generation_calls": timer.calls,
            "optimisation_seconds_per_step": optimisation,
            "optimisation_tokens_per_second": row["real_tokens_per_step"] / optimisation}


def run_trl(spec: dict) -> dict:
    """A DPO or GRPO row: the kit's TRL path on the benchmark's data, timed by the SFT rows' StepTimer."""
    from ..run.config import LoraArguments, ModelArguments

    args, method = spec["args"], spec["method_spec"]
    rss_start = rss_bytes()
    records = json.loads(Path(spec["data_path"]).read_text(encoding="utf-8"))
    timer = step_timer(args["warmup_steps"])
    model_args = ModelArguments(model_path=spec["model_path"], load_in_4bit=method["load_in_4bit"])
    lora_args = LoraArguments(lora_r=args["lora_r"], target_modules=args["target_modules"])
    data_path = Path(spec["work_dir"]) / f"{method['objective']}-data.json"
    if method["objective"] == "dpo":
        from ..training.dpo import KitDPOConfig, PreferenceDataArguments, train_dpo

        data_path.write_text(json.dumps(preference_pairs(records)), encoding="utf-8")
        config = KitDPOConfig(**training_arguments(spec, max_length=2 * args["seq_len"]))  # no pair is cut: sized to --seq_len
        result = train_dpo(model_args, PreferenceDataArguments(data_path=str(data_path)), lora_args, config,
                           callbacks=[timer])
        generation = None
    else:
        from ..training.grpo import KitGRPOConfig, PromptDataArguments, train_grpo

        data_path.write_text(json.dumps(grpo_prompts(records)), encoding="utf-8")
        completion = max(1, args["seq_len"] - _prompt_length(spec, records))
        generation = generation_timer(args["warmup_steps"])
        config = KitGRPOConfig(**training_arguments(
            spec, num_generations=generations_per_prompt(args["batch_size"]), max_completion_length=completion,
            generation_kwargs={"min_new_tokens": completion}))  # every completion full length: steady step shapes
        result = train_grpo(model_args, PromptDataArguments(data_path=str(data_path), reward=GRPO_REWARD), lora_args,
                            config, callbacks=[timer, generation])
    losses = [record["loss"] for record in result.history if "loss" in record]
    row = finish({"examples_per_step": float(args["batch_size"]), "notes": result.notes}, timer, losses,
                 result.parameters, rss_start)
    return {**row, **split_generation(row, generation)} if generation else row


def _prompt_length(spec: dict, records: list[dict]) -> int:
    """Tokens of the kit's rendered GRPO prompt (the chat template's prompt part, generation prompt included)."""
    from ..data.encoding import format_prompt
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(spec["model_path"])
    text = format_prompt(tokenizer, {"messages": prompt_turns(records[0])}, False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])

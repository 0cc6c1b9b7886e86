"""The checks of train_dpo and train_grpo, before a model loads: the TrainingArguments and LoRA flags they accept but
do not use, and their own values (beta, sampling, TRL's loss names), which TRL would refuse only after the model
loads, or train on silently."""

from __future__ import annotations

from ..common.errors import refuse_non_finite
from .flag_checks import _require, refuse_ignored

_SFT_ONLY = "the flag is wired into the SFT commands (train_lora, train_qlora, train_prompt_tuning) only"
PREFERENCE_IGNORES = {  # TrainingArguments/LoRA flags that train_dpo and train_grpo accept but do not use
    "early_stopping_patience": ((None,), f"DPO and GRPO runs do not stop early: {_SFT_ONLY}"),
    "token_budget": ((None,), f"DPO and GRPO batch with --per_device_train_batch_size: {_SFT_ONLY}"),
    "eval_generate_records": ((16, 0), "DPO is judged on held-out pairs by TRL's reward margin and accuracy, and GRPO "
                              "by its rewards, not by generated answers"),
    "loraplus_lr_ratio": ((None,), f"TRL's trainers would train A and B at one learning rate and record the ratio: {_SFT_ONLY}"),
}
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")  # TRL 1.16's DPOConfig
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")  # TRL 1.16's GRPOConfig


def check_preference_flags(command: str, config, lora_args, eval_data_path: str | None = None) -> None:
    """What train_dpo and train_grpo refuse before a model loads: flags they would ignore, evaluations with nothing
    to evaluate, and PiSSA/OLoRA starts (their adapter fits only the base they rewrote: the conversion to plain LoRA
    is SFT's)."""
    refuse_ignored(PREFERENCE_IGNORES, (config, lora_args), f"{command} does not use it")
    strategy = getattr(config.eval_strategy, "value", config.eval_strategy)
    if strategy != "no":
        _require(command == "train_dpo", f"--eval_strategy {strategy}: {command} has no held-out set (its measure is the "
                 "rewards it logs every step); drop the flag.")
        _require(bool(eval_data_path), f"--eval_strategy {strategy} evaluates held-out pairs, and none were given: add "
                 "--eval_data_path PAIRS.json (e.g. data/preference_test.json), or drop the flag.")
    init = str(getattr(lora_args, "init_lora_weights", "true")).strip().lower()
    _require(not init.startswith(("pissa", "olora")),
             f"--init_lora_weights {init}: {command} would save an adapter that fits only the base PiSSA/OLoRA rewrote "
             "(the conversion to plain LoRA for the original base is SFT's); start from an SFT adapter trained with it "
             "(--adapter_path), or drop the flag.")


def check_dpo_config(config) -> None:
    """DPO's own values: a positive finite beta and TRL's loss names."""
    refuse_non_finite({"beta": config.beta})
    _require(config.beta > 0, f"--beta {config.beta}: DPO's beta must be above 0 (0 gives every pair the loss ln 2 and "
             "nothing learns; below 0 prefers the rejected answers); TRL's default is 0.1.")
    unknown = [name for name in config.loss_type if name not in DPO_LOSS_TYPES]
    _require(not unknown, f"--loss_type {','.join(unknown)}: not one of TRL's DPO losses ({', '.join(DPO_LOSS_TYPES)}).")


def check_grpo_config(config) -> None:
    """GRPO's sampling and loss values, which TRL would only reject (or misuse) after the model loads."""
    refuse_non_finite({"beta": config.beta, "temperature": config.temperature, "top_p": config.top_p})
    _require(config.beta >= 0, f"--beta {config.beta}: the KL penalty cannot be negative (0 skips the reference pass).")
    _require(config.temperature > 0, f"--temperature {config.temperature}: GRPO samples, so the temperature must be "
             "above 0 (1.0 is TRL's default; near 0 every completion of a group is the same and nothing learns).")
    _require(0 < config.top_p <= 1, f"--top_p {config.top_p}: must be in (0, 1] (1.0 keeps every token).")
    _require(config.top_k is None or config.top_k >= 0, f"--top_k {config.top_k}: 0 samples among every token, N among "
             "the N likeliest; it cannot be negative.")
    _require(config.max_completion_length is not None and config.max_completion_length >= 1,
             f"--max_completion_length {config.max_completion_length}: a completion needs at least one token.")
    _require(config.loss_type in GRPO_LOSS_TYPES,
             f"--loss_type {config.loss_type}: not one of TRL's GRPO losses ({', '.join(GRPO_LOSS_TYPES)}).")
    _require(config.importance_sampling_level in ("token", "sequence"),
             f"--importance_sampling_level {config.importance_sampling_level}: token or sequence (GSPO).")

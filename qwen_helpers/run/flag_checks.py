"""Checks of the flags' values, run before the tokenizer or any model loads: numeric ranges, combinations, labels.

The argument dataclasses run them on construction (``__post_init__``), so a command, a notebook panel and
a dataclass built in Python meet the same check; checks across groups run once, in
:func:`qwen_helpers.training.plan.plan_run`. Every problem is a :class:`~qwen_helpers.common.errors.FlagError`.
"""

from __future__ import annotations

from ..common.errors import FlagError, refuse_non_finite


MAX_VIRTUAL_TOKENS = 4096  # each one is a position of every example: 100000 of them asked for 18.7 GB and was killed


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise FlagError(message)


def check_training_flags(training_args) -> None:
    """Numeric ranges of the training flags (``KitTrainingArguments.__post_init__`` runs them)."""
    args = training_args
    refuse_non_finite(vars(args))  # a dataclass built in Python skips the command line's check
    _require(args.learning_rate > 0, f"--learning_rate must be above 0, got {args.learning_rate} (try 3e-4 for LoRA, 3e-2 for prompt tuning).")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, name)
        _require(value >= 1, f"--{name} must be at least 1, got {value}.")
    _require(
        args.max_steps > 0 or args.num_train_epochs > 0,
        f"--num_train_epochs {args.num_train_epochs} with --max_steps {args.max_steps} trains nothing (the adapter would stay "
        "at its initial weights); give --num_train_epochs above 0 or --max_steps of at least 1.",
    )
    _require(args.weight_decay >= 0, f"--weight_decay must be 0 or more, got {args.weight_decay}.")
    _require(args.warmup_steps >= 0, f"--warmup_steps must be 0 or more (a fraction below 1, or a step count), got {args.warmup_steps}.")
    _require(args.max_grad_norm >= 0, f"--max_grad_norm must be 0 (no clipping) or more, got {args.max_grad_norm}.")
    _require(args.logging_steps > 0, f"--logging_steps must be above 0, got {args.logging_steps}.")
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps":
        _require(args.save_steps > 0, f"--save_steps must be above 0 with --save_strategy steps, got {args.save_steps}.")


def check_data_flags(args) -> None:
    """The data flags' ranges (``DataArguments`` runs them on construction)."""
    _require(args.max_length >= 16, f"--max_length {args.max_length} is too small for a chat-formatted example; use 128 or more.")
    _require(args.max_eval_records >= 0,
             f"--max_eval_records must be 0 (skip the in-sample evaluation) or more, got {args.max_eval_records}.")


def check_data_files(args) -> None:
    """--data_path and --eval_data_path name data files (not folders, not missing), each error naming its own flag."""
    from pathlib import Path

    from ..data.records import check_data_file

    check_data_file(Path(args.data_path), "--data_path")
    if args.eval_data_path:
        check_data_file(Path(args.eval_data_path), "--eval_data_path")


_NO_ANSWERS = "raw text has no answers to generate and score (its held-out measure is --eval_data_path's loss)"
_NO_FIELDS = "raw text is read from the 'text' key of {\"text\": ...} records (or a .txt file), so no field is mapped"
# Flags only instruction and chat data use: the values that change nothing under raw text (the dataclasses' default
# first; tests/test_raw_text.py checks it), and why. Any other value would be silently ignored, so it is refused.
RAW_TEXT_IGNORES = {
    "overflow": (("drop",), "raw text has no chat turns to truncate (its documents are packed into --max_length blocks)"),
    "enable_thinking": ((False,), "raw text has no chat template, so no thinking block"),
    **{f"{role}_field": ((role,), _NO_FIELDS) for role in ("instruction", "input", "output", "system")},
    "train_chat_tokens": ((None, False), "raw text has no chat turns, so the <|im_start|>/<|im_end|> rows would get no "
                          "gradient (the SFT run that follows trains them)"),
    "max_eval_records": ((200, 0), "raw text has no answers to evaluate after training (its held-out measure is "
                         "--eval_data_path's loss)"),
    "eval_generate_records": ((16, 0), _NO_ANSWERS),
    "eval_max_new_tokens": ((64,), _NO_ANSWERS),
}


def check_raw_text_flags(args, metric_for_best_model: str | None = None, task: str = "auto", labels: str | None = None,
                         *more_args) -> bool:
    """Whether the run trains on raw text (:mod:`qwen_helpers.data.raw_text`), refusing what raw text cannot do; True when it does.

    The evaluation file must be in the same kind (raw text, or records), and the only held-out measure of raw
    text is its loss: it has no answers to generate, score or classify. A chat-only flag (:data:`RAW_TEXT_IGNORES`,
    looked up in ``args`` then ``more_args``) set to a value that would change anything is refused.
    """
    from ..data.raw_text import is_raw_text
    from ..data.records import FieldMap

    fields = FieldMap(args.instruction_field, args.input_field, args.output_field, args.system_field)
    text = is_raw_text(args.data_path, args.data_format, fields)
    if args.eval_data_path and is_raw_text(args.eval_data_path, args.data_format, fields) != text:
        kinds = ("raw text", "instruction or chat records") if text else ("instruction or chat records", "raw text")
        raise FlagError(f"--eval_data_path {args.eval_data_path} holds {kinds[1]}, while --data_path {args.data_path} holds "
                        f"{kinds[0]}: give held-out data of the same kind.")
    if not text:
        return False
    _require(best_metric_name(metric_for_best_model) in (None, "eval_loss"), f"--metric_for_best_model {metric_for_best_model}: raw text has no answers "
             "to score; use eval_loss (the held-out text's loss).")
    _require(task == "auto" and labels is None, f"--task {task} / --labels {labels}: raw text has no answers to "
             "classify or generate; drop them (or train on instruction records without --data_format text).")
    refuse_ignored(RAW_TEXT_IGNORES, (args, *more_args), "it applies to instruction or chat records, not --data_format text")
    return True


def refuse_ignored(table: dict, sources, advice: str) -> None:
    """Refuse any flag of ``table`` (name -> (values that change nothing, why it would be ignored)) that one of
    ``sources`` sets to another value: a flag the run would not use is an error, not a silent no-op."""
    for name, (harmless, why) in table.items():
        holder = next((source for source in sources if source is not None and hasattr(source, name)), None)
        value = getattr(holder, name, harmless[0])
        _require(any(value is choice or (type(value) is type(choice) and value == choice) for choice in harmless),
                 f"--{name} {value}: {why}; drop the flag ({advice}).")


def refuse_data_format_flag(argv: list[str] | None, command: str, reads: str) -> None:
    """train_dpo and train_grpo read their own records: ``--data_format`` (raw text included) is an SFT command's flag."""
    import sys

    if any(arg == "--data_format" or arg.startswith("--data_format=") for arg in (sys.argv[1:] if argv is None else argv)):
        raise FlagError(f"--data_format: {command} reads {reads}, detected by their keys; raw text for continued "
                        "pre-training trains with train_lora (or train_qlora) --data_format text. Drop the flag.")


def check_lora_flags(args) -> None:
    """LoRA's rank, scale, dropout and targets (``LoraArguments`` runs them on construction)."""
    _require(args.lora_r >= 1, f"--lora_r must be at least 1, got {args.lora_r}.")
    _require(any(name.strip() for name in args.target_modules.split(",")),
             f"--target_modules {args.target_modules!r} names no module; give e.g. q_proj,k_proj,v_proj or all-linear.")
    _require(args.lora_alpha > 0, f"--lora_alpha must be above 0 (the update is scaled by alpha / r), got {args.lora_alpha}; try 2 x --lora_r.")
    _require(0 <= args.lora_dropout < 1, f"--lora_dropout must be in [0, 1), got {args.lora_dropout}.")
    check_lora_variant_flags(args)


INIT_CHOICES = "true, gaussian, pissa, pissa_niter_N (N iterations of a fast SVD, e.g. pissa_niter_4) or olora"


def _init_name(args) -> str:
    return str(args.init_lora_weights).strip().lower()


def check_lora_variant_flags(args) -> None:
    """The LoRA variants (DoRA, rsLoRA, PiSSA/OLoRA starts, LoRA+): known values and combinations peft can save."""
    init = _init_name(args)
    _require(init != "eva", "--init_lora_weights eva needs a pass over the data before training (peft's "
             "initialize_lora_eva_weights), which the kit's training path does not run; use pissa_niter_4 "
             "(a start from the weights' principal directions, no data needed) or true.")
    niter = init.removeprefix("pissa_niter_")
    pissa_niter = init.startswith("pissa_niter_") and niter.isdigit() and int(niter) >= 1
    _require(init in ("true", "gaussian", "pissa", "olora") or pissa_niter,
             f"--init_lora_weights {args.init_lora_weights}: use {INIT_CHOICES}.")
    _require(not (args.use_dora and init.startswith(("pissa", "olora"))),
             f"--init_lora_weights {init} with --use_dora True: peft converts a PiSSA/OLoRA adapter into plain LoRA "
             "for the original base only without DoRA's magnitudes; use one of the two.")
    ratio = args.loraplus_lr_ratio
    _require(ratio is None or ratio >= 1, f"--loraplus_lr_ratio must be at least 1 (lora_B learns at ratio x "
             f"--learning_rate; the LoRA+ paper suggests 16), got {ratio}.")


def check_lora_variant_on_4bit(args, load_in_4bit: bool) -> None:
    """PiSSA and OLoRA rewrite the base weights: on a 4-bit base no saved adapter is exact on the original base."""
    init = _init_name(args)
    if not load_in_4bit or not init.startswith(("pissa", "olora")):
        return
    why = ("PiSSA takes the SVD of 16-bit weights (peft refuses quantised ones; its QLoRA route saves a re-quantised "
           "copy of the base, and the kit saves adapters only)" if init.startswith("pissa") else
           "peft re-quantises the base minus OLoRA's start, so the adapter converted for the original 4-bit base would "
           "be off by that rounding")
    raise FlagError(f"--init_lora_weights {init} on a 4-bit base (train_qlora, --load_in_4bit True): {why}; "
                    "train it with train_lora, or use true or gaussian with QLoRA.")


def check_prompt_tuning_flags(args) -> None:
    """The soft prompt's length and initialisation (``PromptTuningArguments`` runs them on construction)."""
    _require(1 <= args.num_virtual_tokens <= MAX_VIRTUAL_TOKENS,
             f"--num_virtual_tokens must be 1 to {MAX_VIRTUAL_TOKENS} (soft prompts work with 8-100), "
             f"got {args.num_virtual_tokens}.")
    _require(args.prompt_tuning_init != "TEXT" or bool(args.prompt_init_text.strip()),
             "--prompt_tuning_init TEXT needs a non-empty --prompt_init_text (or use RANDOM).")


def check_classification_flags(data_args, task: str = "auto", labels: str | None = None) -> list[str] | None:
    """--task and --labels against the training and evaluation data, before anything loads (evaluation after training needs them).

    Returns the label set evaluation will use, or None when there is nothing to check (generation, no --labels, no eval file).
    """
    from ..data.records import check_labels_fit, check_labels_known, detect_task, iter_records, load_records, parse_labels

    named = parse_labels(labels)
    if named is None and (task == "generation" or not data_args.eval_data_path):
        return None  # without --labels only the evaluation file's answers can be wrong
    fields = data_args.field_map()
    records = [{"output": record["output"]} for record in iter_records(data_args.data_path, fields, data_args.data_format)]  # answers only
    if detect_task(records, task) != "classification":
        if named is not None:
            how = f"--task {task}" if task != "auto" else "auto-detected: its answers are not a few repeated labels"
            raise FlagError(f"--labels {labels}: {data_args.data_path} is generation data ({how}), so no label set is used; "
                            "drop --labels, or pass --task classification.")
        return None
    label_list = check_labels_fit(records, named, f"the training data {data_args.data_path}") if named else sorted({record["output"].strip() for record in records})
    if data_args.eval_data_path:
        check_labels_known(load_records(data_args.eval_data_path, fields, data_args.data_format), label_list, data_args.eval_data_path)
    return label_list


def check_prompt_fits_model(num_virtual_tokens: int, max_length: int, model_path: str, config: dict | None) -> None:
    """The soft prompt and the longest example together within the base's positions (``max_position_embeddings``)."""
    import json
    from pathlib import Path

    from ..common.tiny import TINY_ALIASES, resolve_model_path

    if config is None and model_path in TINY_ALIASES:
        config = json.loads(Path(resolve_model_path(model_path), "config.json").read_text(encoding="utf-8"))
    limit = (config or {}).get("max_position_embeddings")
    _require(not limit or num_virtual_tokens + max_length <= limit,
             f"--num_virtual_tokens {num_virtual_tokens} + --max_length {max_length} is more than the base's "
             f"{limit} positions (max_position_embeddings); lower one of them.")


def check_sampling_flags(args) -> None:
    """Inference's sampling values (the generation config refuses them only after the model has loaded)."""
    refuse_non_finite(vars(args))  # an InferenceArguments built in Python skips the command line's check
    _require(args.top_k >= 0, f"--top_k must be 0 (off) or more, got {args.top_k}.")
    _require(0 < args.top_p <= 1, f"--top_p must be above 0 and at most 1 (the mass kept), got {args.top_p}.")
    _require(args.repetition_penalty > 0,
             f"--repetition_penalty must be above 0 (1.0 is off), got {args.repetition_penalty}.")
    _require(args.temperature > 0 or not args.do_sample,
             f"--temperature must be above 0 when sampling, got {args.temperature}; use --do_sample False for greedy.")


def check_resume_flags(checkpoint: str | None, method_args) -> None:
    """Refuse resuming a checkpoint whose adapter differs from the flags (a size mismatch only after loading)."""
    import json
    from pathlib import Path

    config_file = Path(checkpoint or "", "adapter_config.json")
    if method_args is None or not checkpoint or not config_file.is_file():
        return
    recorded = json.loads(config_file.read_text(encoding="utf-8"))
    pairs = [("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("num_virtual_tokens", "num_virtual_tokens")]
    for flag, key in pairs:
        if hasattr(method_args, flag) and key in recorded and getattr(method_args, flag) != recorded[key]:
            raise FlagError(f"--{flag} {getattr(method_args, flag)}: the interrupted run in {checkpoint} has "
                            f"{recorded[key]}; resume with --{flag} {recorded[key]}, or start over with "
                            "--overwrite_output_dir True.")
    if hasattr(method_args, "target_module_list") and isinstance(recorded.get("target_modules"), list):
        wanted = method_args.target_module_list()
        if wanted != "all-linear" and sorted(wanted) != sorted(recorded["target_modules"]):
            raise FlagError(f"--target_modules {method_args.target_modules}: the interrupted run in {checkpoint} "
                            f"adapts {','.join(sorted(recorded['target_modules']))}; resume with those, or start over "
                            "with --overwrite_output_dir True.")


GENERATION_METRICS = ("chrf", "bleu", "exact_match", "tool_call_match")  # metrics.generation_scores, 0-100 (the last
# where held-out answers call tools)
CLASSIFICATION_METRICS = ("accuracy", "macro_f1")  # classification.classification_metrics, 0-1


def _strategy(value) -> str:
    """An interval strategy as its plain name, whether the flag is still a string or already transformers' enum."""
    return str(getattr(value, "value", value))


def best_metric_name(metric_for_best_model: str | None) -> str | None:
    """``--metric_for_best_model`` as logged: 'chrf' and 'eval_chrf' both name 'eval_chrf'."""
    if not metric_for_best_model:
        return None
    return metric_for_best_model if metric_for_best_model.startswith("eval_") else f"eval_{metric_for_best_model}"


def check_evaluation_flags(args) -> None:
    """Evaluation during training, early stopping, the best checkpoint: combinations that cannot work, one line each."""
    evaluating = _strategy(args.eval_strategy) != "no"
    patience = getattr(args, "early_stopping_patience", None)
    _require(
        getattr(args, "eval_generate_records", 0) >= 0,
        f"--eval_generate_records must be 0 (eval loss only) or more, got {args.eval_generate_records}.",
    )
    _require(
        getattr(args, "eval_max_new_tokens", 1) >= 1,
        f"--eval_max_new_tokens must be at least 1, got {getattr(args, 'eval_max_new_tokens', 1)}.",
    )
    if patience is not None:
        _require(patience >= 1, f"--early_stopping_patience must be at least 1 evaluation, got {patience}.")
        _require(
            evaluating,
            f"--early_stopping_patience {patience} needs evaluations to compare: add --eval_data_path HELD_OUT.json "
            "--eval_strategy steps --eval_steps 20 (or --eval_strategy epoch).",
        )
    if args.load_best_model_at_end:
        _require(
            evaluating,
            "--load_best_model_at_end True needs evaluations to pick from: add --eval_data_path HELD_OUT.json "
            "--eval_strategy steps --eval_steps 20 (or --eval_strategy epoch).",
        )
        save = _strategy(args.save_strategy)
        _require(
            save in ("best", _strategy(args.eval_strategy)),
            f"--load_best_model_at_end True needs a checkpoint at each evaluation, but --save_strategy is {save} "
            f"and --eval_strategy "
            f"{_strategy(args.eval_strategy)}: pass --save_strategy best (a checkpoint only when the metric improves).",
        )
    if evaluating and _strategy(args.eval_strategy) == "steps" and args.eval_steps is not None:
        _require(args.eval_steps > 0, f"--eval_steps must be above 0 (steps between evaluations, or a fraction of the run "
                 f"below 1), got {args.eval_steps:g}.")
    name = best_metric_name(args.metric_for_best_model)
    if name is not None:
        _require(evaluating, f"--metric_for_best_model {args.metric_for_best_model} picks among evaluations, and this run has "
                 "none: add --eval_data_path HELD_OUT.json --eval_strategy steps --eval_steps 20, or drop the flag.")
        scored = (*GENERATION_METRICS, *CLASSIFICATION_METRICS)  # SFT's, from answers generated or labels scored
        known = getattr(args, "LOGGED_EVAL_METRICS", None) or ("loss", *scored)  # DPO: TRL's reward metrics instead
        _require(
            name[len("eval_") :] in known,
            f"--metric_for_best_model {args.metric_for_best_model}: this run logs "
            f"{', '.join('eval_' + metric for metric in known)}"
            + (" (generation data: chrf, bleu, exact_match, and tool_call_match where answers call tools; classification: "
               "accuracy, macro_f1)." if known[1:] == scored else "."),
        )
        _require(
            name[len("eval_") :] not in scored or getattr(args, "eval_generate_records", 0) > 0,
            f"--metric_for_best_model {args.metric_for_best_model} is computed on --eval_generate_records records, "
            "and that is 0: give it a sample size such as 16, or use eval_loss.",
        )


def check_evaluation_data(data_args, training_args, task: str | None = None) -> None:
    """Evaluation during training needs held-out data, and a metric the data's task produces (``task``, once known)."""
    strategy = _strategy(training_args.eval_strategy)
    _require(
        strategy == "no" or bool(data_args.eval_data_path),
        f"--eval_strategy {strategy} evaluates during training, but there is no --eval_data_path: name a held-out file "
        "in the training data's format (e.g. data/test.json), or drop --eval_strategy.",
    )
    name = best_metric_name(training_args.metric_for_best_model)
    if task is None or name is None or name == "eval_loss":
        return
    metrics = GENERATION_METRICS if task == "generation" else CLASSIFICATION_METRICS
    _require(
        name[len("eval_") :] in metrics,
        f"--metric_for_best_model {training_args.metric_for_best_model}: "
        f"{data_args.data_path} is {task} data, whose held-out metrics are "
        f"{', '.join('eval_' + metric for metric in metrics)} (or eval_loss).",
    )
    if name == "eval_tool_call_match":
        from ..data.records import iter_records

        records = iter_records(data_args.eval_data_path, data_args.field_map(), data_args.data_format)
        _require(any(record.get("tool_calls") for record in records),
                 f"--metric_for_best_model {training_args.metric_for_best_model}: no answer in --eval_data_path "
                 f"{data_args.eval_data_path} calls a tool, so there is nothing to match; use eval_exact_match or eval_chrf.")


def evaluation_task(data_args, task: str = "auto") -> str:
    """'generation' or 'classification' for the held-out metric: ``--task``, else detected from the training answers."""
    from ..data.records import FieldMap, detect_task, iter_records

    args = data_args
    fields = FieldMap(args.instruction_field, args.input_field, args.output_field, args.system_field)
    answers = [{"output": record["output"]} for record in iter_records(args.data_path, fields, args.data_format)]
    return detect_task(answers, task)

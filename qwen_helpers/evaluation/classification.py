"""Classification as a first-class task: the label set, label scoring, metrics, and a sequence-classification route.

A causal LM classifies by answering with a label. The kit evaluates it two ways:

- label scoring (the prediction): for each test prompt, the log-likelihood of every label's tokens
  followed by ``<|im_end|>`` given the prompt, exactly the tokens training teaches; the best sum wins.
  It always yields a valid label, so it measures what the model knows, not whether it stops cleanly.
- free generation: greedy answers compared with the label as text (exact match), what a user would see.

Any model works: a base alone (the baseline row), a LoRA adapter, or a soft prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.encoding import IGNORE_INDEX, make_collator, tokenize_example
from ..data.records import check_labels_fit, check_labels_known, detect_task, iter_records, load_records, parse_labels
from ..models.generation import generate, uses_soft_prompt
from ..run.methods import build_lora_config
from ..models.loading import check_target_modules, evaluation_mode, load_tokenizer
from ..common.tiny import resolve_model_path

METRICS_FILE = "classification_metrics.json"


def resolve_labels(train_records: list[dict], labels: str | list[str] | None = None, where: str = "the training data") -> list[str]:
    """The label set: ``labels`` (a list or "a,b,c") when given, checked against the training answers, else every distinct answer, sorted.

    Training commands check the flag before the model loads (:func:`qwen_helpers.run.flag_checks.check_classification_flags`).
    """
    named = parse_labels(labels)
    if named:
        return check_labels_fit(train_records, named, where)
    return sorted({record["output"].strip() for record in train_records})


def label_pairs(tokenizer, records: list[dict], labels: list[str]) -> list[dict]:
    """Every (record, label) pair tokenised as a training example whose answer is the label: prompt masked, label + <|im_end|> kept."""
    return [tokenize_example(tokenizer, {**record, "output": label}) for record in records for label in labels]


def virtual_token_count(model) -> int:
    """How many soft-prompt positions a prompt-tuned model puts in front of the input (0 for any other model)."""
    return model.active_peft_config.num_virtual_tokens if uses_soft_prompt(model) else 0


def sequence_log_likelihoods(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Sum of log p(token | everything before it) over the positions whose label is not -100, one value per row.

    Only the positions that predict a scored token go through the LM head (``logits_to_keep``): with
    Qwen's 151,936-token vocabulary the full logits would cost more than the rest of the model.
    """
    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # the logit at p predicts token p + 1
    kept = torch.unique(positions)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=kept + virtual_token_count(model)).logits
    log_probs = torch.log_softmax(logits[rows, torch.searchsorted(kept, positions)].float(), dim=-1)
    token_scores = log_probs.gather(-1, labels[rows, positions + 1].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(input_ids.shape[0], device=token_scores.device).index_add(0, rows, token_scores)


@torch.no_grad()
def score_labels(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Log-likelihood of each label (its tokens then ``<|im_end|>``) after each record's prompt: a (records, labels) tensor."""
    collator = make_collator(tokenizer)
    pairs = label_pairs(tokenizer, records, labels)
    scores = []
    with evaluation_mode(model):
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(pairs), batch_size), desc="label scoring", unit="batch", disable=not progress):
            batch = collator(pairs[start : start + batch_size]).to(model.device)
            scores.append(sequence_log_likelihoods(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).cpu())
    return torch.cat(scores).view(len(records), len(labels))


def predict_by_scoring(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 16, progress: bool = False) -> list[str]:
    """The most likely label for each record (sum of log-probabilities of its tokens)."""
    best = score_labels(model, tokenizer, records, labels, batch_size, progress).argmax(dim=1)
    return [labels[index] for index in best.tolist()]


def classification_metrics(true: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-label precision/recall/F1/support and the confusion matrix (rows true, columns predicted), via scikit-learn."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(true, predicted, labels=labels, zero_division=0)
    return {
        "examples": len(true),
        "accuracy": float(accuracy_score(true, predicted)),
        "macro_f1": float(f1_score(true, predicted, labels=labels, average="macro", zero_division=0)),
        "per_label": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(true, predicted, labels=labels).tolist(),
    }


def evaluate_classification(model, tokenizer, records: list[dict], labels: list[str], batch_size: int = 16, generation: bool = True,
                            progress: bool = False) -> dict:
    """Label-scoring metrics for any model (base, LoRA, soft prompt), plus free generation's exact-match rate.

    Returns the metrics of :func:`classification_metrics` with ``predictions`` and, when ``generation``,
    ``generation_exact_match``, ``generation_outside_labels`` (answers that are no label at all) and ``generated``.
    """
    true = [record["output"].strip() for record in records]
    predicted = predict_by_scoring(model, tokenizer, records, labels, batch_size, progress)
    metrics = {"method": "label scoring: sum of log-probabilities of the label's tokens and <|im_end|>", **classification_metrics(true, predicted, labels)}
    metrics["predictions"] = predicted
    if generation:
        longest_label = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels)
        answers = generate(model, tokenizer, records, max_new_tokens=longest_label + 2, batch_size=batch_size, progress=progress)
        metrics["generation_exact_match"] = sum(answer == label for answer, label in zip(answers, true)) / len(true)
        metrics["generation_outside_labels"] = sum(answer not in labels for answer in answers)
        metrics["generated"] = answers
    return metrics


def write_metrics(metrics: dict, output_dir: str, file_name: str = METRICS_FILE) -> Path:
    """Write the metrics as JSON next to the adapter; returns the file's path."""
    path = Path(output_dir) / file_name
    path.write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def summary_line(metrics: dict) -> str:
    """One line for a log: accuracy, macro-F1 and, when measured, free generation's exact match."""
    line = f"label scoring on {metrics['examples']} examples: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    if "generation_exact_match" in metrics:
        line += f"; free generation exact match {metrics['generation_exact_match']:.3f} ({metrics['generation_outside_labels']} answers outside the label set)"
    return line


def evaluate_run(result, data_args, prompt_args) -> str | None:
    """After a training command: for classification data, evaluate by label scoring and write the metrics JSON next to the adapter.

    Uses --eval_data_path; without one, the training data (in-sample figures, labelled as such).
    ``prompt_args`` may be None (a LoRA run): the task is then detected from the data.
    Returns a line for the report, or None for generation data.
    """
    fields = data_args.field_map()
    # The answers alone decide the task and the labels: the training file is streamed, not held (it may be GBs).
    train_answers = [{"output": record["output"]} for record in iter_records(data_args.data_path, fields, data_args.data_format)]
    task, label_flag = (prompt_args.task, prompt_args.labels) if prompt_args is not None else ("auto", None)
    detected = detect_task(train_answers, task)
    print(describe_task(train_answers, task, detected, prompt_args is not None), flush=True)
    if detected != "classification":
        return None
    labels = resolve_labels(train_answers, label_flag, f"the training data {data_args.data_path}")
    eval_path = data_args.eval_data_path or data_args.data_path
    if data_args.eval_data_path:
        eval_records, split = load_records(eval_path, fields, data_args.data_format), "held-out"
    else:
        chosen = set(in_sample(range(len(train_answers)), data_args.max_eval_records, getattr(result.trainer.args, "seed", 42)))
        eval_records = [record for index, record in enumerate(iter_records(data_args.data_path, fields, data_args.data_format)) if index in chosen]
        if not eval_records:
            return "in-sample evaluation skipped (--max_eval_records 0)"
        split = (f"training data (in-sample: a seeded sample of {len(eval_records)} of {len(train_answers)} records, --max_eval_records; "
                 "pass --eval_data_path for held-out figures)")
    check_labels_known(eval_records, labels, eval_path)
    print(f"evaluating {len(eval_records)} records of {eval_path} ({split}) by label scoring and free generation ...", flush=True)
    metrics = evaluate_classification(result.model, result.tokenizer, eval_records, labels, batch_size=result.trainer.args.per_device_eval_batch_size,
                                      progress=True)
    metrics["eval_data_path"] = eval_path
    metrics["split"] = split
    path = write_metrics(metrics, result.output_dir)
    return f"{summary_line(metrics)} on {metrics['split']}\nclassification metrics: {path}"


def describe_task(records: list[dict], task: str, detected: str, has_task_flag: bool) -> str:
    """One line: the task the data is treated as, how that was decided, and the flag that overrides it."""
    if task != "auto":
        return f"task: {detected} (set by --task {task})"
    distinct = len({record["output"].strip() for record in records})
    why = (f"auto-detected: the {len(records)} answers are {distinct} repeated labels" if detected == "classification"
           else f"auto-detected: {distinct} distinct answers in {len(records)} records, not a small repeated label set")
    other = "generation" if detected == "classification" else "classification"
    override = f"--task {other} overrides it" if has_task_flag else "train_prompt_tuning's --task flag sets it; LoRA runs always auto-detect"
    return f"task: {detected} ({why}; {override})"


def in_sample(records: list[dict], limit: int, seed: int) -> list[dict]:
    """At most ``limit`` records, drawn with ``seed`` (the same sample every run), in their file order."""
    import random

    if len(records) <= limit:
        return list(records)
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]


def build_sequence_classifier(model_path: str, labels: list[str], lora_args, dtype: torch.dtype = torch.float32):
    """The second route: ``AutoModelForSequenceClassification`` (a ``score`` head over the last token) + LoRA.

    The head is new and random, so it is trained in full and saved with the adapter (``modules_to_save``);
    otherwise a reload would start from a fresh random head. ``pad_token_id`` tells the model which
    token is padding, so it reads the last real token of each row.
    """
    from peft import TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model_path),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    check_target_modules(model, lora_args.target_module_list())
    config = build_lora_config(lora_args, task_type=TaskType.SEQ_CLS, modules_to_save=["score"])
    return get_peft_model(model, config), tokenizer

"""Judge a run by held-out records while it trains: the Trainer's eval loss, and the task's own metric from here.

At each evaluation the kit's Trainer (:mod:`qwen_helpers.training.batching`) runs its eval-loss loop, then calls a
:class:`HeldOutScorer`. The scorer answers a seeded sample of the held-out file exactly as ``inference`` does
(same prompts, stop tokens and thinking mode, batched, greedy) and scores it with the task's metric: chrF, BLEU
and exact match for generation (0-100, :mod:`qwen_helpers.evaluation.metrics`), accuracy and macro-F1 by label scoring for
classification (0-1, :mod:`qwen_helpers.evaluation.classification`). Its numbers join the Trainer's metrics as eval_chrf,
eval_exact_match, eval_accuracy, ..., so ``--metric_for_best_model``, ``--load_best_model_at_end`` and
transformers' ``EarlyStoppingCallback`` use them as they use eval_loss.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .classification import classification_metrics, in_sample, predict_by_scoring
from ..common.files import atomic_write_text
from ..run.flag_checks import best_metric_name
from ..models.generation import generate_answers
from .metrics import calls_matching, generation_scores
from ..models.loading import evaluation_mode
from ..data.records import load_records

HELD_OUT_ANSWERS = (
    "heldout_answers.jsonl"  # beside the adapter: prompt, reference, answer before training, at the best step
)


class HeldOutScorer:
    """Answer and score a fixed sample of held-out records; keeps every evaluation's answers by step."""

    def __init__(
        self,
        tokenizer,
        records: list[dict],
        task: str = "generation",
        labels: list[str] | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        enable_thinking: bool = False,
    ):
        if task == "classification" and not labels:
            raise ValueError("Scoring classification needs the label set (classification.resolve_labels).")
        self.tokenizer, self.records, self.task, self.labels = tokenizer, records, task, labels
        self.max_new_tokens, self.batch_size, self.enable_thinking = max_new_tokens, batch_size, enable_thinking
        self.answers: dict[int, list[str]] = {}  # global step -> the answers at that evaluation

    @classmethod
    def from_flags(cls, tokenizer, data_args, training_args, task: str, labels: list[str] | None = None):
        """The scorer the flags ask for: ``--eval_generate_records`` records of ``--eval_data_path`` (seeded)."""
        records = load_records(data_args.eval_data_path, data_args.field_map(), data_args.data_format)
        sample = in_sample(records, training_args.eval_generate_records, training_args.seed)
        return cls(
            tokenizer,
            sample,
            task,
            labels,
            training_args.eval_max_new_tokens,
            training_args.per_device_eval_batch_size,
            data_args.enable_thinking,
        )

    def describe(self) -> str:
        how = (
            f"label scoring over {len(self.labels)} labels"
            if self.task == "classification"
            else f"greedy generation, at most {self.max_new_tokens} new tokens, batches of {self.batch_size}"
        )
        return f"held-out metric at each evaluation: {len(self.records)} records ({how})"

    @property
    def calls_tools(self) -> bool:
        """Some sampled answer calls a tool: the calls are scored too (exact match needs them; tool_call_match)."""
        return self.task != "classification" and any(record.get("tool_calls") for record in self.records)

    def predict(self, model) -> list[str]:
        """The model's answers to the sample: generated (as ``inference``), or the best-scoring label."""
        return self.answer(model)[0]

    def answer(self, model) -> tuple[list[str], list[list[dict]] | None]:
        """The answers' text, and for generation their parsed tool calls (None for classification)."""
        with evaluation_mode(model):
            if self.task == "classification":
                return predict_by_scoring(model, self.tokenizer, self.records, self.labels, self.batch_size), None
            rows = generate_answers(model, self.tokenizer, self.records, self.max_new_tokens, self.batch_size,
                                    enable_thinking=self.enable_thinking)
            return [row["text"] for row in rows], [row["tool_calls"] for row in rows]

    def score(self, predictions: list[str], tool_calls: list[list[dict]] | None = None) -> dict[str, float]:
        """The task's metrics of one set of answers, unprefixed (chrf, bleu, exact_match and, where the sample calls
        tools, tool_call_match / accuracy, macro_f1)."""
        references = [record["output"].strip() for record in self.records]
        if self.task == "classification":
            metrics = classification_metrics(references, predictions, self.labels)
            return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
        judged = self.calls_tools and tool_calls is not None
        scores = generation_scores(predictions, references, calls_matching(self.records, tool_calls) if judged else None)
        return {name: scores[name] for name in ("chrf", "bleu", "exact_match", "tool_call_match") if name in scores}

    def __call__(self, model, step: int, prefix: str = "eval") -> dict[str, float]:
        """Answer and score the sample now: the metrics named as the Trainer logs them (eval_chrf, ...), their cost."""
        began = time.perf_counter()
        predictions, tool_calls = self.answer(model)
        seconds = time.perf_counter() - began
        self.answers[step] = predictions
        metrics = {f"{prefix}_{name}": value for name, value in self.score(predictions, tool_calls).items()}
        return {**metrics, f"{prefix}_scoring_seconds": round(seconds, 3)}

    def answers_before_training(self, model) -> list[str]:
        """The base's answers: the step-0 evaluation's (``--eval_on_start True``), else the model, adapter off."""
        if 0 in self.answers:
            return self.answers[0]
        if not hasattr(model, "disable_adapter"):
            return ["" for _ in self.records]
        with model.disable_adapter():
            return self.predict(model)

    def answer_table(self, model, step: int | None) -> list[dict]:
        """One row per sampled record: prompt, reference, the answer before training and the answer at ``step``."""
        before = self.answers_before_training(model)
        at_step = self.answers.get(step) if step is not None else None
        rows = []
        for index, record in enumerate(self.records):
            row = {
                "instruction": record["instruction"],
                "input": record.get("input", ""),
                "reference": record["output"],
                "before_training": before[index],
            }
            if at_step is not None:
                row.update(step=step, at_step=at_step[index])
            rows.append(row)
        return rows

    def write_answer_table(self, output_dir, model, step: int | None) -> Path:
        """heldout_answers.jsonl beside the adapter (JSON lines, whole or not at all)."""
        path = Path(output_dir) / HELD_OUT_ANSWERS
        atomic_write_text(
            path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in self.answer_table(model, step))
        )
        return path


def best_evaluation(
    history: list[dict], metric_for_best_model: str | None, greater_is_better: bool | None
) -> tuple[int, float] | None:
    """(step, score) of the best logged evaluation by ``metric_for_best_model`` (the first of equals, as the Trainer).

    The step-0 evaluation (``--eval_on_start True``) is the untrained baseline, not a candidate: no checkpoint holds it.
    """
    name = best_metric_name(metric_for_best_model)
    scored = [
        (record["step"], record[name])
        for record in history
        if name and record["step"] > 0 and isinstance(record.get(name), (int, float)) and math.isfinite(record[name])
    ]
    if not scored:
        return None
    better = (lambda a, b: a > b) if greater_is_better else (lambda a, b: a < b)
    best = scored[0]
    for candidate in scored[1:]:
        if better(candidate[1], best[1]):
            best = candidate
    return best


def stop_reason(trainer, early_stopping=None, stopped_by_nan_guard: bool = False) -> str:
    """Why training ended, in words for run_config.json: the NaN guard, early stopping, max_steps or the epochs."""
    args, state = trainer.args, trainer.state
    if stopped_by_nan_guard:
        return "NaN guard: the loss stayed non-finite (the last good adapter was put back)"
    patience_spent = early_stopping is not None and (
        early_stopping.early_stopping_patience_counter >= early_stopping.early_stopping_patience
    )
    if patience_spent and state.global_step < state.max_steps:  # at the last step anyway, the cap ended it
        return (
            f"early stopping: {best_metric_name(args.metric_for_best_model)} did not improve for "
            f"{early_stopping.early_stopping_patience} "
            f"evaluations in a row (stopped at step {state.global_step} of {state.max_steps})"
        )
    if args.max_steps > 0:
        return f"max_steps reached ({state.global_step} steps)"
    return f"all {args.num_train_epochs:g} epochs done ({state.global_step} steps)"


def held_out_task(data_args, task: str = "auto", labels: str | None = None) -> tuple[str, list[str] | None]:
    """(task, label set) of a run, which decide its held-out metric: from the training answers, as evaluate_run."""
    from .classification import resolve_labels
    from ..data.records import detect_task, iter_records

    answers = [
        {"output": record["output"]}
        for record in iter_records(data_args.data_path, data_args.field_map(), data_args.data_format)
    ]
    detected = detect_task(answers, task)
    return detected, (
        resolve_labels(answers, labels, f"the training data {data_args.data_path}")
        if detected == "classification"
        else None
    )


def held_out_scorer(tokenizer, data_args, training_args, task: str, labels) -> HeldOutScorer | None:
    """The task's metric at each evaluation during training, or None (no evaluation, or --eval_generate_records 0).

    ``task`` and ``labels`` are the run's, as :func:`qwen_helpers.training.plan.plan_run` decided them.
    """
    evaluating = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    if not (evaluating and data_args.eval_data_path and training_args.eval_generate_records > 0):
        return None
    if data_args.data_format == "text":  # raw text: no answers to generate; its held-out measure is the eval loss
        return None
    return HeldOutScorer.from_flags(tokenizer, data_args, training_args, task, list(labels) if labels else None)


def best_of_run(trainer, history: list[dict]) -> tuple[int, float] | None:
    """(step, score) of the run's best evaluation: the Trainer's record when it kept checkpoints, else the history's."""
    state = trainer.state
    if state.best_global_step and state.best_metric is not None:
        return state.best_global_step, float(state.best_metric)
    return best_evaluation(history, *judged_by(trainer.args))


def judged_by(args) -> tuple[str, bool]:
    """The metric a run is judged by, and whether higher is better: --metric_for_best_model, else eval loss."""
    if args.metric_for_best_model:
        return best_metric_name(args.metric_for_best_model), bool(args.greater_is_better)
    return "eval_loss", False


def best_and_stop(result) -> dict:
    """How the run was judged, for run_config.json: the best evaluation, the adapter saved, why training stopped."""
    args = result.trainer.args
    best = best_of_run(result.trainer, result.history)
    record = {"stopped_because": result.stopped_because}
    if best is not None:
        record.update(
            best_metric=judged_by(args)[0],
            best_step=best[0],
            best_score=best[1],
            saved_adapter=f"step {best[0]}, the best (--load_best_model_at_end True)"
            if args.load_best_model_at_end
            else f"step {result.trainer.state.global_step}, the last (--load_best_model_at_end False)",
        )
    return record


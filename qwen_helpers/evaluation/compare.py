"""Evaluate and compare models: scores per task, answers side by side, generation throughput (base, adapter, merged)."""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field

from ..models.adapters import AdapterError, merged_copy
from ..models.generation import generate, generate_ids, generate_timed, total_seconds
from .metrics import scores_by_task
from .paired import round_ratios


@dataclass
class Comparison:
    """Scores (one row per model and task, task "all" included) and the predictions of each model, on one record set."""

    records: list[dict]
    scores: list[dict] = field(default_factory=list)
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, predictions: list[str], score: bool = True, tool_calls: list[list[dict]] | None = None) -> None:
        """Record one model's predictions and (unless ``score`` is False, for records without answers) score them per task.

        ``tool_calls`` (each prediction's parsed calls, from :func:`generate_timed`) adds the tool-call exact match
        when the records' answers call tools.
        """
        self.predictions[name] = predictions
        if score:
            self.scores += [{"model": name, **row} for row in scores_by_task(self.records, predictions, tool_calls)]

    def overall(self) -> list[dict]:
        """One row per model: its scores over all records."""
        return [row for row in self.scores if row["task"] == "all"]

    def side_by_side(self) -> list[dict]:
        """One row per record: instruction, input, reference, then each model's answer."""
        return [
            {"instruction": record["instruction"], "input": record.get("input", ""), "reference": record.get("output", ""),
             **{name: answers[index] for name, answers in self.predictions.items()}}
            for index, record in enumerate(self.records)
        ]


def compare_adapters(model, tokenizer, records: list[dict], adapter_names: list[str] | None = None, include_base: bool = True,
                     max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[dict]:
    """Answers side by side: one row per record, one column per adapter of ``model`` (``set_adapter``) and the base."""
    comparison = Comparison(records)
    if include_base:
        with model.disable_adapter():
            comparison.add("base", generate(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs), score=False)
    for name in adapter_names or list(model.peft_config):
        model.set_adapter(name)
        comparison.add(name, generate(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs), score=False)
    return comparison.side_by_side()


def measure_throughput(model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int = 32, **generate_kwargs) -> dict:
    """New tokens per second of greedy generation over ``records`` at ``batch_size`` (tokens counted until EOS)."""
    generate_ids(model, tokenizer, records[:1], max_new_tokens=2)  # warm-up: first-call allocations and kernels
    rows = generate_timed(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)
    seconds = total_seconds(rows)
    new_tokens = sum(row["new_tokens"] for row in rows)
    return {"batch_size": min(batch_size, len(records)), "records": len(records), "new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}


def throughput_table(model, tokenizer, records: list[dict], batch_sizes: tuple[int, ...] = (1, 8), max_new_tokens: int = 32,
                     repeats: int = 3, **generate_kwargs) -> list[dict]:
    """Tokens per second of the base (adapter disabled), the adapter unmerged, and merged (LoRA only), per batch size,
    as interleaved repeats: each round times every model once, so a machine that slows down or speeds up moves all of
    them alike. Each row gives the median tokens per second and its speed relative to the base, the median and the
    range (min-max) of the per-round ratios.

    Pass ``min_new_tokens=max_new_tokens`` to compare equal numbers of generated tokens (no early stop).
    """
    try:
        merged, note = merged_copy(model), None
    except AdapterError as error:
        merged, note = None, str(error)
    variants = {"base": (model, model.disable_adapter), "adapter": (model, contextlib.nullcontext)}
    if merged is not None:
        variants["merged"] = (merged, contextlib.nullcontext)
    timed = {(name, size): [] for name in variants for size in batch_sizes}
    for _ in range(repeats):
        for size in batch_sizes:
            for name, (each_model, context) in variants.items():
                with context():
                    timed[name, size].append(measure_throughput(each_model, tokenizer, records, size, max_new_tokens, **generate_kwargs))
    del merged
    rows = []
    for (name, size), runs in timed.items():
        speeds = [run["tokens_per_second"] for run in runs]
        ratios = round_ratios(speeds, [base["tokens_per_second"] for base in timed["base", size]])
        rows.append({"model": name, "batch_size": runs[0]["batch_size"], "records": runs[0]["records"],
                     "new_tokens": runs[0]["new_tokens"], "repeats": len(runs), "tokens_per_second": statistics.median(speeds),
                     "vs_base": ratios["ratio"], "vs_base_min": ratios["ratio_min"], "vs_base_max": ratios["ratio_max"]})
    if note:
        rows.append({"model": "merged", "note": note})
    return rows

"""Benchmark the training path users run: trainable parameters, peak memory, real tokens/s, kit vs plain HF and TRL.

    estimate.py  the rows (from the method registry, qwen_helpers/run/methods.py), the memory estimate, FLOPs for MFU
    plan.py      the settings (BenchmarkArguments), the data, which rows run in which order
    worker.py    one row in its own process: the kit's ``train.train`` (or ``train_dpo`` / ``train_grpo``) timed by a TrainerCallback
    plain.py     the plain transformers + peft reference, same data, settings and timer
    trl_reference.py  TRL's SFTTrainer as a TRL user writes it, same records, peft config, settings and timer
    report.py    ratios (interleaved rounds: qwen_helpers/evaluation/paired.py), results.md/json/csv and charts
    run.py       run_benchmark: plan, run every row in its own process, report

Every row runs in a fresh Python process, so its peak memory is its own and a crash or an
out-of-memory error costs one row, not the table.
"""

from .estimate import GIB, RUNS, estimate_memory, estimate_table, model_flops_per_token, parse_methods
from .plan import BenchmarkArguments, BenchmarkResult, plan_estimates
from .report import (
    add_baseline,
    add_plain_ratios,
    add_reference_ratios,
    add_speed_relative_to_full,
    markdown_table,
    measured_peak,
    merge_rounds,
)
from .run import run_benchmark
from .worker import is_out_of_memory

__all__ = [
    "GIB", "RUNS", "BenchmarkArguments", "BenchmarkResult", "add_baseline", "add_plain_ratios", "add_reference_ratios",
    "add_speed_relative_to_full", "estimate_memory", "estimate_table", "is_out_of_memory", "markdown_table",
    "measured_peak", "merge_rounds", "model_flops_per_token", "parse_methods", "plan_estimates", "run_benchmark",
]

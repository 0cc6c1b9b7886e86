"""The benchmark's tables and files: ratios (vs full FT, kit vs plain, vs committed reference data), results.md/json/csv, charts."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .estimate import GIB, RUNS, causal_context, model_flops_per_token, run_id
from ..evaluation.paired import round_ratios

WEIGHTS_NOTE = "Weights are random (presets) or as loaded; memory and speed do not depend on weight values."
CPU_NOTE = "CPU run: peak memory is the process's peak RSS and speeds are CPU speeds; they are not GPU figures."
REFERENCE_METHOD_NAMES = {"full": "full_bf16_amp", "prompt_tuning": "prompt_fp16"}  # plain_hf_baseline.py's names
REFERENCE_SIZES = {"qwen2.5-0.5b": "0.5B", "qwen2.5-7b": "7B"}  # the sizes the committed reference data measured
REFERENCE_BATCHING = {"pad_max": "pad_max", "dynamic": "dynamic", "padding_free": "packed_flat"}
SIDE_NAMES = {"plain": " (plain)", "trl": " (TRL)"}
# The batching of the row each kit row is compared with (fixed shapes: None; variable lengths: what a user of that
# reference writes, the same reference for every kit batching mode)
COMPARED_BATCHING = {"plain": ("dynamic", None), "trl": ("padding_free", None)}
# Figures measured anew in each round: a row of several rounds shows their median
ROUND_FIGURES = ("step_seconds", "tokens_per_second", "tokens_per_cpu_second", "peak_bytes", "reserved_bytes",
                 "peak_above_start_bytes", "estimate_ratio", "mfu", "generation_seconds_per_step",
                 "optimisation_seconds_per_step", "optimisation_tokens_per_second", "process_seconds")
ROUND_KEPT = ("round", "status", "tokens_per_second", "tokens_per_cpu_second", "peak_bytes", "trained_tokens_per_step")


def row_name(row: dict) -> str:
    """A row's name: method (+gc), the batching mode on variable-length data, and '(plain)' or '(TRL)' for a reference."""
    name = run_id(row["method"], row["gradient_checkpointing"])
    if row.get("batching") not in (None, "kit default"):
        name += f" {row['batching']}"
    return name + SIDE_NAMES.get(row.get("side"), "")


MIB = 2**20


def measured_peak(row: dict) -> int | None:
    """The peak the tables report: CUDA max_memory_allocated during training, or on a CPU the process's peak RSS during training."""
    return row.get("peak_bytes")


def finish_row(row: dict, planned: dict, estimate: dict, config, environment: dict, lengths: list[int], num_virtual_tokens: int) -> dict:
    """Add the row's identity, its estimate, the estimate/measured ratio and the MFU to a worker's row."""
    from .estimate import device_precision

    method = RUNS[planned["method"]]
    row = {**planned, "run": row_name(planned), "label": method.label,
           "precision": device_precision(method, environment["device"], environment.get("bf16_supported", False))[1], **row}
    row["estimate_bytes"] = estimate["total_bytes"]
    measured = row.get("peak_above_start_bytes", measured_peak(row)) if environment["device"] != "cuda" else measured_peak(row)
    row["estimate_ratio"] = estimate["total_bytes"] / measured if measured and row.get("status") == "ok" else None
    row["estimate_measured_bytes"] = measured  # what the ratio divides by (on a CPU: the peak RSS above the start)
    row["mfu"] = None
    if estimate.get("unmodelled"):
        row["estimate_bytes"] = row["estimate_ratio"] = None
        row["estimate_note"] = estimate["unmodelled"]
    elif row.get("status") == "ok" and environment.get("peak_flops"):
        virtual = num_virtual_tokens if method.method.prepends_virtual_tokens else 0
        flops = model_flops_per_token(config, causal_context(lengths, virtual), method.method.trains_base_weights)
        row["mfu"] = row["tokens_per_second"] * flops / environment["peak_flops"]
    return row


def add_speed_relative_to_full(rows: list[dict]) -> None:
    """Speed relative to the kit's full fine-tuning (same checkpointing setting when available, else without)."""
    full = {row["gradient_checkpointing"]: row["tokens_per_second"] for row in rows
            if row["method"] == "full" and row["status"] == "ok" and row.get("side", "kit") == "kit"}
    for row in rows:
        reference = full.get(row["gradient_checkpointing"], full.get(False))
        row["speed_vs_full"] = row["tokens_per_second"] / reference if row.get("status") == "ok" and reference else None


def add_speed_relative_to_lora(rows: list[dict]) -> None:
    """A LoRA variant's tokens/s and peak memory relative to the kit's LoRA row (same precision and checkpointing)."""
    def kit_ok(row: dict) -> bool:
        kit_default = row.get("batching") in (None, "kit default")
        return row["status"] == "ok" and row.get("side", "kit") == "kit" and kit_default

    def plain_lora(method: str) -> bool:  # the variants' reference: the lora method's own SFT rows
        spec = RUNS[method]
        return spec.method.name == "lora" and not spec.is_variant and spec.objective == "sft"

    lora = {(row.get("precision"), row["gradient_checkpointing"]): row
            for row in rows if plain_lora(row["method"]) and kit_ok(row)}
    for row in rows:
        reference = lora.get((row.get("precision"), row["gradient_checkpointing"]))
        if not RUNS[row["method"]].is_variant or not kit_ok(row) or reference is None:
            continue
        row["speed_vs_lora"] = row["tokens_per_second"] / reference["tokens_per_second"]
        row["memory_vs_lora"] = measured_peak(row) / measured_peak(reference) if measured_peak(reference) else None


def merge_rounds(runs: list[dict]) -> dict:
    """One row from its interleaved rounds: the median of each figure measured per round, each round under ``runs``.

    A round that failed (OOM, crash, timeout) makes the row that round's, so a failure is never hidden by a median.
    """
    failed = next((run for run in runs if run.get("status") != "ok"), None)
    row = dict(failed or runs[0])
    row.pop("round", None)
    row["runs"] = [{key: run[key] for key in ROUND_KEPT if key in run} for run in runs]
    row["repeats"] = len(runs)
    if failed is None and len(runs) > 1:
        for key in ROUND_FIGURES:
            values = [run.get(key) for run in runs]
            if all(value is not None for value in values):
                row[key] = statistics.median(values)
    return row


def _rounds_of(row: dict) -> dict:
    """A row's successful rounds by round number (a row built without rounds is its own round 0)."""
    return {run.get("round", 0): run for run in row.get("runs", [row]) if run.get("status", "ok") == "ok"}


def add_reference_ratios(rows: list[dict], side: str) -> None:
    """Kit / reference ratios of tokens/s and peak memory for each kit row, against ``side``'s row of the same method.

    Each ratio divides two figures of the same round (kit and reference ran back to back); the row gets their
    median and range (``speed_vs_plain``, ``speed_vs_plain_min``, ``speed_vs_plain_max``; ``..._trl`` for TRL).
    Fixed shapes: the reference row run beside it. Variable lengths: plain's dynamic-padding row, TRL's padding-free
    row (what a user of each writes), so every kit batching mode is compared with the same reference.
    """
    references = {(row["method"], row["gradient_checkpointing"]): row for row in rows
                  if row.get("side") == side and row["status"] == "ok" and row.get("batching") in COMPARED_BATCHING[side]}
    for row in rows:
        reference = references.get((row["method"], row["gradient_checkpointing"]))
        if row.get("side") != "kit" or row["status"] != "ok" or reference is None:
            continue
        mine, theirs = _rounds_of(row), _rounds_of(reference)
        common = sorted(set(mine) & set(theirs))
        if not common:
            continue
        row[f"{side}_tokens_per_second"] = reference["tokens_per_second"]
        row[f"{side}_peak_bytes"] = measured_peak(reference)
        for figure, name in (("tokens_per_second", "speed"), ("tokens_per_cpu_second", "cpu_time_speed"), ("peak_bytes", "memory")):
            if all(mine[index].get(figure) and theirs[index].get(figure) for index in common):
                ratios = round_ratios([mine[index][figure] for index in common], [theirs[index][figure] for index in common])
                row[f"{name}_vs_{side}"] = ratios["ratio"]
                if name == "speed":
                    row[f"speed_vs_{side}_min"], row[f"speed_vs_{side}_max"] = ratios["ratio_min"], ratios["ratio_max"]
                    row[f"speed_vs_{side}_rounds"] = [mine[index][figure] / theirs[index][figure] for index in common]


def add_plain_ratios(rows: list[dict]) -> None:
    """Kit / plain ratios (median and range over rounds) of tokens/s and peak memory: :func:`add_reference_ratios`."""
    add_reference_ratios(rows, "plain")


def add_baseline(rows: list[dict], args) -> None:
    """Put committed reference figures (docs/benchmarks/reference-*.json) beside rows of the same size, method and batching.

    Only presets whose size the reference measured are compared; any other model gets no reference column.
    """
    baseline = json.loads(Path(args.compare_baseline).read_text(encoding="utf-8"))
    size = args.baseline_size or (None if args.model_path else REFERENCE_SIZES.get(args.preset))
    if size is None:
        return
    for row in rows:
        match = _baseline_match(baseline, row, size)
        if match is None or "error" in match:
            continue
        tokens = match.get("tok_s", match.get("real_tok_s"))
        row.update(baseline_peak_bytes=match["peak_gib"] * GIB if match.get("peak_gib") else None, baseline_tokens_per_second=tokens)
        if row.get("status") == "ok":
            row["memory_vs_baseline"] = measured_peak(row) / row["baseline_peak_bytes"] if row["baseline_peak_bytes"] else None
            row["speed_vs_baseline"] = row["tokens_per_second"] / tokens if tokens else None


def _baseline_match(baseline: list[dict], row: dict, size: str) -> dict | None:
    for entry in baseline:
        if entry.get("size") != size:
            continue
        if "mode" in entry:  # plain_hf_varlen.py: LoRA bf16 by batching mode
            if row["method"] == "lora_bf16" and entry["mode"] == REFERENCE_BATCHING.get(row.get("batching")):
                return entry
        elif entry.get("method") == REFERENCE_METHOD_NAMES.get(row["method"], row["method"]) and entry.get("grad_ckpt") == row["gradient_checkpointing"]:
            if row.get("batching") in (None, "kit default", "dynamic"):
                return entry
    return None


# ---------------------------------------------------------------- tables and files


CSV_FIELDS = [
    "run", "side", "method", "batching", "label", "gradient_checkpointing", "status", "precision", "trainable", "total", "trainable_percent",
    "peak_bytes", "reserved_bytes", "peak_above_start_bytes", "peak_kind", "estimate_bytes", "estimate_ratio",
    "step_seconds", "tokens_per_second", "real_tokens_per_step", "examples_per_step", "speed_vs_full", "mfu",
    "speed_vs_lora", "memory_vs_lora",
    "generation_seconds_per_step", "optimisation_seconds_per_step", "optimisation_tokens_per_second",
    "tokens_per_cpu_second", "plain_tokens_per_second", "plain_peak_bytes", "speed_vs_plain", "cpu_time_speed_vs_plain", "memory_vs_plain",
    "speed_vs_plain_min", "speed_vs_plain_max", "trl_tokens_per_second", "trl_peak_bytes", "speed_vs_trl", "speed_vs_trl_min",
    "speed_vs_trl_max", "cpu_time_speed_vs_trl", "memory_vs_trl", "trained_tokens_per_step", "repeats",
    "baseline_peak_bytes", "baseline_tokens_per_second", "memory_vs_baseline", "speed_vs_baseline",
    "loss_first", "loss_last", "process_seconds", "error",
]


def markdown_table(rows: list[dict]) -> str:
    """The performance table: run, trainable parameters, peak memory, real tokens/s, ratios (vs full, vs plain, vs reference)."""
    with_plain = any("speed_vs_plain" in row for row in rows)
    with_trl = any("speed_vs_trl" in row for row in rows)
    with_baseline = any("baseline_tokens_per_second" in row for row in rows)
    with_variants = any("speed_vs_lora" in row for row in rows)
    with_generation = any("generation_seconds_per_step" in row for row in rows)  # GRPO: sampling, then the step
    header = ["run", "runs in", "trainable params", "peak memory (GiB)", "estimate (GiB)", "estimate / measured",
              "real tokens/s", "examples/step", "speed vs full FT", "MFU"]
    header += ["tokens/s vs LoRA", "peak vs LoRA"] if with_variants else []
    header += ["generation s/step", "optimisation s/step", "optimisation tokens/s"] if with_generation else []
    header += ["kit / plain tokens/s", "kit / plain peak"] if with_plain else []
    header += ["kit / TRL tokens/s", "kit / TRL peak", "trained tokens/step"] if with_trl else []
    header += ["reference peak (GiB)", "reference tokens/s", "speed vs reference"] if with_baseline else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ok = row["status"] == "ok"
        cells = [
            row["run"] + ("" if ok else f" ({row['status']})"),
            row.get("precision", ""),
            f"{row['trainable']:,} ({row['trainable_percent']:.3f}%)" if ok else "",
            _gib(measured_peak(row)) if ok else row["status"],
            _gib(row["estimate_bytes"]),
            estimate_ratio_cell(row),
            _number(row.get("tokens_per_second"), "{:,.0f}"),
            _number(row.get("examples_per_step"), "{:.1f}"),
            _number(row.get("speed_vs_full"), "{:.2f}x"),
            _number(row.get("mfu"), "{:.1%}"),
        ]
        if with_variants:
            cells += [_number(row.get("speed_vs_lora"), "{:.2f}x"), _number(row.get("memory_vs_lora"), "{:.2f}x")]
        if with_generation:
            cells += [_number(row.get("generation_seconds_per_step"), "{:.3f}"),
                      _number(row.get("optimisation_seconds_per_step"), "{:.3f}"),
                      _number(row.get("optimisation_tokens_per_second"), "{:,.0f}")]
        if with_plain:
            cells += [_ratio(row, "plain"), _number(row.get("memory_vs_plain"), "{:.2f}x")]
        if with_trl:
            cells += [_ratio(row, "trl"), _number(row.get("memory_vs_trl"), "{:.2f}x"),
                      _number(row.get("trained_tokens_per_step"), "{:,.0f}")]
        if with_baseline:
            cells += [_gib(row.get("baseline_peak_bytes")), _number(row.get("baseline_tokens_per_second"), "{:,.0f}"),
                      _number(row.get("speed_vs_baseline"), "{:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(row: dict, side: str) -> str:
    """``**1.23x** (1.10-1.31)``: the kit / reference median ratio, and its range when several rounds were run."""
    ratio = row.get(f"speed_vs_{side}")
    if ratio is None:
        return ""
    if len(row.get(f"speed_vs_{side}_rounds", [])) < 2:
        return f"**{ratio:.2f}x**"
    return f"**{ratio:.2f}x** ({row[f'speed_vs_{side}_min']:.2f}-{row[f'speed_vs_{side}_max']:.2f})"


def estimate_ratio_cell(row: dict) -> str:
    """The estimate / measured ratio, with what it divides when that is not the peak column beside it (on a CPU the
    peak RSS above what the process held at the start), so the ratio can be checked from the table."""
    ratio, basis = row.get("estimate_ratio"), row.get("estimate_measured_bytes")
    if ratio is None:
        return ""
    if basis and basis != measured_peak(row):
        return f"{ratio:.2f} ({row['estimate_bytes'] / MIB:,.0f} / {basis / MIB:,.0f} MiB above start)"
    return f"{ratio:.2f}"


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if value else ""


def _number(value, pattern: str) -> str:
    return pattern.format(value) if value is not None else ""


def results_markdown(result) -> str:
    """results.md: what ran, on what, the table, and how to read it."""
    env, settings = result.environment, result.settings
    cpu = env["device"] != "cuda"
    lines = [
        f"# Benchmark: {settings['model_path'] or settings['preset']} on {env['device_name']}",
        "",
        f"{'Several parts, each listed under Parts below (the first: ' + workload(settings) + ')' if settings.get('parts') else workload(settings)}; {settings['steps']} timed Trainer steps after {settings['warmup_steps']} warm-up steps; "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, trl {env.get('trl')}, bitsandbytes {env['bitsandbytes']}.",
        f"Command: `{settings.get('command', 'python -m qwen_helpers.benchmark')}`",
        "",
        markdown_table(result.rows),
        "",
        f"- {WEIGHTS_NOTE}",
        "- Every kit row runs `train.train` (the training commands' path: the kit's collator, batching and Trainer); every "
        "'(plain)' row runs `AutoModelForCausalLM` + peft + `Trainer` + `DataCollatorForSeq2Seq`, and every '(TRL)' row TRL's "
        "`SFTTrainer` + `SFTConfig` with the same model loading and peft config (`padding_free=True`, `completion_only_loss` on "
        "prompt/completion records: TRL trains the answer and the eos it appends, the kit's tokens, as trained tokens/step "
        "shows), each in its own process beside the kit row it pairs with.",
        "- DPO and GRPO rows run the kit's `train_dpo` / `train_grpo` (TRL's DPOTrainer / GRPOTrainer on LoRA; the reference "
        "is the same weights with the adapter off). A DPO step trains --batch_size pairs (2 x --batch_size sequences); a GRPO "
        "step samples --batch_size completions (generation s/step) and then trains on them (optimisation s/step).",
        "- Peak memory: " + ("peak RSS of the process during training (loading excluded by resetting VmHWM); estimate / measured "
                             "compares with the peak above the RSS before loading." if cpu
                             else "`torch.cuda.max_memory_allocated` during training (reset after loading); reserved memory is in results.csv."),
        "- real tokens/s counts non-pad tokens over whole Trainer steps (data, copy, forward, backward, optimiser, logging), "
        "device synchronised, warm-up excluded. MFU counts model FLOPs with causal attention against the card's dense bf16 rate.",
        f"- CPU allocator tuning (glibc mallopt): {'on for every side' if settings.get('cpu_allocator_tuning') else 'off for every side'}.",
    ]
    rounds = max((row.get("repeats", 1) for row in result.rows), default=1)
    if rounds > 1:
        lines.append(f"- Up to {rounds} interleaved rounds per row (kit and references back to back, the order rotating each "
                     "round): a row shows the median of its rounds; a kit / reference ratio is the median of the per-round "
                     "ratios, with their range in brackets. Each round's figures are in results.json (`runs`).")
    if cpu:
        lines.append(f"- {CPU_NOTE} The memory estimate targets CUDA and is shown here for reference only.")
    return "\n".join(lines) + "\n"


def workload(settings: dict) -> str:
    """One phrase for the workload: tokens per step and which data."""
    if settings["data"] == "synthetic":
        return f"{settings['batch_size']} x {settings['seq_len']} tokens per step (examples of exactly {settings['seq_len']} tokens)"
    data = f"log-normal lengths (mean {settings['mean_length']}, seed {settings['data_seed']})" if settings["data"] == "lognormal" else settings["data"]
    return f"{settings['batch_size']} examples per step (token_budget row: {settings.get('token_budget_used')} tokens), up to {settings['seq_len']} tokens each, {data}"


def write_results(result) -> None:
    """results.json, results.csv, results.md and the memory and throughput bar charts."""
    from ..common.files import save_figure
    from ..notebook.plots import plot_bars, plot_grouped_bars

    folder = result.folder
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"settings": result.settings, "environment": result.environment, "estimates": result.estimates, "rows": result.rows}
    (folder / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    with open(folder / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    (folder / "results.md").write_text(results_markdown(result), encoding="utf-8")
    ok = [row for row in result.rows if row["status"] == "ok"]
    if not ok:
        return
    measured = {row["run"]: measured_peak(row) / GIB for row in ok}
    memory = {"measured": measured, "estimate": {row["run"]: row["estimate_bytes"] / GIB for row in ok if row["estimate_bytes"] is not None}}
    save_figure(plot_grouped_bars(memory, "peak memory (GiB)", "Peak memory per run"), folder / "memory.png")
    throughput = {row["run"]: row["tokens_per_second"] for row in ok}
    save_figure(plot_bars(throughput, "real tokens / s", "Training throughput per run"), folder / "throughput.png")

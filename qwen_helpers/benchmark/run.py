"""Run a benchmark: check the options, plan the rows, run each in its own process (kit and references interleaved), report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict

from .estimate import GIB, RUNS, peak_flops
from .plan import (
    BenchmarkArguments,
    BenchmarkResult,
    default_token_budget,
    plan_estimates,
    plan_rows,
    prepare_data,
    result_folder,
    row_spec,
    run_order,
)
from .report import (
    CPU_NOTE,
    WEIGHTS_NOTE,
    add_baseline,
    add_reference_ratios,
    add_speed_relative_to_full,
    add_speed_relative_to_lora,
    finish_row,
    measured_peak,
    merge_rounds,
    write_results,
)
from .worker import run_in_subprocess, worker_env

def environment_info() -> dict:
    """Device and library versions, recorded with the results."""
    import importlib.metadata

    from ..models.loading import device_type

    versions = {}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "liger-kernel"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = device_type()
    info = {"device": device, "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(), **versions}
    if device == "cuda":
        info.update(_probe_gpu())
        info["peak_flops"] = peak_flops(info["device_name"])
    else:
        import psutil

        info.update(device_name=platform.processor() or "cpu", device_memory_bytes=psutil.virtual_memory().total, peak_flops=None)
    return info


def _probe_gpu() -> dict:
    """The GPU's name, memory and bf16 support, asked in a child process so this one never holds a CUDA context."""
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'device_name': p.name, "
            "'device_memory_bytes': p.total_memory, 'cuda': torch.version.cuda, 'bf16_supported': torch.cuda.is_bf16_supported()}))")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(process.stdout.strip().splitlines()[-1])


def model_config_and_path(args: BenchmarkArguments, device: str):
    """The model's config and a loadable folder: a real checkpoint, or a preset built once with random weights."""
    from transformers import AutoConfig

    from ..common.presets import check_preset_fits_device, preset_config
    from ..common.tiny import TINY_ALIASES, resolve_model_path

    if args.model_path:
        path = resolve_model_path(args.model_path)
        return AutoConfig.from_pretrained(path), path
    check_preset_fits_device(args.preset, device)
    config = preset_config(args.preset)
    if args.preset in TINY_ALIASES:  # cached on disk already, built on a CPU in a second
        return config, resolve_model_path(args.preset)
    code = f"from qwen_helpers.common.presets import preset_checkpoint; print(preset_checkpoint({args.preset!r}, {device!r}))"
    # Built in its own process, so this one never holds a CUDA context or the random weights
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env())
    if process.returncode != 0:
        raise RuntimeError(f"--preset {args.preset}: building the random checkpoint failed:\n{process.stderr[-2000:]}")
    return config, process.stdout.strip().splitlines()[-1]


def check_options(args: BenchmarkArguments, device: str) -> None:
    """Refuse GPU-only options on a CPU and a missing optional dependency, with what to do instead."""
    import importlib.util

    if args.use_liger_kernel:
        if device != "cuda":
            raise ValueError("--use_liger_kernel needs a CUDA GPU: Liger's kernels are written in Triton. Leave it off on a CPU.")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("--use_liger_kernel: liger-kernel is not installed. Install it with `pip install liger-kernel` (or `pip install -e .[liger]`).")
    if args.torch_compile and device != "cuda":
        raise ValueError("--torch_compile is GPU-only in this benchmark: on a CPU compiling takes longer than the run it would speed up.")



def run_benchmark(args: BenchmarkArguments, echo=print, command: str | None = None) -> BenchmarkResult:
    """Estimate, then run every row in its own process (each kit row beside its references, in interleaved rounds), then
    write the files."""
    from ..models.loading import device_type

    from ..common.files import check_not_an_input

    device = device_type()
    check_options(args, device)
    folder = result_folder(args)
    data_file = args.data if args.variable_length and args.data != "lognormal" else None
    inputs = {"--model_path": args.model_path, "--data": data_file}
    check_not_an_input(folder, "--folder" if args.folder else "--output_dir", inputs, example="outputs/benchmark")
    config, model_path = model_config_and_path(args, device)
    environment = environment_info()
    folder.mkdir(parents=True, exist_ok=True)
    data_path, lengths = prepare_data(args, model_path, folder)
    budget = default_token_budget(args, lengths)
    planned = plan_rows(args, lengths)
    bf16 = environment.get("bf16_supported", False)
    estimates = plan_estimates(args, config, planned, device, bf16, lengths)
    echo(WEIGHTS_NOTE + ("\n" + CPU_NOTE if device != "cuda" else ""))
    echo(f"data: {data_path}: {len(lengths)} examples, mean {sum(lengths) / len(lengths):.0f} tokens, longest {max(lengths)}")
    echo(f"Memory estimate before training ({args.model_name}):\n" + _estimate_summary(planned, estimates))
    runs = [[] for _ in planned]
    for index, round_index in run_order(planned, args.repeats):
        row, estimate = planned[index], estimates[index]
        spec = row_spec(row, args, model_path, data_path, device, bf16, budget)
        skip = skip_reason(row, estimate, device)
        echo(f"running {_name(row)}{f' (round {round_index + 1} of {args.repeats})' if args.repeats > 1 else ''} ...")
        measured = {"status": "skipped", "error": skip} if skip else run_in_subprocess(spec, args.timeout)
        runs[index].append(finish_row({**measured, "round": round_index}, row, estimate, config, environment, lengths,
                                      args.num_virtual_tokens))
        echo(f"  {runs[index][-1]['run']}: {status_line(runs[index][-1])}")
    rows = [merge_rounds(row_runs) for row_runs in runs]
    add_speed_relative_to_full(rows)
    add_speed_relative_to_lora(rows)
    for side in ("plain", "trl"):
        add_reference_ratios(rows, side)
    if args.compare_baseline:
        add_baseline(rows, args)
    settings = {**asdict(args), "model_path_resolved": model_path, "data_path_resolved": data_path, "device": device,
                "token_budget_used": budget, "note": WEIGHTS_NOTE, "command": command or "run_benchmark(...)"}
    result = BenchmarkResult(rows, folder, settings, environment, estimates)
    write_results(result)
    echo(f"results: {folder}/results.md, results.json, results.csv, memory.png, throughput.png")
    return result


def _name(row: dict) -> str:
    from .report import row_name

    return row_name(row)


def _estimate_summary(planned: list[dict], estimates: list[dict]) -> str:
    if estimates and estimates[0].get("unmodelled"):
        return f"  none: {estimates[0]['unmodelled']}"
    return "\n".join(f"  {_name(row)}: {estimate['total_bytes'] / GIB:.2f} GiB" for row, estimate in zip(planned, estimates))


def skip_reason(row: dict, estimate: dict, device: str) -> str | None:
    """Why a row should not start: a combination that cannot work, or on a CPU, more memory than is free."""
    if RUNS[row["method"]].method.prepends_virtual_tokens and row["batching"] in ("padding_free",):
        return "prompt tuning prepends virtual tokens to every row, which padding-free batches cannot express."
    if device == "cuda":
        return None  # a GPU out-of-memory error is caught and becomes an OOM row
    import psutil

    available = psutil.virtual_memory().available
    if estimate["total_bytes"] > 0.8 * available:
        return (f"estimated {estimate['total_bytes'] / GIB:.1f} GiB but only {available / GIB:.1f} GiB of RAM is free: "
                "lower --seq_len or --batch_size, or run on a GPU.")
    return None


def status_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {str(row.get('error', ''))[:300]}"
    line = f"peak {measured_peak(row) / GIB:.2f} GiB, {row['tokens_per_second']:,.0f} real tokens/s"
    if row.get("examples_per_step"):
        line += f", {row['examples_per_step']:.1f} examples/step"
    if row.get("generation_seconds_per_step") is not None:
        line += (f", generation {row['generation_seconds_per_step']:.3f} s/step + optimisation "
                 f"{row['optimisation_seconds_per_step']:.3f} s/step")
    return line + f", {row['precision']}"

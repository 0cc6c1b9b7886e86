"""The GPU check in one command: the 7B-shape table, kit vs plain and TRL ratios, variable-length batching, batch-1 decode.

    python -m qwen_helpers.benchmark.suite --folder docs/benchmarks/2026-12-01-H200     # CUDA: real shapes
    python -m qwen_helpers.benchmark.suite --folder /tmp/check --device cpu             # CPU: the same steps on the tiny model

scripts/gpu_check.sh calls this. Each part is one ``run_benchmark`` (rows in their own processes);
the parts' rows are merged into one results.json/csv/md with charts, and decode speed (LoRA unmerged
vs merged, batch 1, greedy) goes beside them in decode.json. The CPU variant runs the same code on
the tiny model in a few minutes, so the script cannot rot; its figures are CPU figures.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.errors import command_boundary
from ..run.quickflags import dataclass_parser, parse_command_flags

REFERENCE = "docs/benchmarks/reference-h200-2026-11-28"


def gpu_parts(folder: Path, repeats: int) -> list[tuple[str, dict]]:
    """The parts, first sized for under 8 minutes on one H200 (about 10 processes load the 7B shape; few timed steps
    each); the TRL rows add 2 processes of the 7B shape and 3 x ``repeats`` - 2 of the 0.5B one. Not yet run on a GPU."""
    common = dict(steps=5, warmup_steps=2, seq_len=512, batch_size=8, timeout=240)
    table = f"{REFERENCE}/plain_hf_h200_2026-11-28.json"
    return [
        ("0.5B: full FT (the 1x row), kit vs plain", dict(common, preset="qwen2.5-0.5b", methods="full", checkpointing="off",
                                                        compare="plain", compare_baseline=table)),
        (f"0.5B: LoRA, kit vs plain vs TRL, {repeats} interleaved rounds", dict(
            common, preset="qwen2.5-0.5b", methods="lora_bf16", checkpointing="off", compare="plain,trl", repeats=repeats,
            compare_baseline=table)),
        ("7B: LoRA bf16 with and without checkpointing, kit vs plain vs TRL", dict(
            common, preset="qwen2.5-7b", methods="lora_bf16", checkpointing="both", compare="plain,trl", compare_baseline=table)),
        ("7B: QLoRA NF4 with checkpointing, kit vs plain", dict(common, preset="qwen2.5-7b", methods="qlora_nf4", checkpointing="on",
                                                                 compare="plain", compare_baseline=table)),
        ("7B: LoRA fp16 and prompt tuning", dict(common, preset="qwen2.5-7b", methods="lora_fp16,prompt_tuning", checkpointing="off",
                                                compare_baseline=table)),
        ("0.5B: variable-length data, batching modes", dict(common, preset="qwen2.5-0.5b", methods="lora_bf16", checkpointing="off",
                                                            data="lognormal", mean_length=240, seq_len=1024, steps=8,
                                                            compare_baseline=f"{REFERENCE}/plain_hf_varlen_h200_2026-11-28.json")),
        # TRL's trainers on the 7B shape: 8 pairs (16 sequences) per DPO step, 8 completions (2 prompts x 4) per GRPO
        # step generated to 256 tokens in all; GRPO's generation is timed apart from its optimisation step
        ("7B: DPO and GRPO on LoRA bf16 with checkpointing", dict(common, preset="qwen2.5-7b", methods="trl", checkpointing="on",
                                                                 seq_len=256, steps=3, warmup_steps=1)),
    ]


def cpu_parts(folder: Path, repeats: int) -> list[tuple[str, dict]]:
    """The same kinds of part on the tiny model, few and short, for CI."""
    common = dict(preset="tiny", steps=2, warmup_steps=1, seq_len=32, batch_size=2, timeout=600)
    return [
        (f"tiny: LoRA, kit vs plain vs TRL, {repeats} interleaved rounds", dict(
            common, methods="lora_bf16", checkpointing="off", compare="plain,trl", repeats=repeats)),
        ("tiny: variable-length data, dynamic vs padding-free", dict(common, methods="lora_bf16", checkpointing="off", data="lognormal",
                                                                     mean_length=24, seq_len=64, batching="dynamic,padding_free")),
    ]


@dataclass
class SuiteArguments:
    """Where the check writes, and on which device's plan."""

    folder: str = field(default="", metadata={"help": "Output folder (default: docs/benchmarks/<date>-<gpu> on CUDA, outputs/gpu_check_cpu on a CPU)."})
    device: str = field(default="auto", metadata={"help": "auto, cuda or cpu: which plan to run (cpu = the tiny CI variant)."})
    decode_tokens: int = field(default=128, metadata={"help": "New tokens per decode measurement (CPU variant: 8)."})
    repeats: int = field(default=3, metadata={
        "help": "Interleaved rounds of the LoRA kit vs plain vs TRL part (each round runs the three in a rotating order, "
                "each in a fresh process; medians, and ratios with their range). 1: one run each."})

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, got {self.repeats}.")


def default_folder(device: str) -> Path:
    if device != "cuda":
        return Path("outputs/gpu_check_cpu")
    import torch

    name = torch.cuda.get_device_name(0).replace("NVIDIA ", "").split()[0]
    return Path("docs/benchmarks") / f"{time.strftime('%Y-%m-%d')}-{name}"


def measure_decode(model_path: str, prompt_tokens: int, new_tokens: int, lora_r: int = 8) -> list[dict]:
    """Batch-1 greedy decode, new tokens/s, with a LoRA adapter unmerged and then merged into the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models.loading import device_type, load_base_model, synchronize

    device = device_type()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_base_model(model_path, dtype)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)).eval()
    prompt = torch.randint(0, 150000, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(model.device)
    rows = []
    for name in ("LoRA unmerged", "LoRA merged"):
        if name == "LoRA merged":
            model = model.merge_and_unload()
        times = []
        for _ in range(3):  # the first is the warm-up
            synchronize()
            started = time.perf_counter()
            with torch.no_grad():
                output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, do_sample=False)
            synchronize()
            times.append(time.perf_counter() - started)
            assert output.shape[1] == prompt_tokens + new_tokens
        seconds = sorted(times[1:])[len(times[1:]) // 2]
        rows.append({"model": name, "batch": 1, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "new_tokens_per_second": new_tokens / seconds})
    return rows


def run_suite(args: SuiteArguments, echo=print) -> Path:
    """Run every part, merge their rows into one results folder, add the decode figures, print the table."""
    from ..models.loading import device_type
    from .plan import BenchmarkArguments, BenchmarkResult
    from .report import add_speed_relative_to_full, markdown_table, write_results
    from ..common.files import check_not_an_input
    from .run import run_benchmark

    device = device_type() if args.device == "auto" else args.device
    if device == "cuda" and device_type() != "cuda":
        raise ValueError("--device cuda: no CUDA GPU is visible here; run the CPU variant with --device cpu.")
    folder = Path(args.folder) if args.folder else default_folder(device)
    check_not_an_input(folder, "--folder", {}, example="outputs/gpu_check_cpu")  # nor the working folder, nor above it
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, parts, results = [], [], []
    for title, settings in (gpu_parts if device == "cuda" else cpu_parts)(folder, args.repeats):
        echo(f"== {title}")
        part = BenchmarkArguments(**settings, folder=str(folder / f"part{len(parts) + 1}"))
        result = run_benchmark(part, echo=echo, command=_command(part))
        rows += [dict(row, part=title, run=f"{part.model_name} {row['run']}") for row in result.rows]  # names stay unique across parts
        parts.append({"title": title, "command": _command(part), "folder": str(result.folder)})
        results.append(result)
    add_speed_relative_to_full(rows)  # against the 0.5B full fine-tuning row on a GPU
    echo("== batch-1 decode, LoRA unmerged vs merged")
    decode_path = results[0].settings["model_path_resolved"] if device != "cuda" else _checkpoint_of(results, "qwen2.5-7b")
    decode = measure_decode(decode_path, 256 if device == "cuda" else 16, args.decode_tokens if device == "cuda" else 8)
    merged = BenchmarkResult(rows, folder, {**results[0].settings, "parts": parts, "command": "scripts/gpu_check.sh"},
                             results[0].environment, [estimate for result in results for estimate in result.estimates])
    write_results(merged)
    (folder / "decode.json").write_text(json.dumps(decode, indent=2), encoding="utf-8")
    table = markdown_table(rows)
    decode_table = "\n".join(["| decode (batch 1) | new tokens/s |", "|---|---|"] +
                             [f"| {row['model']} | {row['new_tokens_per_second']:,.1f} |" for row in decode])
    with open(folder / "results.md", "a", encoding="utf-8") as handle:
        handle.write("\n## Parts\n\n" + "\n".join(f"- {part['title']}: `{part['command']}`" for part in parts))
        handle.write(f"\n\n## Decode\n\n{decode_table}\n\nWhole check: {time.perf_counter() - started:.0f} s.\n")
    echo(table + "\n\n" + decode_table)
    echo(f"written to {folder}/ in {time.perf_counter() - started:.0f} s")
    return folder


def _checkpoint_of(results, preset: str) -> str:
    for result in results:
        if result.settings["preset"] == preset:
            return result.settings["model_path_resolved"]
    return results[0].settings["model_path_resolved"]


def _command(args) -> str:
    defaults = type(args)()
    flags = [f"--{key} {shlex.quote(str(value))}" for key, value in asdict(args).items()
             if value != getattr(defaults, key) and key not in ("folder", "timeout")]
    return "python -m qwen_helpers.benchmark " + " ".join(flags)


@command_boundary
def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command_flags("benchmark.suite", lambda: dataclass_parser(SuiteArguments), argv)
    folder = run_suite(args)
    rows = json.loads((folder / "results.json").read_text(encoding="utf-8"))["rows"]
    failed = [f"{row.get('method')} ({row.get('side', 'kit')}): {row.get('status')}" for row in rows if row.get("status") != "ok"]
    if failed:  # a check with a failed row is a failed check, whatever the table shows
        print(f"error: {len(failed)} of {len(rows)} rows did not complete: {'; '.join(failed)}. Each row's error is in "
              f"{folder}/results.json.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

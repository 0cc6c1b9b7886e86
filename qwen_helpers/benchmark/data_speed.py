"""Tokenising a large data file: the kit's ``load_dataset_for_training`` beside a plain ``datasets`` map, records/s and peak RSS.

    python -m qwen_helpers.benchmark.data_speed                                   # 40 MB of generated JSONL, 3 runs a side
    python -m qwen_helpers.benchmark.data_speed --size_mb 40 --output_dir docs/benchmarks/<date>-cpu-data-streaming

The file is generated (seeded, English and Chinese, alpaca or messages records). The plain side is what
a user writes without the kit: ``load_dataset("json")`` then a batched ``map`` calling
``tokenizer.apply_chat_template(..., tokenize=True)``, the same chat-template rendering without label
masks. Kit and plain runs alternate, each in a fresh process with a fresh, empty datasets cache (no
cache hit can flatter either), and each reports its wall and CPU time and its own peak RSS. On a shared
machine the load drifts, so the ratios are medians over back-to-back (kit, plain) pairs.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..common.errors import command_boundary
from ..run.quickflags import dataclass_parser, parse_command_flags
from .worker import worker_env

ENGLISH = ("the model learns to answer short questions about travel food history science and daily life in clear simple "
           "sentences while the training data mixes instructions inputs and outputs of many lengths").split()
CHINESE = ("今天 天气 很好 我们 去 公园 散步 学习 机器 翻译 模型 训练 数据 问题 答案 北京 上海 杭州 西湖 历史 文化 "
           "科学 生活 简单 清楚 句子 回答 用户 助手 推荐 地方 时间 方法").split()


@dataclass
class DataSpeedArguments:
    """What to generate, how often to run each side, and where to write the results."""

    model_path: str = field(default="tiny", metadata={"help": "Tokenizer and chat template (tiny: the real Qwen2.5 tokenizer)."})
    size_mb: float = field(default=40.0, metadata={"help": "Size of the generated JSONL file in MB."})
    data_format: Literal["alpaca", "messages"] = field(default="alpaca", metadata={"help": "Record format of the generated file."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated records."})
    repeats: int = field(default=3, metadata={"help": "Runs per side (alternating kit, plain, plain, kit, ...); medians are reported."})
    max_length: int = field(default=2048, metadata={"help": "The kit's --max_length (the generated records all fit)."})
    output_dir: str = field(default="", metadata={"help": "Write results.json and results.md here (a new or empty folder); none: print only."})
    timeout: int = field(default=3600, metadata={"help": "Seconds one run may take."})


def _text(generator: random.Random, words: int) -> str:
    if generator.random() < 0.5:
        return "".join(generator.choice(CHINESE) for _ in range(words)) + "。"
    return " ".join(generator.choice(ENGLISH) for _ in range(words)).capitalize() + "."


def generate_jsonl(path: Path, size_mb: float, data_format: str, seed: int) -> int:
    """Write seeded bilingual records (log-normal lengths, about 0.8 KB each) until the file reaches ``size_mb``; return their count."""
    generator, written, count = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < size_mb * 1e6:
            words = lambda mean: max(1, round(generator.lognormvariate(0, 0.6) * mean))  # noqa: E731
            instruction, context, answer = _text(generator, words(12)), _text(generator, words(30)) if generator.random() < 0.6 else "", _text(generator, words(60))
            if data_format == "alpaca":
                record = {"instruction": instruction, "input": context, "output": answer}
            else:
                record = {"messages": [{"role": "user", "content": f"{instruction}\n{context}".strip()}, {"role": "assistant", "content": answer}]}
            line = json.dumps(record, ensure_ascii=False) + "\n"
            handle.write(line)
            written += len(line.encode("utf-8"))
            count += 1
    return count


def run_side(side: str, model_path: str, data_path: str, cache_dir: str, max_length: int) -> dict:
    """One timed run in this process (a worker): tokenise ``data_path`` the kit's way or the plain way."""
    import resource

    if side == "kit":
        from ..data.loading import load_dataset_for_training
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        rss_before, cpu_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _cpu_seconds()
        started = time.perf_counter()
        dataset = load_dataset_for_training(tokenizer, data_path, max_length, cache_dir=cache_dir, echo=lambda line: None).dataset
    else:
        from datasets import load_dataset
        from transformers import AutoTokenizer

        from ..common.tiny import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path))
        rss_before, cpu_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _cpu_seconds()
        started = time.perf_counter()
        dataset = load_dataset("json", data_files=data_path, split="train", cache_dir=cache_dir)
        dataset = dataset.map(_plain_batch, batched=True, fn_kwargs={"tokenizer": tokenizer}, remove_columns=dataset.column_names)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the token count below reads the whole result
    return {"side": side, "seconds": seconds, "records": len(dataset), "records_per_second": len(dataset) / seconds,
            "cpu_seconds": cpu_seconds, "records_per_cpu_second": len(dataset) / cpu_seconds,
            "tokens": sum(len(ids) for ids in dataset["input_ids"]), "rss_before_bytes": rss_before, "peak_rss_bytes": peak,
            "arrow_backed": bool(dataset.cache_files)}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (the tokenizer's included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _plain_batch(batch: dict, tokenizer) -> dict:
    """The plain reference: the records as chat messages, rendered and tokenised by the chat template in one call."""
    if "messages" in batch:
        conversations = batch["messages"]
    else:
        conversations = [[{"role": "user", "content": f"{instruction}\n{context}" if context else instruction}, {"role": "assistant", "content": output}]
                         for instruction, context, output in zip(batch["instruction"], batch["input"], batch["output"])]
    encoded = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _run_in_subprocess(side: str, args: DataSpeedArguments, data_path: Path, scratch: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"cache-{side}-", dir=scratch) as cache_dir:  # a fresh datasets cache every run
        command = [sys.executable, "-m", "qwen_helpers.benchmark.data_speed", "--_side", side, args.model_path, str(data_path), cache_dir,
                   str(args.max_length)]
        process = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env={**worker_env(), "HF_HUB_OFFLINE": "1"})
    if process.returncode != 0:
        raise RuntimeError(f"the {side} run failed (exit code {process.returncode}): {process.stderr[-2000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict:
    """Medians per side, and the kit / plain ratios as medians over the pairs of back-to-back runs (which share the machine's load)."""
    sides = {}
    for side in ("kit", "plain"):
        mine = [run for run in runs if run["side"] == side]
        keys = ("seconds", "records_per_second", "cpu_seconds", "records_per_cpu_second", "peak_rss_bytes", "rss_before_bytes")
        sides[side] = {key: statistics.median(run[key] for run in mine) for key in keys}
        sides[side].update(records=mine[0]["records"], tokens=mine[0]["tokens"], arrow_backed=all(run["arrow_backed"] for run in mine))
    pairs = [{run["side"]: run for run in runs[start:start + 2]} for start in range(0, len(runs) - 1, 2)]
    for name, key in (("speed", "records_per_second"), ("cpu_speed", "records_per_cpu_second"), ("peak_rss", "peak_rss_bytes")):
        sides[f"kit_over_plain_{name}"] = statistics.median(pair["kit"][key] / pair["plain"][key] for pair in pairs)
    sides["kit_over_plain_speed_per_pair"] = [pair["kit"]["records_per_second"] / pair["plain"]["records_per_second"] for pair in pairs]
    return sides


def markdown(settings: dict, summary: dict, runs: list[dict]) -> str:
    gib = 1024**3
    lines = [f"# Tokenising {settings['size_mb']:g} MB of JSONL: kit vs plain datasets map", "",
             f"{settings['records']:,} {settings['data_format']} records (seed {settings['seed']}), tokenizer `{settings['model_path']}`; "
             f"{settings['repeats']} runs a side, alternating, each in a fresh process with an empty datasets cache; medians.",
             f"Command: `{settings['command']}`", f"Machine: {settings['environment']}", "",
             "| side | records/s | wall s | records per CPU-second | CPU s | peak RSS (GiB) | RSS before tokenising (GiB) | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for side in ("kit", "plain"):
        row = summary[side]
        lines.append(f"| {side} | {row['records_per_second']:,.0f} | {row['seconds']:.1f} | {row['records_per_cpu_second']:,.0f} | "
                     f"{row['cpu_seconds']:.1f} | {row['peak_rss_bytes'] / gib:.2f} | {row['rss_before_bytes'] / gib:.2f} | {row['tokens']:,} |")
    per_pair = ", ".join(f"{ratio:.2f}" for ratio in summary["kit_over_plain_speed_per_pair"])
    lines += ["", f"kit / plain, median over back-to-back pairs: records/s **{summary['kit_over_plain_speed']:.2f}x** (pairs: {per_pair}), "
              f"records per CPU-second **{summary['kit_over_plain_cpu_speed']:.2f}x**, peak RSS {summary['kit_over_plain_peak_rss']:.2f}x", "",
              "Every run, in order: " + ", ".join(f"{run['side']} {run['records_per_second']:,.0f}/s {run['peak_rss_bytes'] / gib:.2f} GiB" for run in runs), "",
              "- kit: `data_files.load_dataset_for_training` (validation pass, then a batched map writing input_ids, attention_mask and "
              "assistant-only labels), what `train_lora` runs. plain: `load_dataset(\"json\")` + batched `map` with "
              "`apply_chat_template(tokenize=True)`, no labels.",
              "- wall s: the data call only (tokenizer loading and imports excluded); peak RSS: the process's peak (ru_maxrss) at the end of "
              "the data call, imports and the tokenizer included, and so are the pages of the memory-mapped Arrow files it read "
              "(file-backed: the kernel can drop them)."]
    return "\n".join(lines) + "\n"


def run_data_benchmark(args: DataSpeedArguments, command: str, echo=print) -> dict:
    """Generate the file, run kit and plain alternately, return (and with --output_dir write) the results."""
    import os
    import platform

    from ..common.files import check_output_folder

    if args.output_dir:
        check_output_folder(args.output_dir, "--output_dir", inputs={"--model_path": args.model_path},
                            example="outputs/data_speed")
    with tempfile.TemporaryDirectory(prefix="qwen-data-benchmark-") as scratch:
        data_path = Path(scratch) / f"generated-{args.data_format}.jsonl"
        records = generate_jsonl(data_path, args.size_mb, args.data_format, args.seed)
        echo(f"generated {records:,} records ({data_path.stat().st_size / 1e6:.1f} MB) in {data_path}")
        runs = []
        for repeat in range(args.repeats):
            for side in (("kit", "plain") if repeat % 2 == 0 else ("plain", "kit")):
                runs.append(_run_in_subprocess(side, args, data_path, Path(scratch)))
                echo(f"{side}: {runs[-1]['records_per_second']:,.0f} records/s, {runs[-1]['seconds']:.1f} s, peak RSS {runs[-1]['peak_rss_bytes'] / 1024**3:.2f} GiB")
    environment = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, " + ", ".join(
        f"{name} {_version(name)}" for name in ("datasets", "transformers", "tokenizers", "pyarrow"))
    settings = {**asdict(args), "records": records, "command": command, "environment": environment, "date": time.strftime("%Y-%m-%d")}
    summary = summarise(runs)
    result = {"settings": settings, "summary": summary, "runs": runs}
    if args.output_dir:
        folder = Path(args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        (folder / "results.md").write_text(markdown(settings, summary, runs), encoding="utf-8")
    echo(markdown(settings, summary, runs))
    return result


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


@command_boundary
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_side"]:  # a worker: one run, its figures as the last line of stdout
        side, model_path, data_path, cache_dir, max_length = argv[1:6]
        print(json.dumps(run_side(side, model_path, data_path, cache_dir, int(max_length))))
        return 0
    (args,) = parse_command_flags("benchmark.data_speed", lambda: dataclass_parser(DataSpeedArguments), argv)
    run_data_benchmark(args, shlex.join(["python", "-m", "qwen_helpers.benchmark.data_speed", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m qwen_helpers.benchmark``: parse the flags, run the benchmark, print the table.

    python -m qwen_helpers.benchmark --preset tiny --compare plain                     # CPU: kit vs plain Trainer
    python -m qwen_helpers.benchmark --methods lora_bf16 --compare plain,trl --repeats 3  # kit vs plain vs TRL's SFTTrainer
    python -m qwen_helpers.benchmark --data data/train.json --seq_len 512 --batch_size 8  # batching modes
    python -m qwen_helpers.benchmark --preset qwen2.5-7b --methods all --compare plain   # GPU
"""

from __future__ import annotations

import shlex
import sys

from ..common.errors import command_boundary
from ..run.quickflags import dataclass_parser, parse_command_flags
from .worker import WORKER_FLAG


@command_boundary
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        from .worker import worker_main

        return worker_main(argv[1])
    from .plan import BenchmarkArguments

    (args,) = parse_command_flags("benchmark", lambda: dataclass_parser(BenchmarkArguments), argv)
    from .report import markdown_table
    from .run import run_benchmark

    result = run_benchmark(args, command=shlex.join(["python", "-m", "qwen_helpers.benchmark", *argv]))
    print(markdown_table(result.rows))
    return 0 if any(row["status"] == "ok" for row in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

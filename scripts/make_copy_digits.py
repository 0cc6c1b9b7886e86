"""Write the copy-digits data: a task the random tiny Qwen can learn to *generalise*, not just memorise, on a CPU.

    python scripts/make_copy_digits.py   # rewrites data/copy_digits_{train,train_32,test}.json, the same every time

Each record asks to repeat four random digits ("重复这串数字" = "repeat this string of digits"; the answer is the
input). Qwen's tokenizer splits numbers into single digits, so the answer is four digit tokens and <|im_end|>.
The test inputs never occur in training: scoring them measures what the adapter learned to *do*, not what it
remembers. train_32 is the first 32 training records, for the memorisation contrast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261202  # pinned: the shipped files are exactly what this seed writes
TRAIN_RECORDS, TEST_RECORDS, SMALL_RECORDS = 500, 100, 32
INSTRUCTION = "重复这串数字"  # "repeat this string of digits"
SYSTEM = "助手"  # "assistant": a short system prompt keeps every example about 20 tokens long
DATA = Path(__file__).resolve().parent.parent / "data"


def copy_digits_records(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """(train, test) records over distinct 4-digit strings: no test input occurs in training."""
    strings = random.Random(seed).sample(range(10_000), TRAIN_RECORDS + TEST_RECORDS)
    records = [
        {
            "system": SYSTEM,
            "instruction": INSTRUCTION,
            "input": f"{number:04d}",
            "output": f"{number:04d}",
            "task": "copy_digits",
        }
        for number in strings
    ]
    return records[:TRAIN_RECORDS], records[TRAIN_RECORDS:]


def main() -> None:
    train, test = copy_digits_records()
    for name, records in (
        ("copy_digits_train", train),
        ("copy_digits_train_32", train[:SMALL_RECORDS]),
        ("copy_digits_test", test),
    ):
        path = DATA / f"{name}.json"
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()

"""Run ``python -m qwen_helpers.train_lora`` unchanged, recording every batch each process trains on (for tests/test_distributed.py).

    torchrun --nproc_per_node 2 tests/budget_probe.py --token_budget 150 ...   (PROBE_DIR=folder for the records)

Each process appends one JSON line per micro-batch to ``$PROBE_DIR/rank<R>.jsonl``: its rank, the optimiser
step and epoch it belongs to, the token budget, and the token ids of every example in the batch (split at the
``position_ids`` restarts of a padding-free row, or by the attention mask of a padded one). The command itself
(flags, checks, Trainer, save) runs as is: only ``KitTrainer.training_step`` is wrapped to take the notes.
"""

import json
import os
import runpy
from pathlib import Path

from qwen_helpers.training.batching import kit_trainer_class


def examples_of(inputs) -> list[list[int]]:
    """The token ids of each example of a collated batch (padding-free or padded)."""
    ids = inputs["input_ids"]
    if "attention_mask" not in inputs and "position_ids" in inputs:
        row, starts = ids[0].tolist(), (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
        return [row[start:end] for start, end in zip(starts, starts[1:] + [len(row)])]
    return [row[mask.bool()].tolist() for row, mask in zip(ids, inputs["attention_mask"])]


def install(folder: Path) -> None:
    trainer_class = kit_trainer_class()
    original = trainer_class.training_step
    rank = int(os.environ.get("RANK", "0"))
    log = folder / f"rank{rank}.jsonl"

    def training_step(self, model, inputs, num_items_in_batch=None):
        note = {"rank": rank, "step": self.state.global_step, "epoch": int(self.state.epoch or 0), "token_budget": self.token_budget,
                "padding_free": self.padding_free, "world_size": self.args.world_size, "examples": examples_of(inputs)}
        with log.open("a", encoding="utf-8") as file:
            file.write(json.dumps(note) + "\n")
        return original(self, model, inputs, num_items_in_batch)

    trainer_class.training_step = training_step


if __name__ == "__main__":
    install(Path(os.environ["PROBE_DIR"]))
    runpy.run_module("qwen_helpers.train_lora", run_name="__main__", alter_sys=True)

"""Speed comparisons a shared machine cannot fake: interleaved rounds, ratios taken within a round, medians and ranges.

Timing variant A, then variant B, compares two moments of the machine as much as two variants: another process, a
turbo clock or a warm cache moves one run and not the other. Here every round times each model once, in an order
that rotates from round to round, and a model's ratio to the baseline divides two figures of the same round.
"""

from __future__ import annotations

import statistics
import time


def rotated(names: list, round_index: int) -> list:
    """``names`` in round ``round_index``'s order: rotated by one each round, so no side is always first after a pause."""
    shift = round_index % len(names) if names else 0
    return names[shift:] + names[:shift]


def round_ratios(mine: list[float], base: list[float]) -> dict:
    """The median and range of per-round ratios ``mine[i] / base[i]`` (each pair measured in the same round)."""
    ratios = [value / reference for value, reference in zip(mine, base)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "rounds": len(ratios)}


def paired_step_ratios(models: dict, batch: dict, baseline: str, rounds: int = 5) -> dict[str, dict]:
    """Seconds of one training step's forward and backward (no optimiser step, so no weight changes) for each model
    on the same ``batch``, in ``rounds`` interleaved rounds after one untimed warm-up round.

    Returns, per model: ``seconds`` (the median), and ``ratio``, ``ratio_min``, ``ratio_max``: the median and range
    of its per-round time divided by ``baseline``'s in the same round (1.0 for the baseline itself).
    """
    import torch

    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models: {', '.join(models)}")
    names = list(models)
    seconds = {name: [] for name in names}
    for round_index in range(rounds + 1):
        for name in rotated(names, round_index):
            model = models[name]
            model.train()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch).loss.backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if round_index:  # round 0 warms up (first-call allocations, kernel choices)
                seconds[name].append(elapsed)
    return {name: {"seconds": statistics.median(seconds[name]), **round_ratios(seconds[name], seconds[baseline])}
            for name in names}


def shown_ratio(figures: dict) -> str:
    """``1.23x (1.10-1.31)``: the median ratio and its range, as a table cell."""
    return f"{figures['ratio']:.2f}x ({figures['ratio_min']:.2f}-{figures['ratio_max']:.2f})"

"""Matplotlib figures for the notebooks and commands. Each function returns a Figure; nothing here calls show()."""

from __future__ import annotations

import matplotlib

if matplotlib.get_backend().lower() not in {"module://matplotlib_inline.backend_inline", "inline"}:
    matplotlib.use("Agg")  # headless commands and CI; notebooks keep their inline backend
import matplotlib.pyplot as plt
from matplotlib.figure import Figure


TASK_METRICS = (
    "eval_exact_match",
    "eval_chrf",
    "eval_bleu",
    "eval_accuracy",
    "eval_macro_f1",
)  # the held-out metrics, preferred first


def plot_loss(history: list[dict], title: str = "Training loss", metric: str | None = None) -> Figure:
    """Training and evaluation loss against the optimiser step, and a held-out metric on a second axis when logged.

    ``metric`` names it (``--metric_for_best_model``: 'chrf' or 'eval_chrf'); by default the first TASK_METRICS logged.
    """
    figure, axes = plt.subplots(figsize=(6, 3.5))
    train = [(record["step"], record["loss"]) for record in history if "loss" in record]
    evaluation = [(record["step"], record["eval_loss"]) for record in history if "eval_loss" in record]
    if train:
        axes.plot(*zip(*train), label="train loss", marker=".")
    if evaluation:
        axes.plot(*zip(*evaluation), label="eval loss", marker="o")
    axes.set(xlabel="step", ylabel="loss (nats per trained token)", title=title)
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    name = metric_to_plot(history, metric)
    if name:
        right = axes.twinx()
        points = [(record["step"], record[name]) for record in history if name in record]
        shown = name[len("eval_") :].replace("_", " ")
        handles += right.plot(*zip(*points), color="tab:green", marker="s", label=f"held-out {shown}")
        labels.append(f"held-out {shown}")
        right.set(ylabel=shown, ylim=(0, 1.05 if name in ("eval_accuracy", "eval_macro_f1") else 105))  # the full scale
    axes.legend(handles, labels, fontsize="small")
    figure.tight_layout()
    return figure


def plot_losses(histories: dict[str, list[dict]], title: str = "Training loss per run") -> Figure:
    """Several runs' training losses on one set of axes (one line per run), to compare methods or variants."""
    figure, axes = plt.subplots(figsize=(7, 3.8))
    for name, history in histories.items():
        train = [(record["step"], record["loss"]) for record in history if "loss" in record]
        if train:
            axes.plot(*zip(*train), label=name, marker=".")
    axes.set(xlabel="step", ylabel="loss (nats per trained token)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def metric_to_plot(history: list[dict], metric: str | None) -> str | None:
    """The held-out metric to draw: ``metric`` when logged (and not a loss), else the first of TASK_METRICS logged."""
    if metric and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    logged = {key for record in history for key in record}
    if metric and metric in logged and not metric.endswith("loss"):
        return metric
    return next((name for name in TASK_METRICS if name in logged), None)


def plot_length_histogram(lengths_by_name: dict[str, list[int]], max_length: int | None = None) -> Figure:
    """Histogram of token lengths per dataset, with the max_length cut-off marked."""
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, lengths in lengths_by_name.items():
        axes.hist(lengths, bins=30, alpha=0.6, label=f"{name} (n={len(lengths)})")
    if max_length:
        axes.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    axes.set(xlabel="tokens per example (prompt + answer)", ylabel="examples", title="Token lengths")
    axes.legend()
    figure.tight_layout()
    return figure


CJK_FONTS = ["Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei", "PingFang SC"]
ENGLISH_LABELS = {"正面": "positive", "负面": "negative", "中性": "neutral"}  # the sample data's sentiment labels


def cjk_font() -> str | None:
    """The first installed font that can draw Chinese, or None (then Chinese text would show as empty boxes)."""
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def displayable_labels(labels: list[str]) -> tuple[list[str], str]:
    """Labels the installed fonts can draw, and a note when some had to be replaced (no CJK font here)."""
    if all(label.isascii() for label in labels) or cjk_font():
        return labels, ""
    shown = [label if label.isascii() else ENGLISH_LABELS.get(label, f"label {index}") for index, label in enumerate(labels)]
    return shown, "Chinese labels shown in English: no CJK font installed (e.g. apt install fonts-noto-cjk)"


def plot_confusion_matrix(matrix, labels: list[str], title: str = "Confusion matrix") -> Figure:
    """A labelled confusion matrix (rows: true label, columns: predicted)."""
    font = cjk_font()
    if font and plt.rcParams["font.sans-serif"][:1] != [font]:
        plt.rcParams["font.sans-serif"] = [font, *plt.rcParams["font.sans-serif"]]
    labels, note = displayable_labels(labels)
    figure, axes = plt.subplots(figsize=(4, 3.5))
    if note:
        figure.text(0.01, 0.01, note.strip(" ()"), fontsize=6, color="gray")
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels=labels)
    axes.set_yticks(range(len(labels)), labels=labels)
    for row in range(len(labels)):
        for column in range(len(labels)):
            axes.text(column, row, int(matrix[row][column]), ha="center", va="center")
    axes.set(xlabel="predicted", ylabel="true", title=title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def plot_bars(values_by_name: dict[str, float], ylabel: str, title: str) -> Figure:
    """A simple bar chart (benchmark memory/throughput, metric comparisons)."""
    figure, axes = plt.subplots(figsize=(max(4, 1.2 * len(values_by_name)), 3.5))
    names = list(values_by_name)
    bars = axes.bar(names, [values_by_name[name] for name in names])
    axes.bar_label(bars, fmt="%.3g")
    axes.set(ylabel=ylabel, title=title)
    axes.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    return figure


def plot_grouped_bars(series_by_name: dict[str, dict[str, float]], ylabel: str, title: str) -> Figure:
    """Side-by-side bars per category for several series (benchmark: measured vs estimated memory)."""
    import numpy as np

    categories = list(dict.fromkeys(category for series in series_by_name.values() for category in series))
    width = 0.8 / max(1, len(series_by_name))
    figure, axes = plt.subplots(figsize=(max(5, 1.1 * len(categories)), 3.8))
    for index, (name, series) in enumerate(series_by_name.items()):
        positions = np.arange(len(categories)) + (index - (len(series_by_name) - 1) / 2) * width
        bars = axes.bar(positions, [series.get(category, 0.0) for category in categories], width, label=name)
        axes.bar_label(bars, fmt="%.3g", fontsize=7)
    axes.set_xticks(np.arange(len(categories)), labels=categories, rotation=30, ha="right")
    axes.set(ylabel=ylabel, title=title)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_memory_footprint(parts_by_model: dict[str, dict[str, float]], title: str = "Model memory footprint") -> Figure:
    """Stacked bars of bytes per model (e.g. 4-bit vs 16-bit), one colour per part, labelled in MiB."""
    figure, axes = plt.subplots(figsize=(max(4, 1.6 * len(parts_by_model)), 3.5))
    names = list(parts_by_model)
    bottoms = [0.0] * len(names)
    for part in dict.fromkeys(part for parts in parts_by_model.values() for part in parts):
        heights = [parts_by_model[name].get(part, 0) / 2**20 for name in names]
        bars = axes.bar(names, heights, bottom=bottoms, label=part)
        axes.bar_label(bars, labels=[f"{height:.1f}" if height else "" for height in heights], label_type="center")
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights)]
    for position, total in enumerate(bottoms):
        axes.text(position, total, f"{total:.1f} MiB", ha="center", va="bottom")
    axes.set(ylabel="MiB", title=title, ylim=(0, 1.15 * max(bottoms)))
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return figure


def plot_preference(history: list[dict], title: str = "DPO") -> Figure:
    """DPO's loss, and its reward margin and preference accuracy on the training batches and the held-out pairs."""
    figure, (loss_axes, margin_axes) = plt.subplots(1, 2, figsize=(10, 3.5))
    for prefix, label in (("", "train"), ("eval_", "held-out")):
        losses = [(r["step"], r[f"{prefix}loss"]) for r in history if f"{prefix}loss" in r]
        margins = [(r["step"], r[f"{prefix}rewards/margins"]) for r in history if f"{prefix}rewards/margins" in r]
        accuracy_key = f"{prefix}rewards/accuracies"
        accuracies = [(r["step"], r[accuracy_key]) for r in history if accuracy_key in r]
        if losses:
            loss_axes.plot(*zip(*losses), label=label, marker=".")
        if margins:
            margin_axes.plot(*zip(*margins), label=f"{label} margin", marker=".")
        if accuracies:
            margin_axes.plot(*zip(*accuracies), label=f"{label} accuracy", linestyle="--")
    loss_axes.set(xlabel="step", ylabel="DPO loss", title=title)
    margin_axes.set(xlabel="step", ylabel="reward margin / accuracy", title="chosen - rejected reward")
    for axes in (loss_axes, margin_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    return figure


def plot_rewards(history: list[dict], title: str = "GRPO") -> Figure:
    """GRPO's mean reward (total and per reward function) with its spread, and the completion length, per step."""
    figure, (reward_axes, length_axes) = plt.subplots(1, 2, figsize=(10, 3.5))
    logs = [record for record in history if "reward" in record]
    steps = [record["step"] for record in logs]
    if logs:
        means, spreads = [r["reward"] for r in logs], [r.get("reward_std", 0.0) for r in logs]
        reward_axes.plot(steps, means, label="total", marker=".")
        low, high = [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)]
        reward_axes.fill_between(steps, low, high, alpha=0.2)
        for key in sorted(k for k in logs[0] if k.startswith("rewards/") and k.endswith("/mean")):
            reward_axes.plot(steps, [r[key] for r in logs], label=key.split("/")[1], linestyle="--")
        length_axes.plot(steps, [r.get("completions/mean_length", float("nan")) for r in logs], marker=".")
    reward_axes.set(xlabel="step", ylabel="mean reward (band: std)", title=title)
    length_axes.set(xlabel="step", ylabel="tokens", title="mean completion length")
    for axes in (reward_axes, length_axes):
        axes.grid(alpha=0.3)
    reward_axes.legend()
    figure.tight_layout()
    return figure

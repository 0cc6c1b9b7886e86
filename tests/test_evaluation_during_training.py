"""Training judged by held-out results: evaluation during training, early stopping, the best checkpoint, TensorBoard.

Mechanics only, on the tiny random model: which step is best is arranged by the flags (a seeded toy), never by
what a random model happens to write. Notebook 02b shows what the tiny model can honestly learn (copy digits).
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_helpers import train_lora
from qwen_helpers.evaluation.held_out import best_evaluation
from qwen_helpers.evaluation.metrics import scores_by_task

DATA = Path(__file__).resolve().parent.parent / "data"
FAST = [
    "--lora_r",
    "16",
    "--target_modules",
    "all-linear",
    "--lora_dropout",
    "0",
    "--per_device_train_batch_size",
    "4",
    "--lr_scheduler_type",
    "constant",
    "--warmup_steps",
    "0",
    "--logging_steps",
    "2",
    "--disable_tqdm",
    "True",
]


@pytest.fixture
def digits(tmp_path):
    """8 copy-digits training records and 6 held-out ones (none of their inputs is trained)."""
    paths = {}
    for name, source, count in (("train", "copy_digits_train.json", 8), ("test", "copy_digits_test.json", 6)):
        records = json.loads((DATA / source).read_text(encoding="utf-8"))[:count]
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--early_stopping_patience", "2"], "--early_stopping_patience 2 needs evaluations"),
        (
            ["--eval_strategy", "steps", "--eval_steps", "5"],
            "--eval_strategy steps evaluates during training, but there is no --eval_data_path",
        ),
        (
            ["--eval_strategy", "steps", "--eval_data_path", "data/test.json", "--load_best_model_at_end", "True"],
            "--load_best_model_at_end True needs a checkpoint at each evaluation",
        ),
        (
            [
                "--eval_strategy",
                "steps",
                "--eval_data_path",
                "data/test.json",
                "--metric_for_best_model",
                "eval_accuracy",
            ],
            "data/train.json is generation data, whose held-out metrics are eval_chrf",
        ),
        (
            [
                "--eval_strategy",
                "steps",
                "--eval_data_path",
                "data/test.json",
                "--metric_for_best_model",
                "eval_chrf",
                "--eval_generate_records",
                "0",
            ],
            "--eval_generate_records records, and that is 0",
        ),
        (["--eval_strategy", "steps", "--eval_data_path", "data/test.json", "--eval_steps", "0"], "--eval_steps must be above 0"),
        (["--metric_for_best_model", "eval_chrf"], "--metric_for_best_model eval_chrf picks among evaluations, and this run has none"),
    ],
)
def test_bad_evaluation_flags_are_one_line_and_exit_2_before_any_model_loads(flags, named, capsys, monkeypatch):
    import qwen_helpers.training.sft as train_module

    monkeypatch.setattr(train_module, "load_base_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    assert train_lora.main(["--data_path", "data/train.json", "--output_dir", "outputs/never-written", *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert named in error and len(error.splitlines()) == 1, error


def test_held_out_data_without_evaluations_during_training_is_evaluated_once_at_the_end(tmp_path, digits, capsys):
    output = tmp_path / "final"
    assert train_lora.main(["--data_path", digits["train"], "--eval_data_path", digits["test"], "--output_dir", str(output),
                            "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                            "--disable_tqdm", "True", "--report_to", "none"]) == 0
    history = json.loads((output / "loss_history.json").read_text())
    evaluations = [record for record in history if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [3] and math.isfinite(evaluations[0]["eval_loss"])
    assert "eval loss" in capsys.readouterr().out


def test_early_stopping_stops_a_run_whose_held_out_metric_stalls(tmp_path, digits, capsys):
    """A learning rate of 1e-12 leaves the answers unchanged: exact match stalls; patience 2 stops the run at 6/40."""
    output = tmp_path / "stalled"
    argv = [
        "--data_path",
        digits["train"],
        "--eval_data_path",
        digits["test"],
        "--output_dir",
        str(output),
        "--max_steps",
        "40",
        "--learning_rate",
        "1e-12",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_generate_records",
        "6",
        "--eval_max_new_tokens",
        "4",
        "--metric_for_best_model",
        "exact_match",
        "--early_stopping_patience",
        "2",
        "--save_strategy",
        "no",
        *FAST,
    ]
    assert train_lora.main(argv) == 0
    history = json.loads((output / "loss_history.json").read_text())
    assert [record["step"] for record in history if "eval_exact_match" in record] == [2, 4, 6]
    run_config = json.loads((output / "run_config.json").read_text())
    assert run_config["stopped_because"].startswith(
        "early stopping: eval_exact_match did not improve for 2 evaluations"
    )
    assert run_config["best_step"] == 2 and run_config["best_metric"] == "eval_exact_match"
    printed = capsys.readouterr().out
    assert "step    6/40  eval loss" in printed and "{'eval_loss'" not in printed  # a formatted line, not a raw dict


def test_best_checkpoint_is_saved_scored_as_inference_scores_it_and_logged_to_tensorboard(tmp_path, digits, capsys,
                                                                                          monkeypatch):
    """The seeded toy makes the first evaluation the best: eval loss with greater_is_better True picks the *highest*
    loss, and the loss falls on these records at this learning rate (asserted). The saved adapter must be checkpoint-2's
    weights, not the last step's, and its held-out metrics what `inference` measures on the same records with it."""
    from qwen_helpers.training import sft as train

    # a finished run drops its checkpoints; keep them here to compare the saved adapter with them
    monkeypatch.setattr(train, "drop_checkpoints", lambda folder: None)
    output = tmp_path / "best"
    argv = [
        "--data_path",
        digits["train"],
        "--eval_data_path",
        digits["test"],
        "--output_dir",
        str(output),
        "--max_steps",
        "8",
        "--learning_rate",
        "3e-3",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--eval_generate_records",
        "6",
        "--eval_max_new_tokens",
        "6",
        "--per_device_eval_batch_size",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--save_total_limit",
        "10",
        "--load_best_model_at_end",
        "True",
        "--metric_for_best_model",
        "eval_loss",
        "--greater_is_better",
        "True",
        "--report_to",
        "tensorboard",
        *FAST,
    ]
    assert train_lora.main(argv) == 0
    history = json.loads((output / "loss_history.json").read_text())
    evaluations = [record for record in history if "eval_loss" in record]
    assert [record["step"] for record in evaluations] == [2, 4, 6, 8]
    assert (
        evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"]
    )  # the arrangement holds: step 2 has the highest loss
    run_config = json.loads((output / "run_config.json").read_text())
    assert (run_config["best_step"], run_config["best_score"]) == (2, evaluations[0]["eval_loss"])
    assert run_config["stopped_because"] == "max_steps reached (8 steps)"

    saved = load_file(output / "adapter_model.safetensors")
    best, last = (load_file(output / f"checkpoint-{step}" / "adapter_model.safetensors") for step in (2, 8))
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[name], best[name]) for name in saved)
    assert any(not torch.equal(saved[name], last[name]) for name in saved)

    table = [json.loads(line) for line in (output / "heldout_answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(table) == 6 and {row["step"] for row in table} == {2}

    from qwen_helpers import inference

    predictions = tmp_path / "preds.jsonl"
    assert (
        inference.main(
            [
                "--adapter_path",
                str(output),
                "--data_path",
                digits["test"],
                "--output_file",
                str(predictions),
                "--max_new_tokens",
                "6",
                "--batch_size",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [row["prediction"] for row in rows] == [row["at_step"] for row in table]
    scores = scores_by_task(rows, [row["prediction"] for row in rows])[-1]
    for name in ("chrf", "bleu", "exact_match"):
        assert scores[name] == pytest.approx(evaluations[0][f"eval_{name}"]), name

    events = list((output / "runs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under runs/"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(path)).Reload().Tags()["scalars"] for path in events))
    assert {"train/loss", "eval/loss", "eval/chrf", "eval/exact_match"} <= tags


def test_best_evaluation_skips_the_untrained_baseline_and_keeps_the_first_of_equals():
    history = [
        {"step": 0, "eval_chrf": 90.0},
        {"step": 2, "loss": 1.0},
        {"step": 2, "eval_chrf": 10.0},
        {"step": 4, "eval_chrf": 30.0},
        {"step": 6, "eval_chrf": 30.0},
    ]
    assert best_evaluation(history, "chrf", greater_is_better=True) == (4, 30.0)
    assert best_evaluation(history, "eval_chrf", greater_is_better=False) == (2, 10.0)
    assert best_evaluation(history, "eval_accuracy", greater_is_better=True) is None


def test_loss_plot_draws_the_held_out_metric_on_a_second_axis_only_when_logged():
    from qwen_helpers.notebook.plots import plot_loss

    history = [{"step": 0, "eval_loss": 12.0, "eval_exact_match": 0.0}, {"step": 5, "loss": 9.0},
               {"step": 5, "eval_loss": 8.0, "eval_exact_match": 25.0}]
    figure = plot_loss(history, metric="exact_match")
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "exact match"
    assert list(figure.axes[1].lines[0].get_ydata()) == [0.0, 25.0]
    assert len(plot_loss([{"step": 1, "loss": 3.0}, {"step": 1, "eval_loss": 4.0}]).axes) == 1


def test_a_saved_figure_is_closed(tmp_path):
    """Commands save a plot per run; pyplot would keep every one open (a long-lived process warns past 20)."""
    import matplotlib.pyplot as plt

    from qwen_helpers.common.files import save_figure
    from qwen_helpers.notebook.plots import plot_loss

    before = plt.get_fignums()
    save_figure(plot_loss([{"step": 1, "loss": 3.0}]), tmp_path / "loss_plot.png")
    assert (tmp_path / "loss_plot.png").stat().st_size > 0 and plt.get_fignums() == before


@pytest.mark.parametrize("padding_free", [True, False])
def test_cheap_eval_loss_equals_the_trainers_own(tiny_path, tokenizer, digits, tmp_path, padding_free, monkeypatch):
    """Eval loss from logits only where the loss reads them is the Trainer's full-vocabulary one, padded or not."""
    from qwen_helpers.training import batching
    from qwen_helpers.training.batching import make_training_collator
    from qwen_helpers.run.config import KitTrainingArguments, LoraArguments
    from qwen_helpers.data.encoding import tokenize_records
    from qwen_helpers.models.loading import load_base_model
    from qwen_helpers.data.records import load_records
    from qwen_helpers.training.sft import KitTrainer, attach_adapter

    data = tokenize_records(tokenizer, load_records(digits["test"]), 64).dataset
    lora = LoraArguments(lora_r=4, target_modules="all-linear")
    model = attach_adapter(load_base_model(tiny_path), "lora", tiny_path, lora, tokenizer=tokenizer)
    args = KitTrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], disable_tqdm=True)
    cheap_batches = []
    keep = batching.only_trained_logits
    monkeypatch.setattr(batching, "only_trained_logits", lambda inputs: cheap_batches.append(1) or keep(inputs))
    losses = {}
    for only in (True, False):
        collator = make_training_collator(tokenizer, padding_free)
        trainer = KitTrainer(model=model, args=args, eval_dataset=data, data_collator=collator,
                             trained_logits_only=only, padding_free=padding_free)
        losses[only] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert len(cheap_batches) == 2  # 6 records in batches of 4: the cheap path ran, and only for trained_logits_only

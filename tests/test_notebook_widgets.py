"""Each notebook with a widget panel, in a real kernel: move widgets, re-run the cells below, the run uses the new values.

This is what a learner does by hand (run, move a slider, run again), without a browser: the notebook runs up to
its training cell with a short cap, the panels are moved from code (``panel.set``, which sets the widgets' values
exactly as a slider does), the cells from the one after the panel down to the training cell run again, and the
kernel is asked what the Trainer and the adapter really used. tests/test_browser.py does the same for notebook 02
in JupyterLab with a real browser.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

CASES = {
    "02_lora_fp16.ipynb": {
        "overrides": "MAX_STEPS = 2\nTRAIN_RECORDS = 2\nOUTPUT_DIR = {tmp!r}",
        "move": "training_panel.set(learning_rate=5e-3, max_steps=5)\nlora_panel.set(lora_r=32, use_dora=True)",
        "probe": {"trainer.args.learning_rate": 5e-3, "trainer.optimizer.param_groups[0]['initial_lr']": 5e-3,
                  "trainer.state.global_step": 5, "model.peft_config['default'].r": 32,
                  "model.peft_config['default'].use_dora": True},
    },
    "02b_held_out_evaluation.ipynb": {  # the panel's evaluation interval and patience reach the 500-record run
        "overrides": "MAX_STEPS = 2\nSMALL_MAX_STEPS = 2\nEVAL_STEPS = 1\nOUTPUT_DIR = {tmp!r}",
        "until": "large = run(",
        "move": "training_panel.set(eval_steps=5, early_stopping_patience=2, max_steps=5)",
        "probe": {"large.trainer.args.eval_steps": 5, "large.trainer.args.early_stopping_patience": 2,
                  "large.trainer.state.global_step": 5, "len([r for r in large.history if 'eval_loss' in r])": 2},
    },
    "03_prompt_tuning.ipynb": {
        "overrides": "MAX_STEPS = 2\nOUTPUT_DIR = {tmp!r}",
        "move": "training_panel.set(learning_rate=1e-2, max_steps=5)\nprompt_panel.set(num_virtual_tokens=10)",
        "probe": {"trainer.args.learning_rate": 1e-2, "trainer.state.global_step": 5,
                  "model.peft_config['default'].num_virtual_tokens": 10},
    },
    "04_qlora_4bit.ipynb": {
        "overrides": "MAX_STEPS = 2\nTRAIN_RECORDS = 2\nOUTPUT_DIR = {tmp!r}\nMERGED_DIR = {tmp!r} + '_merged'",
        "move": "training_panel.set(learning_rate=5e-3, max_steps=5)\nlora_panel.set(lora_r=8)",
        "probe": {"trainer.args.learning_rate": 5e-3, "trainer.state.global_step": 5, "model.peft_config['default'].r": 8},
    },
    "06_benchmark.ipynb": {  # no Trainer in the notebook itself: the re-run estimate must use the moved workload
        "overrides": "OUTPUT_DIR = {tmp!r}",
        "until": "display(Markdown(estimate_table(plan_estimates(args",
        "move": "benchmark_panel.set(seq_len=128, lora_r=16)",
        "probe": {"args.seq_len": 128, "args.lora_r": 16, "lora_model.peft_config['default'].r": 16},
    },
    "07_preference_dpo.ipynb": {  # the panel's beta reaches TRL's loss, not only the config
        "overrides": "MAX_STEPS = 2\nOUTPUT_DIR = {tmp!r}",
        "move": "dpo_panel.set(beta=0.5, learning_rate=5e-3, max_steps=5)",
        "probe": {"trainer.args.beta": 0.5, "trainer.beta": 0.5, "trainer.args.learning_rate": 5e-3,
                  "trainer.optimizer.param_groups[0]['initial_lr']": 5e-3, "trainer.state.global_step": 5},
    },
    "08_grpo_rewards.ipynb": {  # group size and completion length reach the sampler, beta the KL term
        "overrides": "MAX_STEPS = 2\nOUTPUT_DIR = {tmp!r}",
        "move": "grpo_panel.set(learning_rate=1e-3, beta=0.1, num_generations=2, max_completion_length=8, max_steps=5)",
        "probe": {"trainer.args.learning_rate": 1e-3, "trainer.beta": 0.1, "trainer.num_generations": 2,
                  "trainer.max_completion_length": 8, "trainer.state.global_step": 5,
                  "max(r['completions/max_length'] for r in history.history if 'reward' in r) > 4": True},
    },
}


def first_index(cells, text: str) -> int:
    return next(index for index, cell in enumerate(cells) if cell.cell_type == "code" and text in cell.source)


def run_code(client, nb, code: str):
    """Run extra code in the notebook's kernel (as a cell appended at the end) and return its stdout."""
    cell = nbformat.v4.new_code_cell(code)
    nb.cells.append(cell)
    client.execute_cell(cell, len(nb.cells) - 1)
    return "".join(output.get("text", "") for output in cell.outputs if output.output_type == "stream")


@pytest.mark.parametrize("name", sorted(CASES))
def test_moved_widgets_reach_the_trainer_after_a_rerun(name, tmp_path):
    case = CASES[name]
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    parameters = first_index(nb.cells, "MODEL_PATH")
    nb.cells[parameters].source += "\n" + case["overrides"].format(tmp=str(tmp_path / "run"))
    panel_cell = first_index(nb.cells, "show_panels(")
    training_cell = first_index(nb.cells, case.get("until", "trainer.train()"))
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    with client.setup_kernel():
        for index in range(training_cell + 1):
            if nb.cells[index].cell_type == "code":
                client.execute_cell(nb.cells[index], index)
        run_code(client, nb, case["move"])
        for index in range(panel_cell + 1, training_cell + 1):  # the cells below the panel, down to training
            if nb.cells[index].cell_type == "code":
                client.execute_cell(nb.cells[index], index)
        probe = "import json\nprint(json.dumps({" + ", ".join(f"{expression!r}: {expression}" for expression in case["probe"]) + "}))"
        used = json.loads(run_code(client, nb, probe).strip().splitlines()[-1])
    assert used == pytest.approx(case["probe"]), f"{name}: the re-run used {used}, the widgets said {case['probe']}"

"""Where a training run writes: refuse to replace what the user did not name, stage the run, find what to resume.

A run writes into a staging folder beside ``--output_dir`` and replaces it only once everything is saved
(:func:`qwen_helpers.training.sft.publish_run`), so an interrupted run leaves the previous folder untouched and
``--resume_from_checkpoint True`` continues it from its last complete checkpoint. A finished run's folder keeps
no checkpoints. No output folder may be, hold or lie inside one of the run's inputs (:func:`training_inputs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.adapter_folder import safetensors_shapes
from ..common.errors import KitError, RunInterrupted
from ..common.files import (OutputExistsError, check_not_an_input, is_nonempty_folder, model_fingerprint, new_staging_folder,
                    recorded_path, remove_folders,
                    staging_folders)

if TYPE_CHECKING:
    from ..run.config import KitTrainingArguments


class OutputDirExistsError(OutputExistsError):
    """The output folder already holds a previous run (or an interrupted one)."""


class ResumeError(KitError, FileNotFoundError):
    """--resume_from_checkpoint names nothing that can be resumed."""


def training_inputs(model_path: str | None, data_path: str | None, eval_data_path: str | None = None,
                    deepspeed=None) -> dict:
    """What a training run reads, by flag: its output folder may be none of them, hold none and lie in none."""
    return {"--model_path": model_path, "--data_path": data_path, "--eval_data_path": eval_data_path,
            "--deepspeed": deepspeed if isinstance(deepspeed, str) else None}


def recorded_run_paths(model_path: str, output_dir: str, **inputs: str | None) -> dict:
    """How every run records where it read and wrote, for run_config.json: absolute paths (they mean the same from any
    working folder; a tiny alias or hub id as typed), the published output folder, and the base's fingerprint (so a
    later load can tell a folder that is not that base)."""
    return {"model_path": recorded_path(model_path), **{flag: recorded_path(path) for flag, path in inputs.items()},
            "output_dir": os.path.abspath(output_dir), "base_fingerprint": model_fingerprint(model_path)}


def check_output_dir(output_dir: str, overwrite: bool, resuming: bool, inputs: dict | None = None) -> None:
    """Refuse an output folder that is (or holds, or lies in) an input, always; a non-empty folder, or one beside an
    interrupted run, unless asked to overwrite or resume."""
    check_not_an_input(output_dir, "--output_dir", inputs or {}, example="outputs/lora")
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise OutputDirExistsError(f"--output_dir {output_dir} is a file; choose a folder name.")
    if overwrite or resuming:
        return
    interrupted = [folder for folder in staging_folders(path) if complete_checkpoints(folder)]
    if is_nonempty_folder(path):
        resumable = interrupted or complete_checkpoints(path)  # a finished run keeps no checkpoints to continue
        choices = ("pass --overwrite_output_dir True to replace them, or --resume_from_checkpoint True to continue "
                   "that run" if resumable else "or pass --overwrite_output_dir True to replace them")
        raise OutputDirExistsError(
            f"--output_dir {output_dir} already holds files from an earlier run. Choose another folder, {choices}.")
    if interrupted:
        raise OutputDirExistsError(
            f"--output_dir {output_dir}: an interrupted run left its files in {interrupted[0]}. Pass "
            "--resume_from_checkpoint True to continue it, or --overwrite_output_dir True to start again (it is removed when the new run completes)."
        )


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """checkpoint-N folders whose save finished (trainer_state.json written last, adapter weights intact), newest first.

    A save cut short by a full disk or a kill leaves a checkpoint without its trainer state, or with a
    truncated adapter file; resuming from it would fail, so it is skipped.
    """
    folder = Path(folder)
    found = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = _CHECKPOINT.match(path.name)
        if not (match and path.is_dir() and (path / "trainer_state.json").is_file()):
            continue
        weights = path / "adapter_model.safetensors"
        try:
            if weights.is_file():
                safetensors_shapes(weights)
        except KitError:
            continue
        found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found, reverse=True)]


@contextlib.contextmanager
def keep_only_what_resumes(staging: str | os.PathLike | None, target: str, clean_up: bool = True):
    """Around a run writing into ``staging``: on an error or Ctrl-C the staging folder stays only if it holds a
    complete checkpoint to resume (``clean_up`` is the main process's job), and Ctrl-C becomes one
    :class:`RunInterrupted` that says so (the command prints it as one line; a notebook shows it as the interrupt)."""
    try:
        yield
    except BaseException as error:
        checkpoints = complete_checkpoints(staging) if staging else []
        if clean_up and staging and not checkpoints:
            remove_folders([staging])
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
            raise RunInterrupted(interruption_message(target, checkpoints)) from None
        raise


def interruption_message(target: str, checkpoints: list[Path]) -> str:
    """What a Ctrl-C kept: the output folder as it was, and the checkpoint to continue from, if any."""
    if not checkpoints:
        return (f"training stopped before its first complete checkpoint, so nothing was saved; --output_dir {target} is as it "
                "was. Checkpoints come every --save_steps with --save_strategy steps.")
    step = _CHECKPOINT.match(checkpoints[0].name).group(1)
    return (f"training stopped; --output_dir {target} is as it was. Its last complete checkpoint (step {step}) is "
            f"{checkpoints[0]}: run the same command with --resume_from_checkpoint True to continue from it, or with "
            "--overwrite_output_dir True to start again.")


def drop_checkpoints(folder: str | os.PathLike) -> None:
    """Remove the checkpoint-N folders of a finished run: they exist to resume an interrupted one, and a finished
    run's folder holds the adapter and the run's files only."""
    folder = Path(folder)
    found = folder.iterdir() if folder.is_dir() else []
    remove_folders([path for path in found if path.is_dir() and _CHECKPOINT.match(path.name)])


@dataclass
class OutputPlan:
    """Where a run writes (its staging folder), what it resumes from, and the interrupted runs it replaces."""

    target: str
    staging: str | None = None
    resume_from: str | None = None
    stale: list[str] = field(default_factory=list)


def plan_output(training_args: KitTrainingArguments, staged: bool = True, inputs: dict | None = None) -> OutputPlan:
    """Check the output folder and decide the staging folder and the checkpoint to resume from.

    ``--resume_from_checkpoint True`` continues the newest interrupted run of this output folder (its
    staging folder), else the last checkpoint of the finished run in the folder itself; a path is used as given.
    """
    target = training_args.output_dir
    value = training_args.resume_from_checkpoint
    resuming = value not in (None, "", "False", "false")
    check_output_dir(target, training_args.overwrite_output_dir, resuming, inputs)
    interrupted = staging_folders(target)
    plan = OutputPlan(target)
    if value in ("True", "true", "last"):
        for folder in interrupted:
            checkpoints = complete_checkpoints(folder)
            if checkpoints:
                plan.staging, plan.resume_from = str(folder), str(checkpoints[0])
                break
        else:
            checkpoints = complete_checkpoints(target)
            if not checkpoints:
                raise ResumeError(
                    f"--resume_from_checkpoint True: no complete checkpoint-* folder in {target} or in an interrupted run beside it. "
                    "A finished run keeps none (resuming continues an interrupted run); checkpoints are written with "
                    "--save_strategy steps|epoch. Start a fresh run instead."
                )
            plan.resume_from = str(checkpoints[0])
    elif resuming:
        if not (Path(value) / "trainer_state.json").is_file():
            raise ResumeError(f"--resume_from_checkpoint {value}: no such checkpoint folder (a checkpoint-N folder holds trainer_state.json).")
        plan.resume_from = value
    if staged:
        plan.stale = [str(folder) for folder in interrupted if str(folder) != plan.staging]
        plan.staging = plan.staging or str(new_staging_folder(target))
    return plan


def plan_output_on_main_process(training_args: KitTrainingArguments, staged: bool = True,
                                inputs: dict | None = None) -> OutputPlan:
    """Plan the output on the main process only and share the plan, so every rank writes to the same staging folder or all stop."""
    verdict = [None]
    if training_args.process_index == 0:
        try:
            verdict = [plan_output(training_args, staged, inputs)]
        except KitError as error:
            verdict = [error]
    if training_args.world_size > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(verdict, from_process=0)
    if isinstance(verdict[0], KitError):
        raise verdict[0]
    return verdict[0]


def resumed_history(checkpoint: str | None) -> list[dict]:
    """The log records of the run up to ``checkpoint`` (its trainer_state.json), so a resumed run's history covers every step."""
    if not checkpoint:
        return []
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return [record for record in state.get("log_history", []) if "train_runtime" not in record]

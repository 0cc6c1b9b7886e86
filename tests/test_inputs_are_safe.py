"""No command writes into, replaces or deletes a folder that is, holds or lies inside one of its inputs.

The table runs each writing command's real ``main(argv)`` in this process (a fresh interpreter per row would cost
~10 s of imports each) with its output on an input, on the folder holding it, inside it, or on a link to it, and
with ``--overwrite...`` asked: every row must answer one ``error:`` line, exit 2, and leave every file and folder as
it was. Two rows run as real processes. The adapter the table uses is trained once here, and also proves what a run
records (absolute paths, the base's fingerprint), that a finished run keeps no checkpoints and that its files get
ordinary permissions.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_helpers import export, inference, make_tiny_qwen, train_lora, train_prompt_tuning, train_qlora
from qwen_helpers.benchmark import __main__ as benchmark
from qwen_helpers.models.checks import check_adapter_folder
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.common.files import give_default_modes, model_fingerprint, new_staging_folder, recorded_path, swap_in
from qwen_helpers.training.sft import train

DATA = Path(__file__).resolve().parent.parent / "data"


def tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed) -> (kind, size, mtime): what is made, removed or changed shows."""
    listing = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = "link" if path.is_symlink() else "folder" if path.is_dir() else "file"
        listing[str(path.relative_to(root))] = (
            kind,
            info.st_size if kind == "file" else 0,
            info.st_mtime_ns if kind != "folder" else 0,
        )
    return listing


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder made of hard links: a real, loadable folder that costs no disk."""
    shutil.copytree(source, target, copy_function=os.link)
    return target


def default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_path):
    """work/models/base (a copy of the tiny model), work/data/train.json, work/evaldata/eval.json, work/adapters/adapter
    (trained on the base, named by a relative path), links to each, and an empty folder to run from."""
    root = tmp_path_factory.mktemp("inputs")
    work = root / "work"
    (work / "models").mkdir(parents=True)
    base = linked_copy(Path(tiny_path), work / "models" / "base")
    (base / "MY_NOTES.txt").write_text("the user's own notes")
    for name, count in (("data/train.json", 8), ("evaldata/eval.json", 4)):
        (work / name).parent.mkdir()
        records = json.loads((DATA / "train.json").read_text(encoding="utf-8"))[:count]
        (work / name).write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    (work / "data" / "thesis.txt").write_text("a neighbour of the data file")
    (work / "empty").mkdir()
    previous = os.getcwd()
    os.chdir(work)  # the run names its base, data and output by relative paths, as the tester did
    try:
        args = KitTrainingArguments(
            output_dir="adapters/adapter",
            max_steps=2,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=1,
            disable_tqdm=True,
            report_to="none",
        )
        train(
            ModelArguments(model_path="models/base"),
            DataArguments(data_path="data/train.json", max_length=128),
            args,
            "lora",
            LoraArguments(),
        )
    finally:
        os.chdir(previous)
    (work / "links").mkdir()
    for name, target in (
        ("base", "models/base"),
        ("train.json", "data/train.json"),
        ("eval.json", "evaldata/eval.json"),
        ("adapter", "adapters/adapter"),
    ):
        (work / "links" / name).symlink_to(work / target)
    return work


def test_a_finished_run_records_absolute_paths_and_the_base_keeps_no_checkpoint_and_plain_modes(work):
    adapter = work / "adapters" / "adapter"
    run = json.loads((adapter / "run_config.json").read_text())
    peft_config = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        run["model_path"] == peft_config["base_model_name_or_path"] == str(work / "models" / "base")
    )  # typed as models/base
    assert run["data_path"] == str(work / "data" / "train.json") and run["output_dir"] == str(adapter)
    assert run["base_fingerprint"] == model_fingerprint(work / "models" / "base") and set(run["base_fingerprint"]) == {
        "config",
        "weights",
    }
    assert (
        not list(adapter.glob("checkpoint-*")) and (adapter / "adapter_model.safetensors").is_file()
    )  # saved every step, none kept
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in adapter.iterdir()}
    assert set(modes.values()) == {oct(default_mode())}, modes  # safetensors' own files were owner-only (0600)
    assert (
        recorded_path("tiny") == "tiny" and recorded_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    )  # aliases and hub ids as typed
    assert model_fingerprint("Qwen/Qwen3-0.6B") is None


def test_staged_files_get_the_modes_an_ordinary_write_gives_under_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    previous = os.umask(0o027)
    try:
        staging = new_staging_folder(tmp_path / "out")
        save_file({"weight": torch.zeros(2)}, str(staging / "adapter_model.safetensors"))
        (staging / "sub").mkdir()
        save_file({"weight": torch.zeros(2)}, str(staging / "sub" / "model.safetensors"))
        assert (staging / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o600  # what the library leaves
        folder = swap_in(staging, tmp_path / "out")
    finally:
        os.umask(previous)
    assert {oct(path.stat().st_mode & 0o777) for path in folder.rglob("*") if path.is_file()} == {oct(0o640)}
    assert oct(folder.stat().st_mode & 0o777) == oct(0o750)
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"x")
    old.chmod(0o600)
    os.utime(old, (1, 1))  # written long before: ``since`` leaves it alone
    give_default_modes(tmp_path, since=1000)
    assert old.stat().st_mode & 0o777 == 0o600


FOLDER_RELATIONS = {  # how the output stands to the input: the output path and the word the line must use
    "same": (lambda input_path: input_path, " is the "),
    "parent": (lambda input_path: input_path.parent, " holds the "),
    "child": (lambda input_path: input_path / "run", " lies inside the "),
}
LINKS = {
    "models/base": "links/base",
    "data/train.json": "links/train.json",
    "evaldata/eval.json": "links/eval.json",
    "adapters/adapter": "links/adapter",
}
TRAIN_INPUTS = {
    "--model_path": "models/base",
    "--data_path": "data/train.json",
    "--eval_data_path": "evaldata/eval.json",
}
ADAPTER_INPUTS = {
    "--adapter_path": "adapters/adapter",
    "--model_path": "models/base",
    "the base recorded by": "models/base",
}


def table():
    """(id, command's main, argv with {output}, the input, its label, how the output relates to it)."""
    rows = []
    training = {
        "train_lora": train_lora.main,
        "train_qlora": train_qlora.main,
        "train_prompt_tuning": train_prompt_tuning.main,
    }
    for name, main in training.items():
        for label, input_path in TRAIN_INPUTS.items():
            flags = [
                "--model_path",
                "models/base",
                "--data_path",
                "data/train.json",
                "--eval_data_path",
                "evaldata/eval.json",
                "--output_dir",
                "{output}",
                "--overwrite_output_dir",
                "True",
                "--max_steps",
                "1",
            ]
            for relation in ("same", "parent", "link") + (("child",) if label == "--model_path" else ()):
                rows.append((f"{name}-{label}-{relation}", main, flags, input_path, label, relation))
    for kind in ("hf", "gguf"):  # export is the one merge command
        for label, input_path in ADAPTER_INPUTS.items():
            model = [] if label == "the base recorded by" else ["--model_path", "models/base"]
            flags = [
                "--adapter_path",
                "adapters/adapter",
                *model,
                "--output_dir",
                "{output}",
                "--format",
                kind,
                "--overwrite_output_dir",
                "True",
                "--verify_data",
                "data/train.json",
            ]
            main = export.main
            for relation in ("same", "parent", "child", "link"):
                rows.append((f"{kind}-{label}-{relation}", main, flags, input_path, label, relation))
    rows.append(
        (
            "gguf---verify_data-parent",
            export.main,
            [
                "--adapter_path",
                "adapters/adapter",
                "--output_dir",
                "{output}",
                "--format",
                "gguf",
                "--overwrite_output_dir",
                "True",
                "--verify_data",
                "data/train.json",
            ],
            "data/train.json",
            "--verify_data",
            "parent",
        )
    )
    for label, input_path in {"--data_path": "data/train.json", **ADAPTER_INPUTS}.items():
        model = [] if label == "the base recorded by" else ["--model_path", "models/base"]
        flags = [
            "--adapter_path",
            "adapters/adapter",
            *model,
            "--data_path",
            "data/train.json",
            "--output_file",
            "{output}",
            "--overwrite_output_file",
            "True",
        ]
        for relation in ("same", "link") if label == "--data_path" else ("child",):
            rows.append((f"output_file-{label}-{relation}", inference.main, flags, input_path, label, relation))
    for relation in ("same", "child", "link"):
        rows.append(
            (
                f"benchmark---model_path-{relation}",
                benchmark.main,
                ["--model_path", "models/base", "--folder", "{output}"],
                "models/base",
                "--model_path",
                relation,
            )
        )
    rows.append(
        (
            "benchmark---data-parent",
            benchmark.main,
            ["--preset", "tiny", "--data", "data/train.json", "--folder", "{output}"],
            "data/train.json",
            "--data",
            "parent",
        )
    )
    return rows


@pytest.mark.parametrize("row", table(), ids=[row[0] for row in table()])
def test_no_command_writes_into_its_inputs(row, work, monkeypatch, capsys):
    _, main, flags, input_path, label, relation = row
    monkeypatch.chdir(work)
    if relation == "link":
        output, word = LINKS[input_path], " (a link to "
    else:
        output, word = str(FOLDER_RELATIONS[relation][0](Path(input_path))), FOLDER_RELATIONS[relation][1]
    argv = [flag.replace("{output}", output) for flag in flags]
    before = tree(work.parent)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    flag = flags[flags.index("{output}") - 1]
    assert (
        f"{flag} {output}" in lines[0]
        and word in lines[0]
        and f"({label}" in lines[0]
        and "no overwrite flag allows this" in lines[0]
    )
    assert tree(work.parent) == before  # nothing made (no output or staging folder), nothing removed, nothing changed


@pytest.mark.parametrize(
    "main, argv, expected",
    [
        (
            train_lora.main,
            ["--output_dir", ".", "--model_path", "{work}/models/base", "--data_path", "{work}/data/train.json"],
            "is (or holds) the working folder",
        ),
        (
            train_lora.main,
            ["--output_dir", "..", "--model_path", "{work}/models/base", "--data_path", "{work}/data/train.json"],
            "holds the folder",
        ),
        (
            train_lora.main,
            ["--output_dir", "", "--model_path", "{work}/models/base", "--data_path", "{work}/data/train.json"],
            "--output_dir is empty",
        ),
        (make_tiny_qwen.main, [".", "--overwrite_output_dir", "True"], "output_dir . is (or holds) the working folder"),
        (make_tiny_qwen.main, ["", "--overwrite_output_dir", "True"], "output_dir is empty"),
        (
            export.main,
            ["--adapter_path", "{work}/adapters/adapter", "--output_dir", ".", "--overwrite_output_dir", "True"],
            "is (or holds) the working folder",
        ),
    ],
)
def test_the_working_folder_and_an_empty_name_are_refused_up_front(main, argv, expected, work, monkeypatch, capsys):
    monkeypatch.chdir(work / "empty")
    before = tree(work.parent)
    assert (
        main(
            [
                flag.replace("{work}", str(work))
                for flag in argv + ["--overwrite_output_dir", "True"] * (main is train_lora.main)
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    assert tree(work.parent) == before  # no ..staging- or ..retired- folders, nothing removed


def test_the_refusal_is_one_line_and_exit_2_from_a_real_process(work):
    """The tester's two reports, end to end: a run into its base folder, an export over its base (overwrite flag on)."""
    before = tree(work.parent)
    runs = [
        [
            "train_lora",
            "--model_path",
            "models/base",
            "--data_path",
            "data/train.json",
            "--output_dir",
            "models/base",
            "--max_steps",
            "1",
            "--overwrite_output_dir",
            "True",
        ],
        [
            "export",
            "--adapter_path",
            "adapters/adapter",
            "--output_dir",
            "models/base",
            "--format",
            "hf",
            "--overwrite_output_dir",
            "True",
        ],
    ]
    for module, *flags in runs:
        finished = subprocess.run(
            [sys.executable, "-m", f"qwen_helpers.{module}", *flags],
            capture_output=True,
            text=True,
            cwd=work,
            timeout=300,
        )
        assert finished.returncode == 2 and "Traceback" not in finished.stderr, finished.stderr[-2000:]
        assert (
            finished.stderr.startswith("error: --output_dir models/base is the folder")
            and finished.stderr.count("\n") == 1
        )
        assert "Loading weights" not in finished.stdout + finished.stderr  # refused before any model loaded
    assert tree(work.parent) == before and (work / "models" / "base" / "MY_NOTES.txt").is_file()


@pytest.fixture
def other_base(work, tmp_path):
    """A folder named like the adapter's base, elsewhere, holding a model of the same shapes that is not that base."""
    folder = linked_copy(work / "models" / "base", tmp_path / "models" / "base")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()  # a hard link: write a new file, the original stays as it was
    (folder / "config.json").write_text(json.dumps(config | {"rms_norm_eps": config["rms_norm_eps"] * 10}))
    return folder


def test_an_adapter_loads_its_recorded_base_from_any_folder_and_refuses_a_changed_one(
    work, other_base, monkeypatch, capsys
):
    adapter = work / "adapters" / "adapter"
    monkeypatch.chdir(
        other_base.parent.parent
    )  # "models/base" here is another model: the record is absolute, so it is not used
    assert check_adapter_folder(str(adapter), None) == str(work / "models" / "base")
    argv = ["--adapter_path", str(adapter), "--model_path", "models/base", "--instruction", "hi"]
    assert inference.main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"error: --adapter_path {adapter} was trained on another base than models/base: its config.json does not match"
    )
    assert 'delete "base_fingerprint"' in line and "\n" not in line
    assert export.main(["--check", "vllm", "--adapter_path", str(adapter), "--model_path", "models/base"]) == 2
    assert "its config.json does not match" in capsys.readouterr().err
    extra = other_base / "model-extra.safetensors"
    extra.write_bytes(b"")
    with pytest.raises(Exception, match=r"its config.json and its weight files \(names or sizes\) do not match"):
        check_adapter_folder(str(adapter), "models/base")


def test_an_adapter_without_a_fingerprint_still_loads_on_another_base(work, other_base, tmp_path):
    adapter = shutil.copytree(work / "adapters" / "adapter", tmp_path / "old-adapter")
    run = json.loads((adapter / "run_config.json").read_text())
    del run["base_fingerprint"]  # as saved before fingerprints were recorded
    (adapter / "run_config.json").write_text(json.dumps(run))
    assert check_adapter_folder(str(adapter), str(other_base)) == str(other_base)


def test_a_merge_run_elsewhere_uses_the_recorded_base_and_writes_plain_modes(work, other_base, monkeypatch, tmp_path):
    monkeypatch.chdir(other_base.parent.parent)  # "models/base" here is another model; the adapter recorded its own
    merged = tmp_path / "merged"
    adapter = str(work / "adapters" / "adapter")
    assert export.main(["--format", "hf", "--adapter_path", adapter, "--output_dir", str(merged)]) == 0

    def eps(folder):
        return json.loads((folder / "config.json").read_text())["rms_norm_eps"]

    assert eps(merged) == eps(work / "models" / "base") != eps(other_base)  # merged into the base it was trained on
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in merged.iterdir()}
    assert set(modes.values()) == {oct(default_mode())} and "model.safetensors" in modes, modes


@pytest.mark.parametrize("command, data_file", [("train_dpo", "preference.json"), ("train_grpo", "grpo_toy.json")])
def test_preference_and_rl_commands_never_write_into_their_inputs(work, monkeypatch, capsys, command, data_file):
    """train_dpo and train_grpo follow the same rule: not the base, not the data's folder, not the adapter they continue."""
    import importlib

    main = importlib.import_module(f"qwen_helpers.{command}").main
    folder = work / f"{command}-data"
    folder.mkdir(exist_ok=True)
    shutil.copy(DATA / data_file, folder / data_file)
    monkeypatch.chdir(work)
    before = tree(work)
    for output, label in ((work / "models" / "base", "--model_path"), (folder, "--data_path"),
                          (work / "adapters" / "adapter" / "run", "--adapter_path")):
        code = main(["--model_path", "models/base", "--data_path", str(folder / data_file), "--adapter_path",
                     "adapters/adapter", "--output_dir", str(output), "--overwrite_output_dir", "True",
                     "--max_steps", "1"])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and f"({label})" in errors[0], (label, errors)
    assert tree(work) == before, "a refused command changed its inputs"


@pytest.mark.parametrize("command, data_file", [("train_dpo", "preference.json"), ("train_grpo", "grpo_toy.json")])
def test_a_continued_adapter_keeps_its_recorded_base_safe_and_trains_on_it_only(work, monkeypatch, capsys, tmp_path,
                                                                                 command, data_file):
    """--adapter_path without --model_path: the base the adapter records is an input (an --output_dir on it, even with
    --overwrite_output_dir, once deleted its weights), and an adapter recorded on another base is refused, not trained
    silently on --model_path's default."""
    import importlib

    main = importlib.import_module(f"qwen_helpers.{command}").main
    base = work / "models" / "base"
    flags = ["--data_path", str(DATA / data_file), "--overwrite_output_dir", "True", "--max_steps", "1"]
    before = tree(work)
    assert main([*flags, "--adapter_path", str(work / "adapters" / "adapter"), "--output_dir", str(base)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --output_dir {base} is the folder") and "(the base recorded by" in line, line
    unrecorded = shutil.copytree(work / "adapters" / "adapter", tmp_path / "adapter")
    run = json.loads((unrecorded / "run_config.json").read_text())
    del run["base_fingerprint"]  # as another tool saves it: a path, no fingerprint to prove a copy is that base
    (unrecorded / "run_config.json").write_text(json.dumps(run))
    assert main([*flags, "--adapter_path", str(unrecorded), "--output_dir", str(tmp_path / "out")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"was trained on {base}, but this run would train it on --model_path tiny" in line, line
    assert tree(work) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, data_file", [("train_dpo", "preference.json"), ("train_grpo", "grpo_toy.json")])
def test_preference_and_rl_runs_record_what_sft_records(work, monkeypatch, tmp_path, command, data_file):
    """A relative --model_path is recorded absolute (inference from another folder loaded another model, or tried the
    hub), with the base's fingerprint, and output_dir is the published folder, not the deleted staging folder."""
    import importlib

    main = importlib.import_module(f"qwen_helpers.{command}").main
    monkeypatch.chdir(work)
    output = tmp_path / "run"
    assert main(["--model_path", "models/base", "--data_path", str(DATA / data_file), "--output_dir", str(output),
                 "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations" if command == "train_grpo"
                 else "--beta", "4" if command == "train_grpo" else "0.1", "--max_completion_length" if command == "train_grpo"
                 else "--seed", "2" if command == "train_grpo" else "0", "--save_strategy", "no", "--report_to", "none",
                 "--disable_tqdm", "True"]) == 0
    run = json.loads((output / "run_config.json").read_text())
    assert run["model_path"] == str(work / "models" / "base") and run["data_path"] == str(DATA / data_file)
    assert run["output_dir"] == str(output) and run["base_fingerprint"] == model_fingerprint(work / "models" / "base")

"""Files and folders the kit writes: sizes, atomic writes, output checks, and staging folders swapped in whole.

Nothing a user has is replaced unless they named it for replacement, and nothing is left half-written:
a file is written under a temporary name and renamed over its target (``os.replace`` is atomic on one
file system); a run writes into a staging folder beside its target and is swapped in only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import KitError

RUN_CONFIG = "run_config.json"  # the kit's record of a run, beside every adapter (written by run.config.write_run_config)

STAGING_MARK = ".staging-"  # .<name>.staging-XXXX beside the target: a run in progress (or interrupted)
RETIRED_MARK = ".retired-"  # .<name>.retired-XXXX: the previous folder, for the instant of the swap


class OutputExistsError(KitError, FileExistsError):
    """A target that already holds something the user did not name for replacement."""


class OutputIsInputError(OutputExistsError):
    """An output that is, holds or lies inside one of the command's inputs (no overwrite flag allows it)."""


# ---------------------------------------------------------------------------------------------- sizes


def folder_size(path: str | os.PathLike, pattern: str = "*") -> int:
    """Bytes on disk of the files matching ``pattern`` directly inside ``path``."""
    return sum(file.stat().st_size for file in Path(path).glob(pattern) if file.is_file())


def base_weights_size(model_path: str) -> int | None:
    """Bytes of a local checkpoint's weight files (None for a hub id not in a local folder)."""
    from .tiny import resolve_model_path

    path = Path(resolve_model_path(model_path))
    if not path.is_dir():
        return None
    return folder_size(path, "*.safetensors") + folder_size(path, "*.bin")


def human_bytes(size: float) -> str:
    """``83.0 KiB``, ``1.2 GiB``: sizes for people."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}"


# Keys every save of a checkpoint rewrites: they say nothing about which model it is.
FINGERPRINT_SKIPPED_KEYS = ("transformers_version", "_name_or_path")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def model_fingerprint(model_path: str | os.PathLike | None) -> dict | None:
    """A cheap identity of a local checkpoint, recorded beside an adapter: a hash of its config.json (less what every
    save rewrites) and one of its weight files' names and sizes and shard index. No weight is read; None for a hub
    id."""
    folder = local_model_folder(model_path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        indexes = sorted(folder.glob("*.index.json"))
        index = [json.loads(path.read_text(encoding="utf-8")).get("weight_map") for path in indexes]
    except (OSError, ValueError):
        return None
    files = [path for pattern in ("*.safetensors", "*.bin") for path in folder.glob(pattern) if path.is_file()]
    weights = sorted((path.name, path.stat().st_size) for path in files)
    return {"config": _digest({key: value for key, value in config.items() if key not in FINGERPRINT_SKIPPED_KEYS}),
            "weights": _digest([weights, index])}


# ---------------------------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _with_default_mode(path: Path, folder: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (owner-only) the permissions an ordinary ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def give_default_modes(folder: str | os.PathLike, since: float | None = None) -> None:
    """Give the files under ``folder`` (those modified at or after ``since``) the permissions a plain ``open`` gives.

    safetensors 0.8 writes each file through a temporary file, so adapter and model weights came out owner-only
    (0600) beside 0644 tokenizer and config files.
    """
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink() and (since is None or path.stat().st_mtime >= since):
            _with_default_mode(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a truncated mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        _with_default_mode(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------- output checks


def is_nonempty_folder(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.iterdir())


def local_model_folder(model_path: str | os.PathLike | None) -> Path | None:
    """The folder on this machine that ``model_path`` names (a tiny alias: its cache folder); else None."""
    from .tiny import alias_cache_folder

    if not model_path:
        return None
    cached = alias_cache_folder(model_path)
    if cached is not None:
        return cached
    folder = Path(model_path).expanduser()
    return folder if folder.is_dir() else None


def recorded_path(path: str | os.PathLike | None) -> str | None:
    """How a run records a path: absolute for a file or folder on this machine (so it means the same from any
    working folder), as typed for a tiny alias or a hub id."""
    from .tiny import TINY_ALIASES

    if not path or str(path) in TINY_ALIASES or not Path(path).expanduser().exists():
        return None if path is None else str(path)
    return os.path.abspath(Path(path).expanduser())


def _input_locations(source: str | os.PathLike | None) -> list[Path]:
    """Where an input lies on this machine: the path as given and, for a tiny alias, its cache folder."""
    from .tiny import alias_cache_folder

    if not source:
        return []
    locations = [Path(source).expanduser(), alias_cache_folder(source)]
    return [location for location in locations if location is not None and location.exists()]


def _relation(output: Path, source: Path) -> str | None:
    """How ``output`` stands to ``source`` (both resolved): "is", "holds" or "lies inside"; None when apart."""
    if output == source:
        return "is"
    if output in source.parents:
        return "holds"
    if source in output.parents:
        return "lies inside"
    return None


def check_not_an_input(path: str | os.PathLike, flag: str, inputs: dict[str, str | os.PathLike | None],
                       example: str = "outputs/run", folder: bool = True) -> None:
    """Refuse an output that is, holds or lies inside one of the command's inputs, whatever the overwrite flag says.

    ``inputs`` maps how the user named each input ("--model_path", "the base recorded by X") to its path; a tiny
    alias stands for its cache folder, a hub id or a path that does not exist is skipped (there is nothing to lose).
    Links are followed, so a symlink to an input is refused too. An output folder must also not be (or hold) the
    working folder: a run replaces its output folder whole. The one check every command that writes calls.
    """
    noun = "folder" if folder else "file"
    if not str(path).strip():
        raise OutputIsInputError(f"{flag} is empty; name a new {noun}, e.g. {flag} {example}.")
    target = Path(path).expanduser().resolve()  # follows links; a missing tail is kept as written
    shown = f"{path} (a link to {target})" if Path(path).is_symlink() else str(path)
    advice = f"choose a {noun} outside it, e.g. {flag} {example}; no overwrite flag allows this"
    for label, source in inputs.items():
        for location in _input_locations(source):
            relation = _relation(target, location.resolve())
            if relation:
                kind = "folder" if location.is_dir() else "file"
                where = source if location == Path(str(source)) else f"{source}, at {location}"
                raise OutputIsInputError(f"{flag} {shown} {relation} the {kind} {where} ({label}): writing there would "
                                         f"change or delete an input of this command; {advice}.")
    if folder and _relation(target, Path.cwd().resolve()) in ("is", "holds"):
        raise OutputIsInputError(f"{flag} {shown} is (or holds) the working folder {Path.cwd()}: the output folder is "
                                 f"replaced whole, so it must be a folder of its own; choose a new one, e.g. "
                                 f"{flag} {example}.")


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool = False, overwrite_flag: str = "",
                      inputs: dict | None = None, example: str = "outputs/preds.jsonl") -> None:
    """Refuse an output file that is an input or lies in one, is a folder, or (unless ``overwrite``) holds data."""
    check_not_an_input(path, flag, inputs or {}, example, folder=False)
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder; give a file name such as {path / 'predictions.jsonl'}.")
    if path.is_file() and path.stat().st_size > 0 and not overwrite:
        allow = f", or pass {overwrite_flag} True to replace it" if overwrite_flag else ""
        raise OutputExistsError(f"{flag} {path} already exists ({human_bytes(path.stat().st_size)}); choose another file name{allow}.")


def check_output_folder(path: str | os.PathLike, flag: str, overwrite: bool = False, overwrite_flag: str = "",
                        inputs: dict | None = None, example: str = "outputs/run") -> None:
    """Refuse an output folder that is, holds or lies in an input, is a file, or (unless ``overwrite``) is not empty."""
    check_not_an_input(path, flag, inputs or {}, example)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a file, not a folder; choose a folder name.")
    if is_nonempty_folder(path) and not overwrite:
        allow = f", or pass {overwrite_flag} True to replace its contents" if overwrite_flag else ""
        raise OutputExistsError(f"{flag} {path} already holds files; choose an empty or new folder{allow}.")


def unused_path(path: str | os.PathLike) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first name not taken (two runs in the same second get two folders)."""
    path, number = Path(path), 1
    candidate = path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


# ---------------------------------------------------------------------------------------------- staging folders


def staging_folders(target: str | os.PathLike) -> list[Path]:
    """Staging folders left beside ``target`` by runs that did not finish, newest first."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    found = [path for path in target.parent.glob(f".{target.name}{STAGING_MARK}*") if path.is_dir()]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def new_staging_folder(target: str | os.PathLike) -> Path:
    """An empty folder beside ``target`` (same file system, so the final swap is a rename), named after it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_MARK}", dir=target.parent))
    _with_default_mode(staging, folder=True)
    return staging


def swap_in(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``staging`` the new ``target``: the old target is renamed aside, the staging folder renamed in, the old one removed.

    Both renames are within one folder, so each is atomic; the old folder is deleted only once the new
    one is in place.
    """
    staging, target = Path(staging), Path(target)
    give_default_modes(staging)
    retired = None
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}{RETIRED_MARK}", dir=target.parent))
        os.replace(target, retired / target.name)
    os.replace(staging, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


def remove_folders(folders) -> None:
    """Delete folders (stale staging folders of a run the user chose to replace)."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def save_figure(figure, path: str | os.PathLike) -> None:
    """Write a command's matplotlib figure to ``path`` and close it (pyplot keeps every open figure alive otherwise)."""
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100)
    plt.close(figure)

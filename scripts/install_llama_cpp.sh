#!/usr/bin/env bash
# Install llama-cpp-python (the gguf extra's runtime and quantizer) as a portable build, into the active Python.
#
# Why: pip's default build of llama-cpp-python compiles llama.cpp with -march=native. On CPUs that report AVX-512
# and AMX, that build segfaults while decoding a q8_0 or q4_k_m GGUF (seen on this project's CI machines), and a
# wheel built natively on one machine can die with SIGILL on the next. This build targets AVX2/FMA/F16C, which
# every x86-64 CPU of the last decade has, and skips the multimodal library the kit never loads.
#
# pip's wheel cache does not key on CMAKE_ARGS, so a native wheel cached earlier could come back. The wheel is built
# with --no-cache-dir and kept in the kit's own cache under a key of the version, the flags and the Python, so a
# second install on the same machine takes seconds and can only ever reuse a portable wheel.
#
#   bash scripts/install_llama_cpp.sh          # ~8-9 min the first time on 2 cores, seconds afterwards
set -euo pipefail
VERSION="0.3.36"  # keep in step with pyproject.toml's gguf extra and gguf_export.LLAMA_CPP_PYTHON_VERSION
PYTHON="${PYTHON:-python}"
case "$(uname -m)" in
    x86_64|amd64)
        FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
        FLAGS="$FLAGS -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF"
        FLAGS="$FLAGS -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;;
    *)
        FLAGS="-DGGML_NATIVE=OFF" ;;
esac
FLAGS="$FLAGS -DLLAVA_BUILD=OFF"
KEY="$(printf '%s\n' "$VERSION" "$FLAGS" "$("$PYTHON" -c 'import sys, platform; print(sys.version_info[:2], platform.machine())')" | sha256sum | cut -c1-16)"
WHEELS="${QWEN_HELPERS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen_helpers}/wheels/llama_cpp_python-$VERSION-portable-$KEY"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "Building llama-cpp-python $VERSION without native CPU flags ($FLAGS) into $WHEELS"
    rm -rf "$WHEELS.partial" && mkdir -p "$WHEELS.partial"
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$PYTHON" -m pip wheel --quiet --no-cache-dir --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$WHEELS.partial"
    rm -rf "$WHEELS" && mv "$WHEELS.partial" "$WHEELS"
fi
# --force-reinstall --no-deps replaces a llama-cpp-python of the same version built some other way; the second call
# brings its few pure-Python dependencies.
"$PYTHON" -m pip install --quiet --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"$PYTHON" -m pip install --quiet "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
"$PYTHON" - <<'PY'
import llama_cpp
info = llama_cpp.llama_print_system_info().decode()
print(f"llama-cpp-python {llama_cpp.__version__}: {info.strip()}")
if "AVX512 = 1" in info or "AMX_INT8 = 1" in info:
    raise SystemExit("llama-cpp-python was built with AVX-512/AMX kernels; rerun scripts/install_llama_cpp.sh")
PY

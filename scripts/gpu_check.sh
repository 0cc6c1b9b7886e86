#!/usr/bin/env bash
# One GPU check: on a CUDA machine (sized for under 8 minutes on one H200 before the TRL rows, which add
# 2 processes of the 7B shape and 7 of the 0.5B one) it measures the 7B-shape table (0.5B full fine-tuning
# as the 1x row; LoRA fp16/bf16 with and without checkpointing; prompt tuning; QLoRA NF4), the kit / plain
# transformers+peft and kit / TRL SFTTrainer ratios (LoRA at 0.5B: --repeats interleaved rounds, 3 by default),
# the variable-length batching comparison and batch-1 decode with the adapter unmerged vs merged. It writes
# docs/benchmarks/<date>-<gpu>/ (results.json/csv/md, decode.json, charts) and prints the table.
#
#   scripts/gpu_check.sh                 # CUDA: the real shapes; CPU: the tiny variant (CI runs it with --repeats 1)
#   scripts/gpu_check.sh --device cpu    # force the CPU variant
#   scripts/gpu_check.sh --folder DIR    # write somewhere else
#   scripts/gpu_check.sh --bundle DIR    # a machine with no package index: first pip install --no-index from the
#                                        # bundle scripts/offline_bundle.py made (docs/offline-gpu.md)
set -euo pipefail
PYTHON="${PYTHON:-python}"
args=()
bundle=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle=*) bundle="${1#--bundle=}"; shift ;;
        --bundle)
            if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
                echo "gpu_check.sh: --bundle needs the folder scripts/offline_bundle.py make wrote (docs/offline-gpu.md)" >&2
                exit 2
            fi
            bundle="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "$bundle" ]; then  # before the cd: a relative DIR is the caller's; prints the Python to run the check with
    PYTHON="$("$PYTHON" "$(dirname "$0")/offline_bundle.py" install "$bundle")"
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m qwen_helpers.benchmark.suite ${args[@]+"${args[@]}"}

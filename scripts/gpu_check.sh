#!/usr/bin/env bash
# One GPU check: on a CUDA machine (under 8 minutes on one H200) it measures the 7B-shape table
# (0.5B full fine-tuning as the 1x row; LoRA fp16/bf16 with and without checkpointing; prompt tuning;
# QLoRA NF4), the kit / plain transformers+peft ratios, the variable-length batching comparison and
# batch-1 decode with the adapter unmerged vs merged. It writes docs/benchmarks/<date>-<gpu>/
# (results.json/csv/md, decode.json, charts) and prints the table.
#
#   scripts/gpu_check.sh                 # CUDA: the real shapes; CPU: the tiny variant (what CI runs)
#   scripts/gpu_check.sh --device cpu    # force the CPU variant
#   scripts/gpu_check.sh --folder DIR    # write somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m qwen_helpers.benchmark.suite "$@"

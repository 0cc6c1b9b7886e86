#!/usr/bin/env bash
# One GPU check: on a CUDA machine (under 8 minutes on one H200) it measures the 7B-shape table
# (0.5B full fine-tuning as the 1x row; LoRA fp16/bf16 with and without checkpointing; prompt tuning;
# QLoRA NF4), the kit / plain transformers+peft ratios, the variable-length batching comparison and
# batch-1 decode with the adapter unmerged vs merged. It writes docs/benchmarks/<date>-<gpu>/
# (results.json/csv/md, decode.json, charts) and prints the table. On CUDA it then runs train_dpo and
# train_grpo on the same 7B shape (LoRA bf16, a few steps each, the commands' own path; about 2 more
# minutes): their summaries are printed and their run folders go to outputs/gpu_check_preference/.
#
#   scripts/gpu_check.sh                 # CUDA: the real shapes; CPU: the tiny variant (what CI runs)
#   scripts/gpu_check.sh --device cpu    # force the CPU variant
#   scripts/gpu_check.sh --folder DIR    # write somewhere else
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m qwen_helpers.benchmark.suite "$@"

# DPO and GRPO on the 7B shape: CUDA only (the CPU variant, what CI runs, stops above).
case " $* " in *" --device cpu "* | *" --device=cpu "*) exit 0 ;; esac
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || exit 0
MODEL="$("$PYTHON" -c 'from qwen_helpers.presets import preset_checkpoint; print(preset_checkpoint("qwen2.5-7b", "cuda"))')"
RUNS=outputs/gpu_check_preference
COMMON=(--model_path "$MODEL" --bf16 True --save_strategy no --report_to none --disable_tqdm True --overwrite_output_dir True)
echo "== 7B: DPO, LoRA bf16 (train_dpo, 5 steps of 8 pairs)"
"$PYTHON" -m qwen_helpers.train_dpo "${COMMON[@]}" --data_path data/preference.json \
    --eval_data_path data/preference_test.json --max_steps 5 --per_device_train_batch_size 8 --max_length 512 \
    --eval_strategy steps --eval_steps 5 --output_dir "$RUNS/dpo-qwen2.5-7b"
echo "== 7B: GRPO, LoRA bf16 (train_grpo, 3 steps of 2 prompts x 8 completions of up to 128 tokens)"
"$PYTHON" -m qwen_helpers.train_grpo "${COMMON[@]}" --data_path data/grpo_toy.json --reward language,exact_match \
    --max_steps 3 --per_device_train_batch_size 16 --num_generations 8 --max_completion_length 128 \
    --output_dir "$RUNS/grpo-qwen2.5-7b"

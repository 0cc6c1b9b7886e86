"""Train a LoRA adapter on instruction data (FP16 mixed precision on a GPU, fp32 on a CPU).

    python -m qwen_helpers.train_lora --model_path path/to/qwen --data_path data/train.json \
        --output_dir outputs/lora --fp16 True

Every TrainingArguments flag works too; ``--load_in_4bit True`` gives QLoRA (see train_qlora).
"""

import sys

from .cli import run_training_command


def main(argv=None) -> int:
    return run_training_command("lora", argv)


if __name__ == "__main__":
    sys.exit(main())

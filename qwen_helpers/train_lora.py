"""Train a LoRA adapter on instruction data (FP16 mixed precision on a GPU, fp32 on a CPU).

    python -m qwen_helpers.train_lora --model_path path/to/qwen --data_path data/train.json \
        --output_dir outputs/lora --fp16 True

Every TrainingArguments flag works too; ``--load_in_4bit True`` gives QLoRA (see train_qlora).
"""

import sys

from .cli import run_training_command
from .common.errors import command_boundary


@command_boundary  # a user error is one line on stderr and exit code 2 (--debug shows the traceback)
def main(argv=None) -> int:
    return run_training_command("lora", argv)


if __name__ == "__main__":
    sys.exit(main())

"""Train a soft prompt (prompt tuning) for classification or generation.

    python -m qwen_helpers.train_prompt_tuning --model_path path/to/qwen \
        --data_path data/classify_train.json --num_virtual_tokens 20 --prompt_init_text "分类任务："
"""

import sys

from .cli import run_training_command
from .common.errors import command_boundary


@command_boundary  # a user error is one line on stderr and exit code 2 (--debug shows the traceback)
def main(argv=None) -> int:
    return run_training_command("prompt_tuning", argv)


if __name__ == "__main__":
    sys.exit(main())

"""Train a LoRA adapter on a 4-bit NF4 base (QLoRA): the same flags as train_lora, 4-bit and checkpointing on.

    python -m qwen_helpers.train_qlora --data_path data/train.json --output_dir outputs/qlora

Gradient checkpointing is on by default: without it, 4-bit can need more memory than 16-bit LoRA,
because prepare_model_for_kbit_training upcasts the unquantised embeddings and lm_head to fp32.
"""

import sys

from .cli import run_training_command
from .common.errors import command_boundary


@command_boundary  # a user error is one line on stderr and exit code 2 (--debug shows the traceback)
def main(argv=None) -> int:
    return run_training_command("qlora", argv)


if __name__ == "__main__":
    sys.exit(main())

"""qwen_helpers: the thin package behind the Qwen PEFT notebooks and their command-line tools."""

import warnings

# peft 0.21 still calls transformers' pre-v5 names for activation checkpointing; the warnings say so on
# every model load and are not something a user of this kit can act on.
for _old_name in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
    warnings.filterwarnings("ignore", message=f"`{_old_name}` is deprecated", category=FutureWarning)

# On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional kernel from the Hugging Face hub and logs a
# warning when it cannot; its own CPU kernels are used instead, so there is nothing for a user to fix.
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

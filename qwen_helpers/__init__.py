"""qwen_helpers: the thin package behind the Qwen PEFT notebooks and their command-line tools."""

import warnings

# peft 0.21 still calls transformers' pre-v5 names for activation checkpointing; the warnings say so on
# every model load and are not something a user of this kit can act on.
for _old_name in ("is_gradient_checkpointing", "gradient_checkpointing_enable"):
    warnings.filterwarnings("ignore", message=f"`{_old_name}` is deprecated", category=FutureWarning)

# On AVX512-BF16 CPUs importing bitsandbytes (peft does) asks the Hugging Face hub for an optional kernel; the kit
# lets that import reach an offline hub only, and keeps the failed lookup's warning quiet (its own CPU kernels serve).
from .common.offline_imports import import_bitsandbytes_offline

import_bitsandbytes_offline()

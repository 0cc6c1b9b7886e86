"""Training speed options that are not about batching: Liger's fused kernels and the CPU allocator setting.

Both are checked before the model loads, so a run that cannot use them stops in a second with the reason.
"""

from __future__ import annotations

import importlib.util

from ..common.errors import FlagError
from ..common.families import FAMILIES

# Model types Liger patches and the kit trains (liger_kernel.transformers.monkey_patch's table has many more).
LIGER_MODEL_TYPES = tuple(model_type for model_type, family in FAMILIES.items() if family.liger)


def liger_problem(model_type: str, cuda_available: bool, installed: bool) -> str | None:
    """Why ``--use_liger_kernel True`` cannot run here, or None when it can."""
    if not installed:
        return "liger-kernel is not installed; pip install -e '.[liger]' (Triton kernels, CUDA GPUs only)"
    if not cuda_available:
        return "Liger's kernels are Triton kernels and need a CUDA GPU; drop the flag on a CPU"
    if model_type not in LIGER_MODEL_TYPES:
        return f"this kit applies Liger to model types {', '.join(LIGER_MODEL_TYPES)} only, and the model is {model_type!r}"
    return None


def check_liger(training_args, model_path: str) -> None:
    """Stop before loading the model when ``--use_liger_kernel True`` cannot work, with a one-line reason.

    The Trainer patches the base model inside the peft wrapper (RMSNorm, RoPE, SwiGLU and the fused
    linear + cross-entropy of the head), which serves LoRA, QLoRA and prompt tuning alike.
    """
    if not getattr(training_args, "use_liger_kernel", False):
        return
    import torch

    installed = importlib.util.find_spec("liger_kernel") is not None
    model_type = "unknown"
    if installed and torch.cuda.is_available():
        from transformers import AutoConfig

        from ..common.tiny import resolve_model_path

        try:
            model_type = AutoConfig.from_pretrained(resolve_model_path(model_path)).model_type
        except (OSError, ValueError):  # an unreadable --model_path is reported by the model-folder check that follows
            return
    problem = liger_problem(model_type, torch.cuda.is_available(), installed)
    if problem:
        raise FlagError(f"--use_liger_kernel True: {problem}.")


def apply_cpu_allocator_setting(training_args) -> str | None:
    """Apply ``--cpu_allocator_tuning`` on a CPU run; returns the note to print, or None when it does nothing."""
    if not getattr(training_args, "cpu_allocator_tuning", False) or training_args.device.type != "cpu":
        return None
    from .allocator import tune_cpu_allocator

    tune_cpu_allocator()
    return ("cpu allocator: freed memory stays in the process (--cpu_allocator_tuning True): faster steps on a CPU, "
            "a higher peak RSS that is not returned until the process ends")

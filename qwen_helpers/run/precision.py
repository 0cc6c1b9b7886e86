"""The kit's one precision policy: from the fp16/bf16 request and the device to the dtype the weights load in.

Every path asks :func:`decide_precision` (training arguments, 4-bit compute dtype, inference, benchmark), so
walking ``--fp16 True`` from the flag to the loaded weights' dtype touches this one decision:

- CUDA + fp16 (the default, the seed's recipe): base weights fp16, trainable weights fp32, autocast + loss scaling.
- CUDA + bf16: only when asked; a GPU without bf16 (pre-Ampere) is an error for training, fp16 for inference.
- CPU: fp16/bf16 requests run in fp32 with a notice (fp16 matmuls on a CPU are slow and the Trainer refuses them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """What was asked, what runs, and why they differ: the result of :func:`decide_precision`."""

    requested: str  # "fp16", "bf16" or "fp32": the flags as given
    effective: str  # what runs on this device
    device: str  # "cuda" or "cpu"
    reason: str = ""  # why effective differs from requested ("" when they agree)
    notice: str = ""  # one line for the log

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen base weights (and of 4-bit matmuls under ``"auto"``)."""
        return DTYPES[self.effective]

    @property
    def fp16(self) -> bool:
        """The ``TrainingArguments.fp16`` flag (autocast + loss scaling) for this precision."""
        return self.effective == "fp16"

    @property
    def bf16(self) -> bool:
        """The ``TrainingArguments.bf16`` flag (autocast) for this precision."""
        return self.effective == "bf16"

    @property
    def label(self) -> str:
        """Short form for tables: ``bf16``, or ``fp32 (CPU fallback from bf16)``."""
        return f"{self.effective} ({self.reason})" if self.reason else self.effective


def device_type() -> str:
    """'cuda' when a CUDA GPU is visible, else 'cpu' (the kit's two supported devices)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def requested_precision(fp16: bool = False, bf16: bool = False) -> str:
    """The request the flags make: 'fp16', 'bf16' or 'fp32'; both at once is an error."""
    if fp16 and bf16:
        raise ValueError("Pass only one of --fp16 True and --bf16 True.")
    return "fp16" if fp16 else "bf16" if bf16 else "fp32"


def _gpu_name() -> str:
    try:
        return torch.cuda.get_device_name()
    except Exception:  # no driver to ask (a monkeypatched device in tests, or a broken install)
        return "this GPU"


def decide_precision(fp16: bool = False, bf16: bool = False, use_cpu: bool = False, device: str | None = None,
                     bf16_supported: bool | None = None, missing_bf16: Literal["raise", "fp16"] = "raise") -> Precision:
    """The precision a run gets here: the request, unless the device cannot honour it (see the module docstring).

    ``missing_bf16`` says what a bf16 request does on a GPU without bf16: training raises (the user asked for
    it), inference and the benchmark use fp16 instead.
    """
    requested = requested_precision(fp16, bf16)
    device = "cpu" if use_cpu else (device or device_type())
    if requested == "fp32":
        return Precision(requested, "fp32", device, notice="precision: fp32")
    if device != "cuda":
        return Precision(
            requested, "fp32", device, reason=f"CPU fallback from {requested}",
            notice=f"precision: fp32 (--{requested} True asked, but there is no CUDA GPU: mixed precision needs one, so training runs in fp32)",
        )
    if requested == "bf16" and not (torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported):
        if missing_bf16 == "raise":
            raise ValueError(
                f"--bf16 True: {_gpu_name()} has no bf16 support (it needs an Ampere or newer GPU). "
                "Use --fp16 True instead (and keep --max_grad_norm 1.0)."
            )
        return Precision(requested, "fp16", device, reason="no bf16 on this GPU", notice=f"precision: fp16 ({_gpu_name()} has no bf16)")
    scaling = " + loss scaling" if requested == "fp16" else ""
    return Precision(
        requested, requested, device,
        notice=f"precision: {requested} mixed (base weights {requested}, trainable weights fp32, autocast{scaling}) on {_gpu_name()}",
    )


def apply_precision_policy(args) -> str:
    """Decide precision for a TrainingArguments-like object; keep the request, hand the Trainer what runs; return the notice.

    ``args.precision`` keeps the whole decision (``.requested`` is the flag as given); ``args.fp16`` /
    ``args.bf16`` become the effective flags, because the Trainer refuses fp16/bf16 on a CPU.
    """
    precision = decide_precision(args.fp16, args.bf16, use_cpu=getattr(args, "use_cpu", False))
    if precision.device != "cuda":
        args.dataloader_pin_memory = False  # pinned memory only helps copies to a GPU
    args.precision = precision
    args.fp16, args.bf16 = precision.fp16, precision.bf16
    return precision.notice


def base_dtype(args) -> torch.dtype:
    """dtype of the frozen base weights for training arguments (after :func:`apply_precision_policy`)."""
    precision = getattr(args, "precision", None)
    if isinstance(precision, Precision):
        return precision.dtype
    return DTYPES[requested_precision(args.fp16, args.bf16)]


def quantization_compute_dtype(setting: str, base: torch.dtype) -> torch.dtype:
    """dtype of 4-bit matmuls: ``--bnb_4bit_compute_dtype`` when set, else (``"auto"``) the base dtype of the policy."""
    return base if setting == "auto" else getattr(torch, setting)


def inference_precision(run_config: dict | None = None, device: str | None = None) -> Precision:
    """Precision for generation: fp32 on a CPU; on a GPU bf16 when the run asked for bf16 (and the card has it), else fp16.

    fp16 is the seed's ``model.half()``; a bf16-trained Qwen2.5+ can overflow fp16, so it stays bf16.
    """
    run = run_config or {}
    asked_bf16 = run.get("requested_precision", "bf16" if run.get("bf16") else "fp16") == "bf16"
    return decide_precision(fp16=not asked_bf16, bf16=asked_bf16, device=device, missing_bf16="fp16")


def inference_dtype(run_config: dict | None = None) -> torch.dtype:
    """dtype the base loads in for generation (see :func:`inference_precision`)."""
    return inference_precision(run_config).dtype

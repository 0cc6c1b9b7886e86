"""Load the base model and tokenizer (precision comes from :mod:`qwen_helpers.run.precision`), quantise to 4-bit, check target modules."""

from __future__ import annotations

import functools
import importlib.metadata
import os
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass

import torch

from .checks import hub_download_errors
from ..common.families import LINEAR_ATTENTION_MODULES, family_of
from ..common.files import recorded_path
from ..run.precision import device_type, quantization_compute_dtype
from ..common.tiny import chat_template, resolve_model_path

MIN_BITSANDBYTES = "0.48.0"  # first release whose 4-bit quantisation and Linear4bit run on a CPU


def load_tokenizer(model_path: str = "tiny"):
    """Load the tokenizer, with a pad token and right padding for training (left padding is set for generation)."""
    from transformers import AutoTokenizer

    with hub_download_errors(str(model_path)):  # a hub id that cannot be fetched: one line, not transformers' traceback
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_path))
    if tokenizer.pad_token is None:  # Qwen1.5 base checkpoints ship without one
        tokenizer.pad_token = "<|endoftext|>"
    if tokenizer.chat_template is None:  # a folder without one (released Qwen base checkpoints do ship one)
        tokenizer.chat_template = chat_template()
        print(f"note: {model_path} has no chat template; using Qwen2.5's ChatML template (<|im_start|>role ... <|im_end|>).", flush=True)
    tokenizer.padding_side = "right"
    return tokenizer


def check_bitsandbytes(quant_type: str = "nf4") -> None:
    """Raise a clear error when 4-bit loading cannot work here: bitsandbytes missing, too old, or ``quant_type`` unsupported."""
    from packaging.version import Version

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "4-bit loading (--load_in_4bit / train_qlora) needs bitsandbytes, which is not installed. "
            f"Install it with `pip install 'bitsandbytes>={MIN_BITSANDBYTES}'` (it runs on CPU and CUDA)."
        ) from None
    if Version(version) < Version(MIN_BITSANDBYTES):
        raise ImportError(
            f"4-bit loading needs bitsandbytes >= {MIN_BITSANDBYTES} (CPU support); found {version}. "
            f"Upgrade with `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`."
        )
    device = _local_device()
    problem = quantisation_problem(quant_type, device)
    if problem:
        fix = (
            "Use --bnb_4bit_quant_type nf4 (QLoRA's choice for normally distributed weights)."
            if quant_type != "nf4"
            else f"Reinstall bitsandbytes for this device: `pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'`."
        )
        raise ValueError(f"--bnb_4bit_quant_type {quant_type}: bitsandbytes {version} cannot quantise to {quant_type} on {device} ({problem}). {fix}")


@functools.lru_cache
def quantisation_problem(quant_type: str, device: str) -> str | None:
    """Why bitsandbytes cannot 4-bit quantise and dequantise on ``device`` (None when it can): a real round trip, not a version table.

    Which quant types a backend implements changes between releases (fp4 on CPU, for one), so the kit tries it.
    """
    try:
        import bitsandbytes.functional as functional

        packed, state = functional.quantize_4bit(torch.linspace(-1, 1, 128, device=device), quant_type=quant_type)
        functional.dequantize_4bit(packed, state)
    except Exception as error:  # any failure means this backend cannot do it; the message says which
        return f"{type(error).__name__}: {error}"
    return None


def build_quantization_config(model_args, compute_dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for 4-bit loading; ``compute_dtype`` follows the precision policy unless set."""
    from transformers import BitsAndBytesConfig

    check_bitsandbytes(model_args.bnb_4bit_quant_type)
    compute_dtype = quantization_compute_dtype(model_args.bnb_4bit_compute_dtype, compute_dtype)
    family = family_of(model_type_at(model_args.model_path))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        # the family's modules 4-bit cannot serve (Qwen3.5's 16-wide in_proj_a/b, the vision tower), lm_head as by default
        llm_int8_skip_modules=list(family.keep_out_of_4bit) if family and family.keep_out_of_4bit else None,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def model_type_at(model_path: str) -> str | None:
    """The ``model_type`` of a base folder or tiny alias (None for a hub id not downloaded yet)."""
    from .checks import model_type_of, read_model_config

    folder = Path(resolve_model_path(model_path))
    return model_type_of(model_path, read_model_config(folder) if (folder / "config.json").is_file() else None)


def load_base_model(model_path: str = "tiny", dtype: torch.dtype = torch.float32, quantization_config=None,
                    attn_implementation: str = "sdpa", device_map=None, device: str | None = None):
    """Load a causal LM for training or inference: ``AutoModelForCausalLM`` with dtype, optional 4-bit, on the device.

    ``device`` defaults to this process's GPU (LOCAL_RANK) or the CPU; training passes the Trainer's
    device, so ``--use_cpu True`` keeps the model on the CPU even where a GPU is visible.
    """
    from transformers import AutoModelForCausalLM

    path = recorded_path(resolve_model_path(model_path))  # absolute for a local folder: peft records it as the base
    device = device or _local_device()
    if quantization_config is not None and device_map is None:
        device_map = {"": device}  # bitsandbytes quantises while loading, on the device it will run on
    with hub_download_errors(str(model_path)):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=quantization_config, attn_implementation=attn_implementation, device_map=device_map
        )
    if quantization_config is None and device_map is None:
        model.to(device)
    if quantization_config is not None:
        keep_4bit_weights_trainable(model)
    return model


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference-only layout, so the model can still train.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s weights the first time it runs
    without gradients (an evaluation, ``generate``); training after that fails with "a view of a leaf
    Variable that requires grad is being used in an in-place operation". The kit evaluates and trains the same model.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextmanager
def evaluation_mode(model):
    """Put ``model`` in eval mode (no dropout) for the block, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock timer measures the work itself (a no-op on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release_memory() -> None:
    """Give freed models' memory back before the next one loads (matters for a 7B base on one GPU)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _local_device() -> str:
    """This process's device: its own GPU under torchrun/accelerate (LOCAL_RANK), else cuda:0 or cpu."""
    if device_type() == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def linear_module_names(model) -> list[str]:
    """Sorted short names of the model's linear layers (``q_proj``, ``gate_proj``, ...), lm_head excluded."""
    # bitsandbytes' Linear4bit and Linear8bitLt subclass torch.nn.Linear, so 4-bit models are covered too
    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return sorted(names - {"lm_head", "score"})


MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def check_target_modules(model, target_modules) -> None:
    """Raise a clear error when a requested LoRA target is not a linear layer of this model.

    On a MoE model the MLP names also stand for the routed experts (fused parameters, see :func:`lora_targets`).
    """
    if target_modules == "all-linear":
        return
    available = linear_module_names(model)
    family = family_of(base_config_of(model).model_type)
    served = MLP_MODULES if family and family.has_experts else ()
    unknown = [name for name in target_modules if name not in available and name not in served]
    if unknown:
        hint = " (c_attn is Qwen1's fused attention; Qwen1.5 and later use q_proj,k_proj,v_proj)" if "c_attn" in unknown else ""
        from ..common.errors import FlagError

        raise FlagError(
            f"--target_modules: {', '.join(unknown)} not found in {type(model).__name__}{hint}. "
            f"Its linear layers are: {', '.join(available)}. Use some of these, or 'all-linear'."
        )


def lora_targets(model, target_modules) -> tuple[list[str] | str, list[str], list[str]]:
    """What LoRA adapts on this model: (target_modules for peft, target_parameters, notes to print).

    - MoE (:data:`~qwen_helpers.common.families.Family.expert_parameters`): routed experts are fused 3-D parameters
      that ``all-linear`` never reaches; they train through peft's ``target_parameters`` whenever the MLP is a target
      (``all-linear``, or any of gate_proj/up_proj/down_proj). The router stays frozen.
    - Hybrid linear attention (Qwen3.5): q/k/v/o exist only in the full-attention layers (one in four); naming only
      those leaves the Gated DeltaNet layers frozen, which the notes say.
    """
    family = family_of(base_config_of(model).model_type)
    notes, parameters = [], []
    modules = target_modules
    if family and family.has_experts and (target_modules == "all-linear" or set(target_modules) & set(MLP_MODULES)):
        parameters = list(family.expert_parameters)
        if target_modules != "all-linear":
            available = set(linear_module_names(model))
            modules = [name for name in target_modules if name in available]
        notes.append(f"LoRA on the routed experts too ({', '.join(parameters)}, peft target_parameters); the router stays frozen")
    if family and family.hybrid_linear_attention and target_modules != "all-linear":
        if not set(target_modules) & set(LINEAR_ATTENTION_MODULES + MLP_MODULES):
            layer_types = list(getattr(base_config_of(model), "layer_types", None) or [])
            full = [str(index) for index, kind in enumerate(layer_types) if kind == "full_attention"]
            notes.append(f"note: {','.join(target_modules)} exist only in {family.label}'s full-attention layers "
                         f"({len(full)} of {len(layer_types)}: layer {', '.join(full)}); the linear-attention layers stay "
                         "frozen. --target_modules all-linear adapts both (and the MLP).")
    return modules, parameters, notes


def base_config_of(model):
    """The config of the base model under any peft wrapper (the model's own config when it has none)."""
    return model.get_base_model().config if hasattr(model, "get_base_model") else model.config


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters, counting 4-bit packed weights at their real (unpacked) size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return ParameterCount(trainable, total)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return ParameterCount(trainable, total)

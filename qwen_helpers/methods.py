"""The one registry of fine-tuning methods: LoRA, prompt tuning, QLoRA and full fine-tuning.

Every place that needs a method's name, label, flags, peft config, loading options or benchmark name
looks it up here, so the training commands, the inference path and the benchmark share one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import LoraArguments, PromptTuningArguments
from .tiny import resolve_model_path


def build_lora_config(lora_args: LoraArguments, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                      trainable_token_indices: list[int] | None = None):
    """``LoraConfig`` from the kit's LoRA arguments (a causal LM unless ``task_type`` says otherwise)."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.target_module_list(),
        modules_to_save=modules_to_save,
        trainable_token_indices=trainable_token_indices or None,  # embedding rows trained besides LoRA (base checkpoints' chat tokens)
        bias="none",
        use_dora=lora_args.use_dora,
        use_rslora=lora_args.use_rslora,
        init_lora_weights=lora_args.peft_init_lora_weights(),
    )


def rewrites_base_weights(lora_args: LoraArguments | None) -> bool:
    """PiSSA and OLoRA move the base weights' principal part into the adapter: saving converts it back."""
    return lora_args is not None and str(lora_args.peft_init_lora_weights()).startswith(("pissa", "olora"))


def build_prompt_tuning_config(prompt_args: PromptTuningArguments, model_path: str):
    """``PromptTuningConfig``; with TEXT init, peft tokenises the init text with the base's own tokenizer."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    text_init = prompt_args.prompt_tuning_init == "TEXT"
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=prompt_args.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if text_init else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=prompt_args.prompt_init_text if text_init else None,
        tokenizer_name_or_path=resolve_model_path(model_path) if text_init else None,
    )


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: what wraps the base, how the base loads, which flags it takes."""

    name: str  # the run config's "method" and the commands' vocabulary
    label: str  # for tables and plots
    adapter: Literal["lora", "prompt_tuning", "full"]  # which peft config wraps the base ("full": none)
    arguments: type | None  # the method's argument dataclass (HfArgumentParser group), None for full
    load_in_4bit: bool = False  # the base loads in 4-bit NF4 (QLoRA)
    command_defaults: dict = field(default_factory=dict)  # the training command's defaults beyond the dataclasses'
    benchmark_runs: tuple[tuple[str, str], ...] = ()  # (benchmark run name, precision it asks for)

    def peft_config(self, method_args, model_path: str, trainable_token_indices: list[int] | None = None):
        """The peft config that wraps the base for this method (None for full fine-tuning)."""
        if self.adapter == "lora":
            return build_lora_config(method_args, trainable_token_indices=trainable_token_indices)
        if self.adapter == "prompt_tuning":
            return build_prompt_tuning_config(method_args, model_path)
        return None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("lora", "LoRA", "lora", LoraArguments, benchmark_runs=(("lora_fp16", "fp16"), ("lora_bf16", "bf16"))),
        Method("prompt_tuning", "prompt tuning", "prompt_tuning", PromptTuningArguments,
               command_defaults={"learning_rate": 3e-2, "output_dir": "outputs/prompt_tuning"},
               benchmark_runs=(("prompt_tuning", "fp16"),)),
        # Gradient checkpointing on: without it 4-bit can need more memory than 16-bit LoRA, because
        # prepare_model_for_kbit_training upcasts the unquantised embeddings and lm_head to fp32.
        Method("qlora", "QLoRA (4-bit NF4 base)", "lora", LoraArguments, load_in_4bit=True,
               command_defaults={"load_in_4bit": True, "activation_checkpointing": True, "output_dir": "outputs/qlora"},
               benchmark_runs=(("qlora_nf4", "bf16"),)),
        Method("full", "full fine-tuning", "full", None, benchmark_runs=(("full", "bf16"),)),
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a sentence listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.")
    return METHODS[name]


def benchmark_runs() -> dict[str, tuple[Method, str]]:
    """Benchmark run name (``lora_fp16``, ``qlora_nf4``, ...) -> (method, requested precision)."""
    return {run: (method, precision) for method in METHODS.values() for run, precision in method.benchmark_runs}


def adapter_kind(info: dict) -> str:
    """The method name of a saved adapter ('lora', 'qlora', 'prompt_tuning', or peft's type in lower case).

    ``info`` is :func:`qwen_helpers.adapters.read_adapter_info`'s dict: peft's config plus the kit's run record.
    """
    peft_type = str(info.get("peft_type", "")).lower()
    if peft_type == "lora" and info.get("kit_load_in_4bit"):
        return "qlora"
    return peft_type

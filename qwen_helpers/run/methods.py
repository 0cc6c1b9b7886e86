"""The one registry of fine-tuning methods: LoRA, prompt tuning, QLoRA and full fine-tuning.

Every place that needs a method's name, label, flags, peft config, loading options or benchmark rows
looks it up here, so the training commands, the inference path and the benchmark share one vocabulary.
A new method is one ``Method`` entry; a new LoRA variant is one ``BenchmarkRun`` with its peft option
(plus its ``LoraArguments`` field); the benchmark and its memory estimate read both from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from .config import LoraArguments, PromptTuningArguments
from ..common.tiny import resolve_model_path


def build_lora_config(lora_args: LoraArguments, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None,
                      trainable_token_indices: list[int] | None = None, target_modules=None,
                      target_parameters: list[str] | None = None):
    """``LoraConfig`` from the kit's LoRA arguments (a causal LM unless ``task_type`` says otherwise).

    ``target_modules`` / ``target_parameters`` are the model's resolved targets (:func:`qwen_helpers.models.loading.lora_targets`:
    a MoE's routed experts are parameters, not modules); by default the flag's module list.
    """
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=0.0 if target_parameters else lora_args.lora_dropout,  # peft's ParamWrapper (experts) takes no dropout
        target_modules=target_modules if target_modules is not None else lora_args.target_module_list(),
        target_parameters=target_parameters or None,
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


def _lora_config(lora_args: LoraArguments, model_path: str, trainable_token_indices: list[int] | None = None,
                 targets: tuple | None = None):
    modules, parameters = targets if targets is not None else (None, None)
    return build_lora_config(lora_args, trainable_token_indices=trainable_token_indices, target_modules=modules,
                             target_parameters=parameters)


def _prompt_tuning_config(prompt_args: PromptTuningArguments, model_path: str, trainable_token_indices=None, targets=None):
    return build_prompt_tuning_config(prompt_args, model_path)


@dataclass(frozen=True)
class BenchmarkRun:
    """One benchmark row of a method: the precision it asks for, a LoRA variant's options, the trainer that runs it.

    ``objective`` "sft" runs the kit's training path (``train.train``); "dpo" and "grpo" run TRL's
    ``DPOTrainer`` / ``GRPOTrainer`` through the kit's ``train_dpo`` / ``train_grpo`` on the same LoRA method.
    """

    name: str  # the benchmark's --methods vocabulary (lora_bf16, qlora_nf4, dpo_lora, ...)
    label: str  # for tables and charts
    precision: Literal["fp16", "bf16"]  # autocast dtype on a GPU; CPUs fall back to fp32
    lora_options: tuple[tuple[str, object], ...] = ()  # a LoRA variant: LoraArguments fields (use_dora, ...)
    objective: Literal["sft", "dpo", "grpo"] = "sft"
    method: Method | None = None  # the registry entry the row trains (set by :func:`benchmark_runs`)

    @property
    def adapter(self) -> str:
        return self.method.adapter

    @property
    def load_in_4bit(self) -> bool:
        return self.method.load_in_4bit

    @property
    def fp32_master_weights(self) -> bool:
        """Full fine-tuning keeps fp32 weights and autocasts; the adapter methods load the base in half precision."""
        return self.method.trains_base_weights

    @property
    def is_variant(self) -> bool:
        """LoRA with one peft option (DoRA, rsLoRA, PiSSA, LoRA+): compared with the plain LoRA row."""
        return bool(self.lora_options)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: what wraps the base, how the base loads, which flags it takes, its benchmark rows."""

    name: str  # the run config's "method" and the commands' vocabulary
    label: str  # for tables and plots
    adapter: Literal["lora", "prompt_tuning", "full"]  # which peft config wraps the base ("full": none)
    arguments: type | None  # the method's argument dataclass (HfArgumentParser group), None for full
    build_config: Callable | None = None  # (method_args, model_path, trainable_token_indices, targets) -> peft config
    load_in_4bit: bool = False  # the base loads in 4-bit NF4 (QLoRA)
    command_defaults: dict = field(default_factory=dict)  # the training command's defaults beyond the dataclasses'
    benchmark_runs: tuple[BenchmarkRun, ...] = ()  # the benchmark's rows of this method

    @property
    def trains_base_weights(self) -> bool:
        """Every base weight trains (full fine-tuning): fp32 master weights, weight gradients in the FLOPs."""
        return self.build_config is None

    @property
    def adapts_linear_layers(self) -> bool:
        """LoRA and QLoRA: matrices beside the base's linear layers (target modules, chat-token rows, variants)."""
        return self.arguments is LoraArguments

    @property
    def prepends_virtual_tokens(self) -> bool:
        """Prompt tuning: every row starts with the soft prompt, so rows cannot be packed and positions shift."""
        return self.arguments is PromptTuningArguments

    def flag_names(self) -> tuple[str, ...]:
        """The method's own command-line flags (its argument dataclass's fields), e.g. ``--lora_r``."""
        return tuple(f"--{item.name}" for item in fields(self.arguments)) if self.arguments else ()

    def method_arguments(self, lora_args: LoraArguments | None, prompt_args: PromptTuningArguments | None):
        """Of the two argument groups, the one this method takes (None for full fine-tuning)."""
        return {LoraArguments: lora_args, PromptTuningArguments: prompt_args}.get(self.arguments)

    def argument_groups(self, method_args) -> tuple[LoraArguments | None, PromptTuningArguments | None]:
        """(lora_args, prompt_args) as ``train`` takes them, from the method's one argument group."""
        return (method_args if self.adapts_linear_layers else None,
                method_args if self.prepends_virtual_tokens else None)

    def peft_config(self, method_args, model_path: str, trainable_token_indices: list[int] | None = None, targets: tuple | None = None):
        """The peft config that wraps the base for this method (None for full fine-tuning); ``targets``: LoRA's resolved
        (target_modules, target_parameters) on the model."""
        return self.build_config(method_args, model_path, trainable_token_indices, targets) if self.build_config else None


_LORA_ROWS = (
    BenchmarkRun("lora_fp16", "LoRA fp16", "fp16"),
    BenchmarkRun("lora_bf16", "LoRA bf16", "bf16"),
    # LoRA's variants, each beside lora_bf16 (its speed reference): one entry each, the same method with one peft option
    BenchmarkRun("lora_dora", "LoRA bf16 + DoRA", "bf16", (("use_dora", True),)),
    BenchmarkRun("lora_rslora", "LoRA bf16 + rsLoRA", "bf16", (("use_rslora", True),)),
    BenchmarkRun("lora_pissa", "LoRA bf16, PiSSA start", "bf16", (("init_lora_weights", "pissa_niter_4"),)),
    BenchmarkRun("lora_loraplus", "LoRA+ bf16 (ratio 16)", "bf16", (("loraplus_lr_ratio", 16.0),)),
    # the same LoRA trained by TRL's preference and RL trainers (train_dpo, train_grpo)
    BenchmarkRun("dpo_lora", "DPO on LoRA bf16 (reference = adapter off)", "bf16", objective="dpo"),
    BenchmarkRun("grpo_lora", "GRPO on LoRA bf16 (generation timed apart)", "bf16", objective="grpo"),
)

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("lora", "LoRA", "lora", LoraArguments, _lora_config, benchmark_runs=_LORA_ROWS),
        Method("prompt_tuning", "prompt tuning", "prompt_tuning", PromptTuningArguments, _prompt_tuning_config,
               command_defaults={"learning_rate": 3e-2, "output_dir": "outputs/prompt_tuning"},
               benchmark_runs=(BenchmarkRun("prompt_tuning", "prompt tuning fp16", "fp16"),)),
        # Gradient checkpointing on: without it 4-bit can need more memory than 16-bit LoRA, because
        # prepare_model_for_kbit_training upcasts the unquantised embeddings and lm_head to fp32.
        Method("qlora", "QLoRA (4-bit NF4 base)", "lora", LoraArguments, _lora_config, load_in_4bit=True,
               command_defaults={"load_in_4bit": True, "activation_checkpointing": True, "output_dir": "outputs/qlora"},
               benchmark_runs=(BenchmarkRun("qlora_nf4", "QLoRA NF4 (bf16 compute)", "bf16"),)),
        Method("full", "full fine-tuning", "full", None,
               benchmark_runs=(BenchmarkRun("full", "full FT (fp32 master, bf16 autocast)", "bf16"),)),
    )
}


def get_method(name: str) -> Method:
    """The registered method called ``name``, or a sentence listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}: use one of {', '.join(METHODS)}.")
    return METHODS[name]


def benchmark_runs() -> dict[str, BenchmarkRun]:
    """Benchmark row name (``lora_fp16``, ``qlora_nf4``, ``dpo_lora``, ...) -> its run, bound to its method."""
    return {run.name: replace(run, method=method) for method in METHODS.values() for run in method.benchmark_runs}

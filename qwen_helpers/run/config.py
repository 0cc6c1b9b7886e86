"""Argument dataclasses for every command and notebook, ready for ``HfArgumentParser``.

Each field carries its help text; ``__post_init__`` rejects bad combinations with a sentence that
says what to do. The training arguments subclass ``transformers.TrainingArguments``, so every
Trainer flag works on the command line, with the seed's defaults and the kit's precision policy.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from transformers import TrainingArguments

from .flag_checks import (check_data_flags, check_evaluation_flags, check_lora_flags, check_prompt_tuning_flags,
                          check_training_flags)
from ..data.records import FieldMap
from ..common.files import RUN_CONFIG, atomic_write_text
from .precision import Precision, apply_precision_policy
from .prompt_settings import TEMPLATE_OPTIONS

LOSS_HISTORY = "loss_history.json"


@dataclass
class ModelArguments:
    """Which base model to load, and how (precision is decided by the training arguments)."""

    model_path: str = field(
        default="tiny",
        metadata={"help": "A local Qwen folder or hub id (Qwen1.5/2/2.5/3), or 'tiny' for the embedded tiny Qwen."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit with bitsandbytes (QLoRA)."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (normal float, QLoRA's choice) or fp4."}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantise the quantisation constants too (saves ~0.4 bit per weight)."}
    )
    bnb_4bit_compute_dtype: Literal["auto", "float16", "bfloat16", "float32"] = field(
        default="auto", metadata={"help": "dtype of 4-bit matmuls; auto follows --fp16/--bf16 (fp32 on CPU)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa (PyTorch's fused attention), eager, or flash_attention_2."}
    )


@dataclass
class TemplateOptions:
    """Chat-template options beyond thinking mode, for every command that renders prompts; recorded in run_config.json
    and made the template's defaults wherever the adapter is used (:func:`qwen_helpers.run.prompt_settings.template_with_options`)."""

    reasoning_effort: Literal["xhigh", "medium", "low"] | None = field(
        default=None,
        metadata={"help": "Qwen3.8: the template's reasoning_effort (thinking mode), for training and every later prompt; default: the template's (xhigh)."},
    )
    preserve_thinking: bool | None = field(
        default=None,
        metadata={"help": "Qwen3.6/3.8: keep earlier turns' reasoning in the prompt (the template's preserve_thinking); default: the template's."},
    )

    def template_options(self) -> dict:
        """The chat-template options this run sets (reasoning_effort, preserve_thinking), recorded and reused everywhere."""
        return {name: getattr(self, name) for name in TEMPLATE_OPTIONS if getattr(self, name) is not None}


@dataclass
class DataArguments(TemplateOptions):
    """Where the training data is and how it becomes tokens."""

    data_path: str = field(default="data/train.json", metadata={"help": "Training data: JSON array or JSONL of records."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Optional evaluation data in the same format."})
    max_length: int = field(default=512, metadata={"help": "Longest example in tokens (prompt + answer); raw text: the block length."})
    overflow: Literal["drop", "truncate_prompt"] = field(
        default="drop",
        metadata={"help": "What to do with longer examples: drop them, or drop their oldest whole turns until they "
                          "fit (a record whose last exchange is too long is dropped). Counted either way."},
    )
    instruction_field: str = field(default="instruction", metadata={"help": "Record key holding the instruction."})
    input_field: str = field(default="input", metadata={"help": "Record key holding the optional input."})
    output_field: str = field(default="output", metadata={"help": "Record key holding the answer."})
    system_field: str = field(default="system", metadata={"help": "Record key holding an optional system prompt."})
    data_format: Literal["auto", "alpaca", "messages", "sharegpt", "text"] = field(
        default="auto",
        metadata={"help": "Record format; auto detects it per file (messages / conversations / text keys, a .txt file, else alpaca). "
                          "text: raw text for continued pre-training, every token trained, packed into --max_length blocks."},
    )
    enable_thinking: bool = field(
        default=False,
        metadata={"help": "Qwen3: train and prompt in thinking mode (records' reasoning is trained); False keeps the empty think block in the prompt."},
    )
    max_eval_records: int = field(
        default=200,
        metadata={"help": "Without --eval_data_path, evaluate after training on at most this many training records (a seeded sample); 0 skips it."},
    )

    def __post_init__(self):
        check_data_flags(self)

    def field_map(self) -> FieldMap:
        return FieldMap(self.instruction_field, self.input_field, self.output_field, self.system_field)


@dataclass
class LoraArguments:
    """LoRA hyperparameters, with the seed's defaults (r=8, alpha=32, dropout 0.05 on q/k/v)."""

    lora_r: int = field(default=8, metadata={"help": "Rank of the update matrices: capacity of the adapter."})
    lora_alpha: int = field(default=32, metadata={"help": "Scale of the update is alpha / r (here 4)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input; 0.05-0.1 for small data."})
    target_modules: str = field(
        default="q_proj,k_proj,v_proj",
        metadata={"help": "Comma-separated module names to adapt, or 'all-linear' (every linear layer but lm_head)."},
    )
    train_chat_tokens: bool | None = field(
        default=None,
        metadata={"help": "Also train the <|im_start|>/<|im_end|> embedding rows; default: only on base checkpoints (eos <|endoftext|>)."},
    )
    # Variants: each is a peft option of the same LoRA method (peft's LoraConfig, create_loraplus_optimizer)
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: learn each weight's magnitude apart from its direction (peft use_dora)."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "rsLoRA: scale the update by alpha / sqrt(r), not alpha / r (peft use_rslora)."},
    )
    init_lora_weights: str = field(
        default="true",
        metadata={"help": "LoRA's start: true (B=0, A Kaiming), gaussian, pissa, pissa_niter_N (fast SVD), olora; "
                          "PiSSA/OLoRA adapters are saved converted to plain LoRA for the original base."},
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+: lora_B learns at this x --learning_rate (paper: 16); peft's loraplus optimizer."},
    )

    def __post_init__(self):
        check_lora_flags(self)

    def peft_init_lora_weights(self) -> bool | str:
        """``--init_lora_weights`` as peft's LoraConfig takes it: True for 'true', else the name."""
        return True if self.init_lora_weights.strip().lower() == "true" else self.init_lora_weights.strip().lower()

    def target_module_list(self) -> list[str] | str:
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class PromptTuningArguments:
    """Soft prompt hyperparameters, with the seed's defaults (20 virtual tokens initialised from "分类任务：")."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Length of the learned soft prompt."})
    prompt_tuning_init: Literal["TEXT", "RANDOM"] = field(
        default="TEXT", metadata={"help": "Start from the embeddings of --prompt_init_text (TEXT) or at random."}
    )
    prompt_init_text: str = field(default="分类任务：", metadata={"help": "Text whose token embeddings initialise the prompt."})
    task: Literal["auto", "generation", "classification"] = field(
        default="auto", metadata={"help": "classification evaluates by label scoring; auto detects it from the data."}
    )
    labels: str | None = field(default=None, metadata={"help": "Comma-separated label set; default: the training outputs."})

    def __post_init__(self):
        check_prompt_tuning_flags(self)


@dataclass
class KitTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the kit's defaults and its precision policy (:mod:`qwen_helpers.run.precision`) applied before validation.

    ``fp16=True`` is the default, the seed's recipe; on a CPU the run trains in fp32 and says so in
    ``precision_notice``, and bf16 is used only when asked (``--bf16 True``), on a GPU that has it.
    ``precision`` keeps the decision (``precision.requested`` is the flag as given); ``fp16``/``bf16``
    hold what the Trainer runs, since it refuses mixed precision on a CPU.
    """

    output_dir: str = field(default="outputs/lora", metadata={"help": "Where the adapter and run files go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty output folder (its old files are replaced)."}
    )
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (seed: 3e-4 for LoRA)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Examples per step per device."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples per evaluation step per device."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warm-up: a fraction of the steps (<1) or a count."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    logging_steps: float = field(default=1, metadata={"help": "Log the loss every N steps."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to write resumable checkpoints (adapter only)."})
    save_total_limit: int | None = field(default=1, metadata={"help": "Keep only the last N checkpoints."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; lower it if the loss spikes."})
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Log a NaN/inf loss as a running average (the Trainer's default); off: the guard sees it."},
    )
    fp16: bool = field(
        default=True, metadata={"help": "FP16 mixed precision (the seed's recipe; fp32 with a notice on a CPU). --bf16 True asks for bf16 instead."}
    )
    precision: Precision | None = field(default=None, init=False, repr=False)
    padding_free: bool | None = field(
        default=None,
        metadata={"help": "Concatenate each batch's examples into one row with no padding (default: on where the method and attention allow; prompt tuning cannot)."},
    )
    token_budget: int | None = field(
        default=None,
        metadata={"help": "Batch by tokens: as many examples per step as fit in N tokens, similar lengths together (replaces --per_device_train_batch_size)."},
    )
    cpu_allocator_tuning: bool = field(
        default=True,
        metadata={"help": "On a CPU, keep freed memory in the process (glibc mallopt): about 2x faster steps, 15-30 percent more peak RSS that is never returned."},
    )
    eval_generate_records: int = field(
        default=16,
        metadata={
            "help": "At each evaluation during training, also score this many held-out records (a seeded sample) "
            "with the task's "
            "metric: chrF/BLEU/exact match by generation, accuracy/macro-F1 by label scoring; 0: eval loss only."
        },
    )
    eval_max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "Longest generated answer when scoring held-out records during training "
            "(keep it short: it is the cost)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improving --metric_for_best_model "
            "(transformers' EarlyStoppingCallback)."
        },
    )
    precision_notice: str = field(default="", init=False, repr=False)

    def __post_init__(self):
        check_deepspeed_installed(self.deepspeed)
        check_training_flags(self)  # ranges: the command, a notebook panel and Python code meet this one check
        check_evaluation_flags(self)  # one line naming the flags, before transformers' own multi-line checks
        if self.early_stopping_patience is not None and self.metric_for_best_model is None:
            self.metric_for_best_model = "eval_loss"  # EarlyStoppingCallback needs one; the Trainer's own default
        if self.bf16:
            self.fp16 = False  # --bf16 True replaces the default fp16 request
        self.precision_notice = apply_precision_policy(self)
        super().__post_init__()


def check_deepspeed_installed(deepspeed_config) -> None:
    """Fail early with the install command when --deepspeed is given but DeepSpeed, an optional extra, is missing."""
    if deepspeed_config and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            f"--deepspeed {deepspeed_config} needs DeepSpeed, an optional extra of this kit: run "
            "pip install -e '.[deepspeed]' on the GPU machine, or drop --deepspeed to train with plain DDP."
        )


def to_json_dict(*configs) -> dict:
    """Merge dataclass configs into one JSON-ready dict (the effective configuration saved with each adapter)."""
    merged = {}
    for config in configs:
        values = config.to_dict() if isinstance(config, TrainingArguments) else asdict(config)
        merged.update({key: value for key, value in values.items() if not key.startswith("_")})
    merged["cwd"] = os.getcwd()
    return merged


def write_run_config(output_dir: str | os.PathLike, /, *configs, method: str, history: list[dict] | None = None,
                     **extra) -> Path:
    """Save a run's effective configuration as run_config.json beside the adapter (and its loss history): the one writer.

    ``configs`` are the run's argument dataclasses; ``extra`` adds keys such as ``model_path`` when no
    ``ModelArguments`` is passed. The precision request is kept beside the effective flags, so a CPU run
    asked for fp16 still loads in fp16 for inference on a GPU.
    """
    run_config = redact_secrets({"method": method, "load_in_4bit": False, **to_json_dict(*configs), **extra})
    precision = next((config.precision for config in configs if isinstance(getattr(config, "precision", None), Precision)), None)
    if precision is not None:
        run_config.update(requested_precision=precision.requested, effective_precision=precision.effective)
    return write_run_files(output_dir, run_config, history)


def write_run_files(output_dir: str | os.PathLike, run_config: dict, history: list[dict] | None = None) -> Path:
    """Write ``run_config`` (and, when given, the loss history) as JSON in ``output_dir``; returns the run config's path."""
    output = Path(output_dir)
    path = output / RUN_CONFIG
    atomic_write_text(path, json.dumps(run_config, indent=2, ensure_ascii=False, default=str))
    if history is not None:
        atomic_write_text(output / LOSS_HISTORY, json.dumps(strict_json(history), indent=2, allow_nan=False))
    return path


def strict_json(value):
    """``value`` with every NaN/inf float as null: JSON has no NaN, and strict readers (jq, browsers) refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def redact_secrets(run_config: dict) -> dict:
    """Hide every token-like value (``--hub_token``, ...) that ``TrainingArguments.to_dict`` does not already hide."""
    return {key: (f"<{key.upper()}>" if value and re.search(r"(^|_)(token|secret|password)$", key) else value) for key, value in run_config.items()}

"""Benchmark the fine-tuning methods: trainable parameters, peak memory, throughput, and a memory estimate beforehand.

    python -m qwen_helpers.benchmark --preset qwen2.5-7b --methods all --seq_len 512 --batch_size 8
    python -m qwen_helpers.benchmark --preset tiny --methods all --steps 2 --seq_len 32 --batch_size 2   # CPU

Each (method, gradient checkpointing) pair runs in a fresh Python process, so its peak memory is its own
and a crash or an out-of-memory error costs one row, not the table. Models come from the kit's one
loading path (``load_model_for_training`` + ``attach_adapter``); ``--preset`` builds the public Qwen
shapes with random weights: memory and speed do not depend on weight values. Results go to
``outputs/benchmark/<timestamp>/`` as results.json, results.csv, results.md and bar charts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from .errors import command_boundary
from .files import unused_path

GIB = 2**30
WEIGHTS_NOTE = "Weights are random (presets) or as loaded; memory and speed do not depend on weight values."
CPU_NOTE = "CPU run: peak memory is the process's peak RSS and speeds are CPU speeds; they are not GPU figures."
SIMULATED_OOM_FLAG = "--_simulate_oom"
WORKER_FLAG = "--_worker"


@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the benchmark runs it: which adapter, which precision, 4-bit or not."""

    name: str
    label: str
    adapter: Literal["full", "lora", "prompt_tuning"]
    precision: Literal["fp16", "bf16"]  # autocast dtype on a GPU; CPUs fall back to fp32
    load_in_4bit: bool = False

    @property
    def fp32_master_weights(self) -> bool:
        """Full fine-tuning keeps fp32 weights and autocasts; the adapter methods load the base in half precision."""
        return self.adapter == "full"


METHODS = {
    "full": Method("full", "full FT (fp32 master, bf16 autocast)", "full", "bf16"),
    "lora_fp16": Method("lora_fp16", "LoRA fp16", "lora", "fp16"),
    "lora_bf16": Method("lora_bf16", "LoRA bf16", "lora", "bf16"),
    "prompt_tuning": Method("prompt_tuning", "prompt tuning fp16", "prompt_tuning", "fp16"),
    "qlora_nf4": Method("qlora_nf4", "QLoRA NF4 (bf16 compute)", "lora", "bf16", load_in_4bit=True),
}
BASELINE_METHOD_NAMES = {"full": "full_bf16_amp", "prompt_tuning": "prompt_fp16"}  # plain_hf_baseline.py's names
BASELINE_SIZES = {"qwen2.5-0.5b": "0.5B", "qwen2.5-1.5b": "1.5B", "qwen2.5-7b": "7B"}
BASELINE_BATCHING = {"pad_max": "pad_max", "dynamic": "dynamic", "packed": "packed_flat"}

# Dense bf16 matrix peak per card (fp16 where the card has no bf16), in FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("T4", 65e12), ("V100", 125e12),
]


@dataclass
class BenchmarkArguments:
    """What to benchmark and on which workload."""

    preset: str = field(default="tiny", metadata={"help": "Architecture with random weights: tiny, tiny-qwen3, qwen2.5-0.5b|1.5b|3b|7b|14b, qwen3-0.6b|1.7b|4b|8b."})
    model_path: str | None = field(default=None, metadata={"help": "A real local checkpoint instead of --preset."})
    methods: str = field(default="all", metadata={"help": f"'all' or a comma list of: {', '.join(METHODS)}."})
    checkpointing: Literal["both", "off", "on"] = field(default="both", metadata={"help": "Run each method without and/or with gradient checkpointing."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per sample (synthetic data) or max_length (real data)."})
    batch_size: int = field(default=8, metadata={"help": "Samples per optimiser step."})
    steps: int = field(default=10, metadata={"help": "Timed optimiser steps."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed steps first (allocator, kernels, compilation)."})
    data: str = field(default="synthetic", metadata={"help": "'synthetic' (fixed-length random tokens) or a JSON/JSONL data file."})
    batching: Literal["pad_max", "dynamic", "packed"] = field(
        default="dynamic", metadata={"help": "Real data: pad to seq_len, pad to the longest (multiple of 64), or padding-free packing."}
    )
    token_budget: int | None = field(default=None, metadata={"help": "Form batches by tokens per step (padded tokens, or real tokens when packed) instead of --batch_size."})
    use_liger_kernel: bool = field(default=False, metadata={"help": "Liger's fused Triton kernels (GPU only; pip install liger-kernel)."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU only)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: str = field(default="q_proj,k_proj,v_proj", metadata={"help": "LoRA targets, comma list or all-linear."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Soft prompt length for prompt tuning."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Each run writes a <timestamp>/ folder here."})
    compare_baseline: str | None = field(default=None, metadata={"help": "A plain transformers+peft results JSON (shared/benchmarks) to compare with."})
    baseline_size: str | None = field(default=None, metadata={"help": "Which size rows of the baseline to use (default: from --preset)."})
    timeout: int = field(default=1800, metadata={"help": "Seconds before one method's process is stopped."})

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be 0 or more, got {self.warmup_steps}.")
        if self.data != "synthetic" and not Path(self.data).is_file():
            raise FileNotFoundError(f"--data {self.data}: no such file. Pass 'synthetic' or a JSON/JSONL data file.")

    @property
    def model_name(self) -> str:
        return self.model_path or self.preset


# ---------------------------------------------------------------- memory estimate


def _bytes_per_element(dtype) -> int:
    return {"fp32": 4, "float32": 4, "torch.float32": 4}.get(str(dtype), 2)


def activation_bytes_per_token_per_layer(config, element: int, trainable_base: bool, lora_inputs: int, lora_dropout: bool, use_liger: bool) -> float:
    """Bytes autograd keeps for one token in one decoder layer (sdpa attention, no checkpointing).

    Counted: the fp32 copies RMSNorm makes of its input (Liger's norm keeps the input only), the q/k/v
    and output tensors sdpa keeps, the MLP's gate, up and SiLU outputs (Liger recomputes SiLU),
    Qwen3's q/k norms, LoRA's dropout masks and dropped inputs, and for full fine-tuning the inputs
    every weight gradient needs. Checked against H200 measurements of plain transformers + peft.
    """
    from .presets import linear_shapes

    shapes = linear_shapes(config)
    hidden, inner = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = shapes["q_proj"][1], shapes["k_proj"][1]
    norms = 2 * element * hidden if use_liger else 2 * 4 * hidden
    attention = element * (2 * q_dim + 2 * kv_dim)
    mlp = element * (2 if use_liger else 3) * inner
    qk_norm = 4 * (q_dim + kv_dim) if config.model_type == "qwen3" else 0
    weight_inputs = 2 * 4 * hidden + element * (2 * hidden + q_dim + inner) if trainable_base else 0
    lora = (1 + element if lora_dropout else element) * lora_inputs
    return norms + attention + mlp + qk_norm + weight_inputs + lora


def estimate_memory(
    config,
    method: str,
    seq_len: int,
    batch_size: int,
    gradient_checkpointing: bool,
    dtype: str = "bf16",
    lora_r: int = 8,
    target_modules=("q_proj", "k_proj", "v_proj"),
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 20,
    use_liger: bool = False,
    double_quant: bool = True,
) -> dict:
    """Peak training memory of one method, as named parts that add up to ``total_bytes``.

    ``dtype`` is the compute precision ("fp16", "bf16" or "fp32"; CPUs run fp32). The estimate is for
    the peak of a training step, when every activation, the logits and the optimiser state coexist:
    weights (4-bit with its quantisation constants for QLoRA), trainable parameters with their fp32
    gradients and two AdamW moments, activations per layer x token (or, with checkpointing, each
    layer's input plus one recomputed layer), and the logits at vocabulary size with the fp32 copies
    the loss makes. It aims at CUDA's ``max_memory_allocated`` within about 20%.
    """
    from .presets import LINEAR_NAMES, linear_shapes, lora_trainable_parameters, parameter_breakdown

    spec = METHODS[method]
    element = _bytes_per_element(dtype)
    counts = parameter_breakdown(config)
    total_parameters = sum(counts.values())
    tokens = batch_size * (seq_len + (num_virtual_tokens if spec.adapter == "prompt_tuning" else 0))
    vocab, hidden, layers = config.vocab_size, config.hidden_size, config.num_hidden_layers
    head_weights = counts["lm_head"] or counts["embedding"]
    parts: dict[str, float] = {}

    if spec.load_in_4bit:
        # prepare_model_for_kbit_training upcasts every unquantised weight to fp32, and with it the hidden states
        element = 4
        constants = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64  # absmax per 64 weights (8-bit + fp32 per 256 blocks, or fp32)
        parts["weights: 4-bit linear layers"] = counts["linear"] / 2
        parts["weights: quantisation constants"] = counts["linear"] * constants
        parts["weights: unquantised embeddings, head, norms (fp32)"] = 4 * (total_parameters - counts["linear"])
    elif spec.fp32_master_weights:
        parts["weights (fp32 master)"] = 4 * total_parameters
        if element < 4:
            parts["autocast half-precision weight copies"] = 2 * (counts["linear"] + head_weights)
    else:
        parts[f"weights ({dtype})"] = element * total_parameters

    targets = LINEAR_NAMES if target_modules == "all-linear" else tuple(target_modules)
    if spec.adapter == "full":
        trainable = total_parameters
    elif spec.adapter == "lora":
        trainable = lora_trainable_parameters(config, targets, lora_r)
        parts["trainable adapter weights (fp32)"] = 4 * trainable
    else:
        trainable = num_virtual_tokens * hidden
        parts["trainable adapter weights (fp32)"] = 4 * trainable
    parts["gradients (fp32)"] = 4 * trainable
    parts["AdamW moments (2 x fp32)"] = 8 * trainable

    lora_inputs = sum(linear_shapes(config)[name][0] for name in targets) if spec.adapter == "lora" else 0
    per_layer = activation_bytes_per_token_per_layer(
        config, element, spec.adapter == "full", lora_inputs, lora_dropout > 0, use_liger
    )
    if gradient_checkpointing:
        residual = 4 if (spec.fp32_master_weights or element == 4) else element
        parts["checkpointed layer inputs (layers x tokens x hidden)"] = layers * tokens * hidden * residual
        parts["one layer recomputed in backward"] = per_layer * tokens
    else:
        parts["activations (layers x tokens)"] = layers * per_layer * tokens
    if not use_liger:
        parts[f"logits (tokens x {vocab:,} vocabulary)"] = element * tokens * vocab
        parts["log-softmax for the loss (fp32)"] = 4 * tokens * vocab
        parts["logit gradients (fp32" + (" + half)" if element < 4 else ")")] = (4 + (element if element < 4 else 0)) * tokens * vocab
    parts = {name: int(value) for name, value in parts.items()}
    return {
        "method": method,
        "gradient_checkpointing": gradient_checkpointing,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "trainable_parameters": trainable,
        "total_parameters": total_parameters,
        "parts": parts,
        "total_bytes": sum(parts.values()),
    }


def estimate_table(estimates: list[dict]) -> str:
    """The estimates as a markdown table, one column per run, one row per part (GiB)."""
    names = list(dict.fromkeys(part for estimate in estimates for part in estimate["parts"]))
    header = "| part | " + " | ".join(_run_id(e["method"], e["gradient_checkpointing"]) for e in estimates) + " |"
    lines = [header, "|---" * (len(estimates) + 1) + "|"]
    for name in names:
        cells = [f"{e['parts'][name] / GIB:.2f}" if name in e["parts"] else "" for e in estimates]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total (GiB)** | " + " | ".join(f"**{e['total_bytes'] / GIB:.2f}**" for e in estimates) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- runs and processes


def _run_id(method: str, gradient_checkpointing: bool) -> str:
    return f"{method}+gc" if gradient_checkpointing else method


def parse_methods(methods: str, checkpointing: str = "both") -> list[tuple[str, bool]]:
    """(method, gradient checkpointing) pairs from ``--methods`` and ``--checkpointing``."""
    names = list(METHODS) if methods.strip() == "all" else [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}. Use 'all' or a comma list of: {', '.join(METHODS)}.")
    flags = {"both": [False, True], "off": [False], "on": [True]}[checkpointing]
    return [(name, flag) for name in names for flag in flags]


def device_precision(method: Method, device: str, bf16_supported: bool = True) -> tuple[str, str]:
    """The precision a method really runs in here, and a note when it differs from what it asks for (the kit's one policy)."""
    from .precision import decide_precision

    precision = decide_precision(method.precision == "fp16", method.precision == "bf16", device=device,
                                 bf16_supported=bf16_supported, missing_bf16="fp16")
    return precision.effective, precision.label


def peak_flops(device_name: str) -> float | None:
    """The card's dense bf16 (or fp16) matrix rate from a small table of known cards; None if unknown."""
    for marker, flops in PEAK_FLOPS:
        if marker.lower() in device_name.lower():
            return flops
    return None


def model_flops_per_token(config, context: float, trains_base: bool) -> float:
    """Training FLOPs per token: forward 2 x matmul weights (+ attention), backward twice that when weights train.

    A frozen base still needs the gradients with respect to its inputs (one more forward's worth), not
    those of its weights; recomputation under checkpointing is not counted (model FLOPs, as in MFU).
    """
    from .presets import parameter_breakdown

    counts = parameter_breakdown(config)
    matmul = counts["linear"] + (counts["lm_head"] or counts["embedding"])
    q_dim = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    attention = 4 * config.num_hidden_layers * context * q_dim  # QK^T and AV over the context, non-causal count
    return (3 if trains_base else 2) * 2 * matmul + 3 * attention


def run_in_subprocess(spec: dict, timeout: int) -> dict:
    """Run one method in a fresh Python process; turn a crash or a timeout into a row instead of an exception."""
    with tempfile.TemporaryDirectory(prefix="qwen-benchmark-") as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps({**spec, "result_path": str(result_path)}), encoding="utf-8")
        command = [sys.executable, "-m", "qwen_helpers.benchmark", WORKER_FLAG, str(spec_path)]
        started = time.perf_counter()
        try:
            process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=os.getcwd(), env=_worker_env())
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "error": f"stopped after {timeout} s (raise --timeout, or lower --steps)"}
        if result_path.is_file():
            row = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            tail = (process.stderr or process.stdout or "")[-1500:]
            row = {"status": "crashed", "error": f"the process exited with code {process.returncode} without a result: {tail}"}
        row["process_seconds"] = time.perf_counter() - started
        return row


def _worker_env() -> dict:
    """The parent's environment, with the package importable from a source checkout."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------- the worker (one method, one process)


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for any error whose message says 'out of memory'."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def worker_main(spec_path: str) -> int:
    """Entry point of a method's process: run it, and write its row (OOM and errors included) as JSON."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        row = run_method(spec)
    except Exception as error:  # one method's failure becomes its row; the parent carries on with the rest
        status = "OOM" if is_out_of_memory(error) else "error"
        row = {"status": status, "error": f"{type(error).__name__}: {error}"[:1000]}
    Path(spec["result_path"]).write_text(json.dumps(row, default=str), encoding="utf-8")
    return 0


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_benchmark_model(spec: dict, method: Method, precision: str):
    """The model through the kit's one path: ``load_model_for_training`` then ``attach_adapter``."""
    from .config import KitTrainingArguments, LoraArguments, ModelArguments, PromptTuningArguments
    from .train import attach_adapter, load_model_for_training

    args = spec["args"]
    half = precision != "fp32" and not method.fp32_master_weights  # full FT keeps fp32 weights and autocasts
    training_args = KitTrainingArguments(
        output_dir=str(Path(spec["result_path"]).parent),  # the parent's temporary folder, removed after the run
        fp16=half and precision == "fp16",
        bf16=half and precision == "bf16",
        activation_checkpointing=spec["gradient_checkpointing"],
        report_to="none",
    )
    model_args = ModelArguments(model_path=spec["model_path"], load_in_4bit=method.load_in_4bit)
    model = load_model_for_training(model_args, training_args)
    if args["use_liger_kernel"]:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, {})
    lora_args = LoraArguments(lora_r=args["lora_r"], target_modules=args["target_modules"])
    # RANDOM init: memory and speed do not depend on where the soft prompt starts, and no tokenizer is needed
    prompt_args = PromptTuningArguments(num_virtual_tokens=args["num_virtual_tokens"], prompt_tuning_init="RANDOM")
    model = attach_adapter(model, method.adapter, spec["model_path"], lora_args, prompt_args)
    if spec["gradient_checkpointing"] and not method.load_in_4bit:  # QLoRA's prepare_model_for_kbit_training did it
        _enable_checkpointing(model)
    return model


def _enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer (works with frozen inputs, no hooks needed)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_batches(spec: dict, vocab_size: int) -> list[dict]:
    """The batches of the workload, collated once up front (a DataLoader with workers would overlap this)."""
    args = spec["args"]
    if args["data"] == "synthetic":
        return _synthetic_batches(args, vocab_size)
    from .data import load_dataset_for_training
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(spec["model_path"])
    dataset = load_dataset_for_training(tokenizer, args["data"], args["seq_len"], "truncate_prompt").dataset
    examples = [dict(row) for row in dataset.shuffle(seed=0)]
    return [_collator(tokenizer, args)(group) for group in _group_examples(examples, args)]


def _synthetic_batches(args: dict, vocab_size: int) -> list[dict]:
    import torch

    batch_size = max(1, args["token_budget"] // args["seq_len"]) if args["token_budget"] else args["batch_size"]
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(min(4, args["steps"] + args["warmup_steps"])):
        input_ids = torch.randint(0, min(vocab_size, 151643), (batch_size, args["seq_len"]), generator=generator)
        if args["batching"] == "packed":
            positions = torch.arange(args["seq_len"]).repeat(batch_size).unsqueeze(0)
            batches.append({"input_ids": input_ids.reshape(1, -1), "labels": input_ids.reshape(1, -1).clone(), "position_ids": positions})
        else:
            batches.append({"input_ids": input_ids, "labels": input_ids.clone(), "attention_mask": torch.ones_like(input_ids)})
    return batches


def _group_examples(examples: list[dict], args: dict) -> list[list[dict]]:
    """Samples per step: --batch_size of them, or as many as fit in --token_budget (padded, or real when packed)."""
    if not args["token_budget"]:
        size = args["batch_size"]
        return [examples[start:start + size] for start in range(0, len(examples) - size + 1, size)] or [examples]
    groups, current = [], []
    for example in examples:
        candidate = current + [example]
        if current and _batch_cost(candidate, args) > args["token_budget"]:
            groups.append(current)
            candidate = [example]
        current = candidate
    return groups + ([current] if current else [])


def _batch_cost(group: list[dict], args: dict) -> int:
    lengths = [len(example["input_ids"]) for example in group]
    if args["batching"] == "packed":
        return sum(lengths)
    longest = args["seq_len"] if args["batching"] == "pad_max" else math.ceil(max(lengths) / 64) * 64
    return len(group) * longest


def _collator(tokenizer, args: dict):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from .data import IGNORE_INDEX, make_collator

    if args["batching"] == "packed":
        return DataCollatorWithFlattening(return_position_ids=True)
    if args["batching"] == "pad_max":
        return DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=args["seq_len"], label_pad_token_id=IGNORE_INDEX)
    return make_collator(tokenizer, pad_to_multiple_of=64)  # bounded set of shapes for the allocator and compiled kernels


def _token_counts(batch) -> tuple[int, int]:
    """(real tokens, tokens the model computes on) in a batch: padding is the difference."""
    computed = batch["input_ids"].numel()
    real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else computed
    return real, computed


def _sequence_count(batch) -> int:
    """Samples in a batch: rows when padded, position restarts when packed into one row."""
    if "position_ids" in batch and "attention_mask" not in batch:
        return int((batch["position_ids"] == 0).sum())
    return batch["input_ids"].shape[0]


def run_method(spec: dict) -> dict:
    """Load one method's model, run warm-up and timed steps, and measure parameters, memory and speed.

    The timed loop is a lean forward / backward / clip / AdamW step rather than ``Trainer``: it times
    exactly the training step with a device sync around each one, with no logging, callback or
    DataLoader time, and takes batches of any size (token-budget batching). The model, its adapter and
    the optimiser are the kit's (``load_model_for_training`` + ``attach_adapter`` + AdamW, autocast and
    loss scaling as the Trainer applies them), so the memory is that of a ``train_lora`` run.
    """
    import torch

    from .modeling import count_parameters, device_type

    args, method = spec["args"], METHODS[spec["method"]]
    device = device_type()
    precision, precision_note = device_precision(method, device, device == "cuda" and torch.cuda.is_bf16_supported())
    rss_start = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = load_benchmark_model(spec, method, precision)
    parameters = count_parameters(model)
    weights_bytes = torch.cuda.memory_allocated() if device == "cuda" else _rss_bytes() - rss_start
    load_seconds = time.perf_counter() - started
    batches = build_batches(spec, model.config.vocab_size)
    if args["torch_compile"]:
        model = torch.compile(model)
    if spec.get("simulate_oom"):
        raise torch.OutOfMemoryError(f"CUDA out of memory (simulated for {spec['method']} by {SIMULATED_OOM_FLAG}).")
    timings = train_steps(model, batches, args["warmup_steps"], args["steps"], precision if precision != "fp32" else None, device)
    row = {
        "status": "ok",
        "precision": precision_note,
        "trainable": parameters.trainable,
        "total": parameters.total,
        "trainable_percent": parameters.percent,
        "load_seconds": load_seconds,
        "weights_bytes": weights_bytes,
        **timings,
    }
    if device == "cuda":
        row.update(peak_bytes=torch.cuda.max_memory_allocated(), reserved_bytes=torch.cuda.max_memory_reserved(), peak_kind="CUDA max_memory_allocated")
    else:
        peak = _peak_rss_bytes()
        row.update(peak_bytes=peak, rss_start_bytes=rss_start, peak_above_start_bytes=peak - rss_start, peak_kind="CPU peak RSS of the process")
    return row


def train_steps(model, batches: list[dict], warmup_steps: int, steps: int, autocast: str | None, device: str) -> dict:
    """Warm-up steps, then timed steps; tokens per second count real (non-pad) tokens only."""
    import torch

    from .modeling import synchronize

    autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[autocast]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)  # fp16 needs loss scaling, bf16 does not
    model.train()
    losses, seconds, real_tokens, computed_tokens, sequences = [], [], 0, 0, 0
    for step in range(warmup_steps + steps):
        batch = {key: value.to(device) for key, value in batches[step % len(batches)].items()}
        synchronize()
        started = time.perf_counter()
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # the kit's max_grad_norm, as the Trainer does
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        losses.append(float(loss.detach()))
        if step >= warmup_steps:
            seconds.append(time.perf_counter() - started)
            real, computed = _token_counts(batch)
            real_tokens, computed_tokens = real_tokens + real, computed_tokens + computed
            sequences += _sequence_count(batch)
    return {
        "step_seconds": sum(seconds) / len(seconds),
        "tokens_per_second": real_tokens / sum(seconds),
        "real_tokens_per_step": real_tokens / len(seconds),
        "computed_tokens_per_step": computed_tokens / len(seconds),
        "sequences_per_step": sequences / len(seconds),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_finite": all(math.isfinite(value) for value in losses),
    }


# ---------------------------------------------------------------- the parent: plan, run, report


@dataclass
class BenchmarkResult:
    """The rows of one benchmark, where they were written, and the run's settings and environment."""

    rows: list[dict]
    folder: Path
    settings: dict
    environment: dict
    estimates: list[dict]


def environment_info() -> dict:
    """Device and library versions, recorded with the results."""
    import importlib.metadata

    from .modeling import device_type

    versions = {}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    device = device_type()
    info = {"device": device, "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(), **versions}
    if device == "cuda":
        info.update(_probe_gpu())
        info["peak_flops"] = peak_flops(info["device_name"])
    else:
        import psutil

        info.update(device_name=platform.processor() or "cpu", device_memory_bytes=psutil.virtual_memory().total, peak_flops=None)
    return info


def _probe_gpu() -> dict:
    """The GPU's name, memory and bf16 support, asked in a child process so this one never holds a CUDA context."""
    code = ("import json, torch; p = torch.cuda.get_device_properties(0); print(json.dumps({'device_name': p.name, "
            "'device_memory_bytes': p.total_memory, 'cuda': torch.version.cuda, 'bf16_supported': torch.cuda.is_bf16_supported()}))")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(process.stdout.strip().splitlines()[-1])


def model_config_and_path(args: BenchmarkArguments, device: str):
    """The model's config and a loadable folder: a real checkpoint, or a preset built once with random weights."""
    from transformers import AutoConfig

    from .presets import check_preset_fits_device, preset_config
    from .tiny import TINY_ALIASES, resolve_model_path

    if args.model_path:
        path = resolve_model_path(args.model_path)
        return AutoConfig.from_pretrained(path), path
    check_preset_fits_device(args.preset, device)
    config = preset_config(args.preset)
    if args.preset in TINY_ALIASES:  # cached on disk already, built on a CPU in a second
        return config, resolve_model_path(args.preset)
    code = f"from qwen_helpers.presets import preset_checkpoint; print(preset_checkpoint({args.preset!r}, {device!r}))"
    # Built in its own process, so this one never holds a CUDA context or the random weights
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_worker_env())
    if process.returncode != 0:
        raise RuntimeError(f"--preset {args.preset}: building the random checkpoint failed:\n{process.stderr[-2000:]}")
    return config, process.stdout.strip().splitlines()[-1]


def check_options(args: BenchmarkArguments, device: str) -> None:
    """Refuse GPU-only options on a CPU and a missing optional dependency, with what to do instead."""
    import importlib.util

    if args.use_liger_kernel:
        if device != "cuda":
            raise ValueError("--use_liger_kernel needs a CUDA GPU: Liger's kernels are written in Triton. Leave it off on a CPU.")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ImportError("--use_liger_kernel: liger-kernel is not installed. Install it with `pip install liger-kernel` (or `pip install -e .[liger]`).")
    if args.torch_compile and device != "cuda":
        raise ValueError("--torch_compile is GPU-only in this benchmark: on a CPU compiling takes longer than the run it would speed up.")


def plan_estimates(args: BenchmarkArguments, config, runs: list[tuple[str, bool]], device: str, bf16_supported: bool = True) -> list[dict]:
    """The memory estimate of every run, in the precision it will really use on this device."""
    from .config import LoraArguments

    targets = LoraArguments(target_modules=args.target_modules).target_module_list()
    tokens_per_row = args.seq_len
    batch_size = max(1, args.token_budget // args.seq_len) if args.token_budget else args.batch_size
    estimates = []
    for name, checkpointing in runs:
        precision, _ = device_precision(METHODS[name], device, bf16_supported)
        estimates.append(estimate_memory(
            config, name, tokens_per_row, batch_size, checkpointing, precision, args.lora_r, targets,
            num_virtual_tokens=args.num_virtual_tokens, use_liger=args.use_liger_kernel,
        ))
    return estimates


def run_benchmark(args: BenchmarkArguments, simulate_oom: str | None = None, echo=print) -> BenchmarkResult:
    """Estimate, then run every (method, checkpointing) pair in its own process, then write the result files."""
    from .modeling import device_type

    device = device_type()
    check_options(args, device)
    runs = parse_methods(args.methods, args.checkpointing)
    config, model_path = model_config_and_path(args, device)
    environment = environment_info()
    estimates = plan_estimates(args, config, runs, device, environment.get("bf16_supported", False))
    echo(WEIGHTS_NOTE + ("\n" + CPU_NOTE if device != "cuda" else ""))
    if args.compare_baseline and (args.seq_len, args.batch_size) != (512, 8):
        echo("note: the plain transformers+peft baseline ran 512 x 8 tokens per step; compare like with like.")
    echo(f"Memory estimate before training ({args.model_name}, {args.batch_size} x {args.seq_len} tokens):\n" + estimate_table(estimates))
    rows = []
    for (name, checkpointing), estimate in zip(runs, estimates):
        run_id = _run_id(name, checkpointing)
        echo(f"running {run_id} ...")
        spec = {"args": asdict(args), "method": name, "gradient_checkpointing": checkpointing, "model_path": model_path,
                "simulate_oom": simulate_oom in (name, run_id)}
        skip = _skip_reason(name, estimate, args, device)
        row = {"status": "skipped", "error": skip} if skip else run_in_subprocess(spec, args.timeout)
        rows.append(_finish_row(row, name, checkpointing, estimate, config, args, environment))
        echo(f"  {run_id}: {_status_line(rows[-1])}")
    add_speed_relative_to_full(rows)
    if args.compare_baseline:
        add_baseline(rows, args)
    folder = unused_path(Path(args.output_dir) / datetime.now().strftime("%Y%m%d-%H%M%S"))  # never an earlier run's folder
    settings = {**asdict(args), "model_path_resolved": model_path, "device": device, "note": WEIGHTS_NOTE}
    result = BenchmarkResult(rows, folder, settings, environment, estimates)
    write_results(result)
    echo(f"results: {folder}/results.md, results.json, results.csv, memory.png, throughput.png")
    return result


def _skip_reason(name: str, estimate: dict, args: BenchmarkArguments, device: str) -> str | None:
    """Why a run should not start: a combination that cannot work, or on a CPU, more memory than is free."""
    if METHODS[name].adapter == "prompt_tuning" and args.batching == "packed":
        return "prompt tuning prepends virtual tokens to every row, which padding-free packing cannot express; use --batching dynamic."
    if device == "cuda":
        return None  # a GPU out-of-memory error is caught and becomes an OOM row
    import psutil

    available = psutil.virtual_memory().available
    if estimate["total_bytes"] > 0.8 * available:
        return (f"estimated {estimate['total_bytes'] / GIB:.1f} GiB but only {available / GIB:.1f} GiB of RAM is free: "
                "lower --seq_len or --batch_size, or run on a GPU.")
    return None


def _finish_row(row: dict, name: str, checkpointing: bool, estimate: dict, config, args: BenchmarkArguments, environment: dict) -> dict:
    """Add the run's identity, its estimate, the estimate/measured ratio and the MFU to a worker's row."""
    method = METHODS[name]
    row = {"run": _run_id(name, checkpointing), "method": name, "label": method.label, "gradient_checkpointing": checkpointing,
           "precision": device_precision(method, environment["device"], environment.get("bf16_supported", False))[1], **row}
    row["estimate_bytes"] = estimate["total_bytes"]
    measured = measured_peak(row)
    row["estimate_ratio"] = estimate["total_bytes"] / measured if measured else None
    row["mfu"] = None
    if row.get("status") == "ok" and environment.get("peak_flops"):
        context = row["computed_tokens_per_step"] / row["sequences_per_step"]  # attention spans one sample
        flops = model_flops_per_token(config, context, method.adapter == "full")
        row["mfu"] = row["tokens_per_second"] * flops / environment["peak_flops"]
    return row


def measured_peak(row: dict) -> int | None:
    """The peak the tables report: above the process's start on a CPU (RSS), max_memory_allocated on CUDA."""
    return row.get("peak_above_start_bytes", row.get("peak_bytes"))


def _status_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('error', '')[:200]}"
    return (f"peak {measured_peak(row) / GIB:.2f} GiB, {row['tokens_per_second']:,.0f} tokens/s, "
            f"trainable {row['trainable']:,} ({row['trainable_percent']:.3f}%), {row['precision']}")


def add_speed_relative_to_full(rows: list[dict]) -> None:
    """Speed relative to full fine-tuning (same checkpointing setting when available, else without)."""
    full = {row["gradient_checkpointing"]: row["tokens_per_second"] for row in rows if row["method"] == "full" and row["status"] == "ok"}
    for row in rows:
        reference = full.get(row["gradient_checkpointing"], full.get(False))
        row["speed_vs_full"] = row["tokens_per_second"] / reference if row.get("status") == "ok" and reference else None


def add_baseline(rows: list[dict], args: BenchmarkArguments) -> None:
    """Put the plain transformers+peft figures (shared/benchmarks JSON) beside each matching row, with ratios."""
    baseline = json.loads(Path(args.compare_baseline).read_text(encoding="utf-8"))
    size = args.baseline_size or BASELINE_SIZES.get(args.preset if not args.model_path else "")
    for row in rows:
        match = _baseline_match(baseline, row, size, args)
        if match is None or "error" in match:
            continue
        tokens = match.get("tok_s", match.get("real_tok_s"))
        row.update(baseline_peak_bytes=match["peak_gib"] * GIB if match.get("peak_gib") else None, baseline_tokens_per_second=tokens)
        if row.get("status") == "ok":
            row["memory_vs_baseline"] = row["peak_bytes"] / row["baseline_peak_bytes"] if row["baseline_peak_bytes"] else None
            row["speed_vs_baseline"] = row["tokens_per_second"] / tokens if tokens else None


def _baseline_match(baseline: list[dict], row: dict, size: str | None, args: BenchmarkArguments) -> dict | None:
    for entry in baseline:
        if size and entry.get("size") != size:
            continue
        if "mode" in entry:  # plain_hf_varlen.py: LoRA bf16 by batching mode
            if row["run"] == "lora_bf16" and entry["mode"] == BASELINE_BATCHING.get(args.batching):
                return entry
        elif entry.get("method") == BASELINE_METHOD_NAMES.get(row["method"], row["method"]) and entry.get("grad_ckpt") == row["gradient_checkpointing"]:
            return entry
    return None


# ---------------------------------------------------------------- result files


CSV_FIELDS = [
    "run", "label", "gradient_checkpointing", "status", "precision", "trainable", "total", "trainable_percent",
    "peak_bytes", "reserved_bytes", "peak_above_start_bytes", "peak_kind", "estimate_bytes", "estimate_ratio",
    "step_seconds", "tokens_per_second", "real_tokens_per_step", "computed_tokens_per_step", "speed_vs_full", "mfu",
    "baseline_peak_bytes", "baseline_tokens_per_second", "memory_vs_baseline", "speed_vs_baseline",
    "loss_first", "loss_last", "load_seconds", "process_seconds", "error",
]


def markdown_table(rows: list[dict]) -> str:
    """The performance table: method, trainable parameters, peak memory, speed vs full FT, estimate and ratio."""
    with_baseline = any("baseline_tokens_per_second" in row for row in rows)
    header = ["method", "runs in", "grad ckpt", "trainable params", "peak memory (GiB)", "estimate (GiB)", "estimate / measured",
              "tokens/s", "speed vs full FT", "MFU"]
    header += ["plain HF peak (GiB)", "plain HF tokens/s", "memory vs plain HF", "speed vs plain HF"] if with_baseline else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        ok = row["status"] == "ok"
        measured = measured_peak(row)
        cells = [
            row["label"] + ("" if ok else f" ({row['status']})"),
            row.get("precision", ""),
            "yes" if row["gradient_checkpointing"] else "no",
            f"{row['trainable']:,} ({row['trainable_percent']:.3f}%)" if ok else "",
            _gib(measured) if ok else row["status"],
            _gib(row["estimate_bytes"]),
            _number(row.get("estimate_ratio"), "{:.2f}") if ok else "",
            _number(row.get("tokens_per_second"), "{:,.0f}"),
            _number(row.get("speed_vs_full"), "{:.2f}x"),
            _number(row.get("mfu"), "{:.1%}"),
        ]
        if with_baseline:
            cells += [_gib(row.get("baseline_peak_bytes")), _number(row.get("baseline_tokens_per_second"), "{:,.0f}"),
                      _number(row.get("memory_vs_baseline"), "{:.2f}x"), _number(row.get("speed_vs_baseline"), "{:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gib(value) -> str:
    return f"{value / GIB:.2f}" if value else ""


def _number(value, pattern: str) -> str:
    return pattern.format(value) if value is not None else ""


def results_markdown(result: BenchmarkResult) -> str:
    """results.md: what ran, on what, the table, and how to read it."""
    env, settings = result.environment, result.settings
    cpu = env["device"] != "cuda"
    lines = [
        f"# Benchmark: {settings['model_path'] or settings['preset']} on {env['device_name']}",
        "",
        f"{_workload(settings)}, "
        f"{settings['steps']} timed steps after {settings['warmup_steps']} warm-up steps; torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}.",
        "",
        markdown_table(result.rows),
        "",
        f"- {WEIGHTS_NOTE}",
        "- Peak memory: " + ("peak RSS of each method's process above its RSS before loading the model (estimate / measured uses the same)." if cpu
                             else "`torch.cuda.max_memory_allocated` in each method's own process; reserved memory is in results.csv."),
        "- tokens/s counts real (non-pad) tokens; MFU counts model FLOPs (no recomputation) against the card's dense bf16 rate.",
    ]
    if cpu:
        lines.append(f"- {CPU_NOTE} The memory estimate targets CUDA and is shown here for reference only.")
    return "\n".join(lines) + "\n"


def _workload(settings: dict) -> str:
    """One phrase for the workload: tokens per step, which data, which batching."""
    if settings["token_budget"]:
        shape = f"batches of up to {settings['token_budget']} tokens (samples up to {settings['seq_len']})"
    else:
        shape = f"{settings['batch_size']} x {settings['seq_len']} tokens per step"
    if settings["data"] == "synthetic" and settings["batching"] != "packed":
        return f"{shape}, synthetic fixed-length random tokens"
    return f"{shape}, {settings['data']} data, {settings['batching']} batching"


def write_results(result: BenchmarkResult) -> None:
    """results.json, results.csv, results.md and the memory and throughput bar charts."""
    from .plots import plot_bars, plot_grouped_bars

    folder = result.folder
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"settings": result.settings, "environment": result.environment, "estimates": result.estimates, "rows": result.rows}
    (folder / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    with open(folder / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    (folder / "results.md").write_text(results_markdown(result), encoding="utf-8")
    ok = [row for row in result.rows if row["status"] == "ok"]
    measured = {row["run"]: measured_peak(row) / GIB for row in ok}
    memory = {"measured": measured, "estimate": {row["run"]: row["estimate_bytes"] / GIB for row in ok}}
    plot_grouped_bars(memory, "peak memory (GiB)", "Peak memory per method").savefig(folder / "memory.png", dpi=100)
    throughput = {row["run"]: row["tokens_per_second"] for row in ok}
    plot_bars(throughput, "real tokens / s", "Training throughput per method").savefig(folder / "throughput.png", dpi=100)


# ---------------------------------------------------------------- command line


def parse_arguments(argv: list[str]) -> tuple[BenchmarkArguments, str | None]:
    """Parse the flags; the hidden ``--_simulate_oom RUN`` (tests only) is taken out first."""
    from transformers import HfArgumentParser

    argv, simulate_oom = list(argv), None
    if SIMULATED_OOM_FLAG in argv:
        index = argv.index(SIMULATED_OOM_FLAG)
        simulate_oom = argv[index + 1]
        del argv[index:index + 2]
    from .errors import parse_flags

    (args,) = parse_flags(HfArgumentParser(BenchmarkArguments), argv)
    return args, simulate_oom


@command_boundary
def main(argv: list[str] | None = None) -> int:
    """``python -m qwen_helpers.benchmark``: estimate, run each method in its own process, write the tables."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        return worker_main(argv[1])
    args, simulate_oom = parse_arguments(argv)
    result = run_benchmark(args, simulate_oom)
    print(markdown_table(result.rows))
    return 0 if any(row["status"] == "ok" for row in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

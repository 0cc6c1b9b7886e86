"""The benchmark's settings and plan: which rows to run, on which data, in which order; then run them and report.

Fixed-shape mode (``--data synthetic``, the default) trains every method on examples of exactly
``--seq_len`` tokens, ``--batch_size`` per step. Variable-length mode (``--data FILE`` or ``--data
lognormal``) trains LoRA on examples of different lengths and compares the batching modes in one run:
pad to max, dynamic padding (plain HF and the kit), padding-free and token-budget batches (the kit).
``--compare plain`` runs the plain transformers + peft reference right after each kit row, ``--compare trl``
TRL's SFTTrainer (``plain,trl``: both), each in its own process on the same data and settings, so they share the
machine's state; the table reports kit / reference ratios. ``--repeats N`` runs each kit row and its references
N times in interleaved rounds (the order rotating each round): rows show medians, ratios the median and range of
the per-round ratios.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from ..common.files import unused_path
from .estimate import RUNS, device_precision, estimate_memory, parse_methods, run_id

BATCHING_MODES = ("pad_max", "dynamic", "padding_free", "token_budget")
REFERENCES = ("plain", "trl")  # --compare: plain transformers + peft Trainer; TRL's SFTTrainer


@dataclass
class BenchmarkArguments:
    """What to benchmark and on which workload."""

    preset: str = field(default="tiny", metadata={"help": "Architecture with random weights: tiny, tiny-qwen3, qwen2.5-0.5b|1.5b|3b|7b|14b, qwen3-0.6b|1.7b|4b|8b."})
    model_path: str | None = field(default=None, metadata={"help": "A real local checkpoint instead of --preset."})
    methods: str = field(default="all", metadata={
        "help": f"'all', 'variants' (lora_bf16 and LoRA's variants), 'trl' (DPO, GRPO) or a comma list of: {', '.join(RUNS)}."})
    checkpointing: Literal["both", "off", "on"] = field(default="both", metadata={"help": "Run each method without and/or with gradient checkpointing."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per example (synthetic data) or max_length (variable-length data)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimiser step (per_device_train_batch_size)."})
    steps: int = field(default=10, metadata={"help": "Timed Trainer steps."})
    warmup_steps: int = field(default=2, metadata={"help": "Untimed Trainer steps first (allocator, kernels, compilation)."})
    data: str = field(default="synthetic", metadata={"help": "'synthetic' (fixed --seq_len), 'lognormal' (variable lengths, mean --mean_length), or a JSON/JSONL data file."})
    mean_length: int = field(default=240, metadata={"help": "Mean example length of --data lognormal (clipped to 16..--seq_len)."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the synthetic data."})
    batching: str = field(default="auto", metadata={"help": f"Variable-length data: 'auto' (all) or a comma list of {', '.join(BATCHING_MODES)}."})
    token_budget: int | None = field(default=None, metadata={"help": "Tokens per step of the token_budget row (default: --batch_size x the mean example length)."})
    compare: str = field(default="none", metadata={
        "help": "References beside each kit SFT row: 'plain' (transformers + peft Trainer), 'trl' (TRL's SFTTrainer), "
                "'plain,trl' or 'none'."})
    repeats: int = field(default=1, metadata={
        "help": "Interleaved rounds: each kit row and its references run this many times, the order rotating each "
                "round (medians; kit / reference ratios as the median and range of the per-round ratios)."})
    cpu_allocator_tuning: bool = field(default=True, metadata={"help": "On a CPU, the glibc setting for both sides (kit and plain) alike."})
    use_liger_kernel: bool = field(default=False, metadata={"help": "Liger's fused Triton kernels (GPU only; pip install liger-kernel)."})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (GPU only)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    target_modules: str = field(default="q_proj,k_proj,v_proj", metadata={"help": "LoRA targets, comma list or all-linear."})
    num_virtual_tokens: int = field(default=20, metadata={"help": "Soft prompt length for prompt tuning."})
    output_dir: str = field(default="outputs/benchmark", metadata={"help": "Each run writes a <timestamp>/ folder here (or --folder)."})
    folder: str | None = field(default=None, metadata={"help": "Write the results into exactly this folder instead (e.g. docs/benchmarks/<date>-<gpu>)."})
    compare_baseline: str | None = field(default=None, metadata={"help": "A committed reference JSON (docs/benchmarks/reference-*) to put beside matching rows."})
    baseline_size: str | None = field(default=None, metadata={"help": "Which size rows of --compare_baseline to use (default: from --preset; none for other models)."})
    timeout: int = field(default=1800, metadata={"help": "Seconds before one row's process is stopped."})

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be 0 or more, got {self.warmup_steps}.")
        if self.data not in ("synthetic", "lognormal") and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data}: no such file. Pass 'synthetic', 'lognormal' or a JSON/JSONL "
                             "data file.")
        runs = [RUNS[name] for name, _ in parse_methods(self.methods, self.checkpointing)]  # an unknown method now
        trl = sorted({run.name for run in runs if run.objective != "sft"})
        if trl and self.methods.strip() != "all" and self.variable_length:
            raise ValueError(f"--methods {','.join(trl)} run on fixed-shape data only: drop them or pass --data synthetic.")
        if "grpo_lora" in trl and self.batch_size % 2:
            raise ValueError(f"--batch_size {self.batch_size}: grpo_lora needs an even number of completions per step "
                             "(prompts x at least 2 generations); pass an even --batch_size or drop grpo_lora.")
        from ..common.presets import PRESETS, preset_names
        from ..common.tiny import TINY_ALIASES

        if not self.model_path and self.preset not in PRESETS and self.preset not in TINY_ALIASES:
            raise ValueError(f"--preset {self.preset} is not known. Choose one of: {', '.join(preset_names())}, "
                             "or pass --model_path.")
        modes = self.batching_modes()
        if any(mode not in BATCHING_MODES for mode in modes):
            raise ValueError(f"--batching {self.batching}: use 'auto' or a comma list of {', '.join(BATCHING_MODES)}.")
        if self.compare.strip() != "none" and any(name not in REFERENCES for name in self.references()):
            raise ValueError(f"--compare {self.compare}: use 'none', 'plain', 'trl' or 'plain,trl'.")

    @property
    def model_name(self) -> str:
        return self.model_path or self.preset

    @property
    def variable_length(self) -> bool:
        return self.data != "synthetic"

    def references(self) -> list[str]:
        """The reference sides ``--compare`` asks for, in run order (plain, then TRL)."""
        named = {name.strip() for name in self.compare.split(",")} - {"none", ""}
        return [name for name in REFERENCES if name in named] + sorted(named - set(REFERENCES))

    def batching_modes(self) -> list[str]:
        if self.batching.strip() == "auto":
            return list(BATCHING_MODES)
        return [mode.strip() for mode in self.batching.split(",") if mode.strip()]


# ---------------------------------------------------------------- data


def records_of_length(tokenizer, lengths: list[int]) -> list[dict]:
    """Instruction records whose chat-formatted examples are exactly these token lengths (when long enough).

    The answer is a run of one-token words, sized from the template's overhead, so both sides train on
    examples of known length without any data file of that shape in the repository. The prompt is the
    shorter of the template's default system prompt and an empty one (``--overflow truncate_prompt``
    never cuts inside a turn, so a record longer than asked would be dropped).
    """
    from ..data.encoding import tokenize_example

    prompts = ({"instruction": "Repeat."}, {"instruction": "Repeat.", "system": ""})
    overheads = [len(tokenize_example(tokenizer, {**prompt, "output": ""})["input_ids"]) for prompt in prompts]
    prompt, overhead = min(zip(prompts, overheads), key=lambda pair: pair[1])
    records = []
    for length in lengths:
        words = max(1, length - overhead)
        record = {**prompt, "output": " ".join(["go"] * words)}
        for _ in range(3):  # a word can merge with its neighbour; correct by the difference
            actual = len(tokenize_example(tokenizer, record)["input_ids"])
            if actual == length or words + length - actual < 1:
                break
            words += length - actual
            record = {**prompt, "output": " ".join(["go"] * words)}
        records.append(record)
    return records


def lognormal_lengths(count: int, mean: int, longest: int, seed: int) -> list[int]:
    """Example lengths drawn log-normally (sigma 0.8, as instruction data), with the given mean, clipped to 16..longest."""
    import math

    generator = random.Random(seed)
    sigma = 0.8
    mu = math.log(mean) - sigma**2 / 2
    return [min(longest, max(16, round(generator.lognormvariate(mu, sigma)))) for _ in range(count)]


def prepare_data(args: BenchmarkArguments, model_path: str, folder: Path) -> tuple[str, list[int]]:
    """The data file both sides train on, and its example lengths (for the estimate and the MFU)."""
    from ..data.loading import load_dataset_for_training
    from ..models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    if args.data in ("synthetic", "lognormal"):
        count = args.batch_size * (args.steps + args.warmup_steps) * 2
        lengths = [args.seq_len] * count if args.data == "synthetic" else lognormal_lengths(count, args.mean_length, args.seq_len, args.data_seed)
        path = folder / f"{args.data}-data.json"
        path.write_text(json.dumps(records_of_length(tokenizer, lengths)), encoding="utf-8")
        data_path = str(path)
    else:
        data_path = args.data
    dataset = load_dataset_for_training(tokenizer, data_path, args.seq_len, "truncate_prompt").dataset
    return data_path, [len(ids) for ids in dataset["input_ids"]]


# ---------------------------------------------------------------- rows


def plan_rows(args: BenchmarkArguments, lengths: list[int]) -> list[dict]:
    """The rows, each once: every kit row followed by the references ``--compare`` names (see :func:`run_order`)."""
    rows = []
    references = args.references()
    if not args.variable_length:
        for name, checkpointing in parse_methods(args.methods, args.checkpointing):
            rows.append({"side": "kit", "method": name, "gradient_checkpointing": checkpointing, "batching": "kit default"})
            if RUNS[name].objective == "sft":  # TRL's DPO and GRPO trainers are their own reference
                rows += [{"side": side, "method": name, "gradient_checkpointing": checkpointing, "batching": None}
                         for side in references]
        return rows
    methods = [name for name, _ in parse_methods(args.methods if args.methods != "all" else "lora_bf16", "off")]
    checkpointing = args.checkpointing == "on"
    trl = ["trl"] if "trl" in references else []  # TRL's padding-free batches, beside the kit's (plain rows: always)
    for name in methods:
        for mode in args.batching_modes():
            sides = {"pad_max": ["plain"], "dynamic": ["kit", "plain"], "padding_free": ["kit", *trl], "token_budget": ["kit"]}[mode]
            for side in sides:
                rows.append({"side": side, "method": name, "gradient_checkpointing": checkpointing, "batching": mode})
    return rows


def run_order(rows: list[dict], repeats: int) -> list[tuple[int, int]]:
    """(row index, round) in the order to run: each method's rows (kit and references) ``repeats`` times in a row,
    their order rotating each round (kit, plain, TRL; plain, TRL, kit; ...), so every kit / reference pair of a round
    ran minutes apart on the same machine state and no side is always first."""
    from ..evaluation.paired import rotated

    groups: dict[tuple, list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault((row["method"], row["gradient_checkpointing"]), []).append(index)
    return [(index, round_index) for indices in groups.values() for round_index in range(repeats)
            for index in rotated(indices, round_index)]


def default_token_budget(args: BenchmarkArguments, lengths: list[int]) -> int:
    """The token_budget row's budget: --token_budget, or as many tokens as --batch_size average examples, at least one longest."""
    mean = sum(lengths) / len(lengths)
    return args.token_budget or max(max(lengths), round(args.batch_size * mean))


def row_spec(row: dict, args: BenchmarkArguments, model_path: str, data_path: str, device: str, bf16_supported: bool, budget: int) -> dict:
    """Everything the worker process needs for one row (JSON)."""
    method = RUNS[row["method"]]
    precision, _ = device_precision(method, device, bf16_supported)
    padding_free = {"padding_free": True, "token_budget": True}.get(row["batching"], False if row["batching"] in ("dynamic", "pad_max") else None)
    if method.method.prepends_virtual_tokens and padding_free:
        padding_free = None  # the kit decides (off for prompt tuning); the row says so in its notes
    return {"args": asdict(args), **row, "method_spec": method_spec(method), "model_path": model_path, "data_path": data_path,
            "device": device, "precision": precision, "padding_free": padding_free,
            "token_budget": budget if row["batching"] == "token_budget" else None,
            "cpu_allocator_tuning": args.cpu_allocator_tuning}


def method_spec(run) -> dict:
    """What the worker needs of a benchmark row's method (JSON): its registry name and the row's options."""
    return {"name": run.name, "method": run.method.name, "adapter": run.adapter, "objective": run.objective,
            "load_in_4bit": run.load_in_4bit,
            "adapts_linear_layers": run.method.adapts_linear_layers, "prepends_virtual_tokens": run.method.prepends_virtual_tokens, "lora_options": [list(option) for option in run.lora_options],
            "fp32_master_weights": run.fp32_master_weights}


def tokens_per_step(row: dict, args: BenchmarkArguments, lengths: list[int], budget: int) -> tuple[int, int]:
    """(examples, tokens per example) the estimate should assume for a row's batching."""
    mean, longest = sum(lengths) / len(lengths), max(lengths)
    if RUNS[row["method"]].objective != "sft":  # TRL pads its batches: --batch_size pairs or completions of --seq_len
        return args.batch_size, args.seq_len
    if row["batching"] == "token_budget":
        return 1, budget
    if row["batching"] == "pad_max":
        return args.batch_size, args.seq_len
    trl_flat = row["side"] == "trl" and not RUNS[row["method"]].method.prepends_virtual_tokens  # TRL's padding_free=True
    if row["batching"] == "padding_free" or (row["batching"] == "kit default" and row["side"] == "kit") or trl_flat:
        return 1, round(args.batch_size * mean)
    return args.batch_size, longest  # dynamic padding: the longest example bounds the peak


def estimate_gap(config) -> str | None:
    """Why the memory and FLOP estimates do not model this architecture (None for the dense Qwen2/Qwen3 they do)."""
    from ..common.families import family_of

    family = family_of(getattr(config, "model_type", None))
    if family and (family.hybrid_linear_attention or family.has_experts):
        return (f"the memory and FLOP estimates model dense Qwen2/Qwen3 layers, not {family.label}'s "
                f"{'linear attention' if family.hybrid_linear_attention else 'routed experts'}; measured figures only")
    return None


def plan_estimates(args: BenchmarkArguments, config, runs: list, device: str, bf16_supported: bool = True, lengths: list[int] | None = None) -> list[dict]:
    """The memory estimate of every run, in the precision it will really use on this device.

    ``runs`` are (method, checkpointing) pairs (fixed-shape workload) or planned row dicts.
    """
    from ..run.config import LoraArguments

    targets = LoraArguments(target_modules=args.target_modules).target_module_list()
    lengths = lengths or [args.seq_len]
    budget = default_token_budget(args, lengths)
    estimates = []
    unmodelled = estimate_gap(config)
    for run in runs:
        row = run if isinstance(run, dict) else {"side": "kit", "method": run[0], "gradient_checkpointing": run[1], "batching": "pad_max"}
        precision, _ = device_precision(RUNS[row["method"]], device, bf16_supported)
        if unmodelled:  # measured only: a row never carries a number the estimate cannot stand behind
            estimates.append({"method": row["method"], "gradient_checkpointing": row["gradient_checkpointing"], "dtype": precision,
                              "parts": {}, "total_bytes": 0, "unmodelled": unmodelled})
            continue
        batch, tokens = tokens_per_step(row, args, lengths, budget)
        estimates.append(estimate_memory(config, row["method"], tokens, batch, row["gradient_checkpointing"], precision, args.lora_r, targets,
                                         num_virtual_tokens=args.num_virtual_tokens, use_liger=args.use_liger_kernel))
    return estimates


@dataclass
class BenchmarkResult:
    """The rows of one benchmark, where they were written, and the run's settings and environment."""

    rows: list[dict]
    folder: Path
    settings: dict
    environment: dict
    estimates: list[dict]


def result_folder(args: BenchmarkArguments) -> Path:
    return Path(args.folder) if args.folder else unused_path(Path(args.output_dir) / datetime.now().strftime("%Y%m%d-%H%M%S"))  # never an earlier run's folder


__all__ = ["BenchmarkArguments", "BenchmarkResult", "plan_rows", "plan_estimates", "prepare_data", "row_spec", "run_id"]

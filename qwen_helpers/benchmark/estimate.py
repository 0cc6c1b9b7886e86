"""What a training step costs before it runs: the methods, the memory estimate and the FLOPs behind MFU.

No coefficient here is fitted by regression: every term counts a tensor the step keeps (weights,
adapter and optimiser state, per-layer activations, logits and the loss's fp32 copies) from the
model's shapes. Which tensors to count was decided against ten H200 measurements of plain
transformers + peft (tests/test_benchmark.py's H200_PEAKS: 0.5B and 7B, LoRA, QLoRA, full, prompt
tuning, Liger); ``held_out_errors`` reports the error on the reference rows that were not used.
"""

from __future__ import annotations

from ..run.methods import BenchmarkRun, benchmark_runs

GIB = 2**30

# The benchmark's rows come from the method registry (qwen_helpers/run/methods.py): each method names its rows.
RUNS: dict[str, BenchmarkRun] = benchmark_runs()
VARIANTS = ("lora_bf16", *(name for name, run in RUNS.items() if run.is_variant))  # --methods variants
TRL_ROWS = tuple(name for name, run in RUNS.items() if run.objective != "sft")  # --methods trl: DPO and GRPO

# Dense bf16 matrix peak per card (fp16 where the card has no bf16), in FLOP/s, from the vendors' data sheets.
PEAK_FLOPS = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("T4", 65e12), ("V100", 125e12),
]




def _bytes_per_element(dtype) -> int:
    return {"fp32": 4, "float32": 4, "torch.float32": 4}.get(str(dtype), 2)


def activation_bytes_per_token_per_layer(config, element: int, trainable_base: bool, lora_inputs: int, lora_dropout: bool, use_liger: bool) -> float:
    """Bytes autograd keeps for one token in one decoder layer (sdpa attention, no checkpointing).

    Counted: the fp32 copies RMSNorm makes of its input (Liger's norm keeps the input only), the q/k/v
    and output tensors sdpa keeps, the MLP's gate, up and SiLU outputs (Liger recomputes SiLU),
    Qwen3's q/k norms, LoRA's dropout masks and dropped inputs, and for full fine-tuning the inputs
    every weight gradient needs. Checked against H200 measurements of plain transformers + peft.
    """
    from ..common.presets import linear_shapes

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
    reference_model: bool = True,
) -> dict:
    """Peak training memory of one benchmark row, as named parts that add up to ``total_bytes``.

    ``dtype`` is the compute precision ("fp16", "bf16" or "fp32"; CPUs run fp32). The estimate is for
    the peak of a training step, when every activation, the logits and the optimiser state coexist:
    weights (4-bit with its quantisation constants for QLoRA), trainable parameters with their fp32
    gradients and two AdamW moments, activations per layer x token (or, with checkpointing, each
    layer's input plus one recomputed layer), and the logits at vocabulary size with the fp32 copies
    the loss makes. It aims at CUDA's ``max_memory_allocated`` within about 20%.

    DPO rows (``dpo_lora``): ``batch_size`` pairs of ``seq_len``-token chosen and rejected answers, which
    TRL runs as one batch of 2 x batch_size sequences. GRPO rows (``grpo_lora``): ``batch_size``
    completions (prompts x generations, as TRL counts them) of ``seq_len`` prompt + completion tokens.
    ``reference_model``: DPO's reference, or GRPO's KL term (the kit's beta 0.04; TRL's beta 0 skips it).
    """
    from ..common.presets import LINEAR_NAMES, linear_shapes, lora_trainable_parameters, parameter_breakdown

    spec = RUNS[method]
    element = _bytes_per_element(dtype)
    counts = parameter_breakdown(config)
    total_parameters = sum(counts.values())
    sequences = batch_size * (2 if spec.objective == "dpo" else 1)  # DPO: chosen and rejected in one batch
    tokens = sequences * (seq_len + (num_virtual_tokens if spec.method.prepends_virtual_tokens else 0))
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
    if spec.method.trains_base_weights:
        trainable = total_parameters
    elif spec.method.prepends_virtual_tokens:
        trainable = num_virtual_tokens * hidden
        parts["trainable adapter weights (fp32)"] = 4 * trainable
    else:
        trainable = lora_trainable_parameters(config, targets, lora_r)
        if dict(spec.lora_options).get("use_dora"):  # one magnitude per output row of each adapted layer
            trainable += layers * sum(linear_shapes(config)[name][1] for name in targets)
        parts["trainable adapter weights (fp32)"] = 4 * trainable
    parts["gradients (fp32)"] = 4 * trainable
    parts["AdamW moments (2 x fp32)"] = 8 * trainable

    lora_inputs = sum(linear_shapes(config)[name][0] for name in targets) if spec.method.adapts_linear_layers else 0
    per_layer = activation_bytes_per_token_per_layer(
        config, element, spec.method.trains_base_weights, lora_inputs, lora_dropout > 0, use_liger
    )
    if dict(spec.lora_options).get("use_dora"):
        # DoRA keeps, per token and adapted layer, the LoRA output and the rescaled sum its magnitude's gradient needs
        per_layer += 2 * element * sum(linear_shapes(config)[name][1] for name in targets)
    if gradient_checkpointing:
        residual = 4 if (spec.fp32_master_weights or element == 4) else element
        parts["checkpointed layer inputs (layers x tokens x hidden)"] = layers * tokens * hidden * residual
        parts["one layer recomputed in backward"] = per_layer * tokens
    else:
        parts["activations (layers x tokens)"] = layers * per_layer * tokens
    if spec.objective != "sft":
        parts.update(_trl_parts(config, spec.objective, tokens, sequences, seq_len, element, reference_model, parts))
    elif not use_liger:
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


FUSED_HEAD_TILE = 32768  # TRL 1.16's _CHUNKED_LOGPROB_CHUNK_SIZE: tokens the fused LM head projects at once


def _trl_parts(config, objective: str, tokens: int, sequences: int, seq_len: int, element: int,
               reference_model: bool, parts: dict) -> dict:
    """The parts TRL's DPOTrainer and GRPOTrainer add to (or take from) a LoRA step.

    - Logits: both trainers call the model with TRL's fused LM head (``add_fused_lm_head``), which projects
      at most FUSED_HEAD_TILE trained tokens at a time to per-token log-probabilities and recomputes the tile
      in backward: one tile's logits and their fp32 log-softmax, instead of the SFT step's three full copies.
    - Reference: with a peft model and no ``ref_model`` TRL runs the same weights with the adapter disabled
      (``use_adapter(model, None)``) under ``no_grad``: no second copy of the weights, no kept activations,
      only its per-token log-probabilities (fp32) until the loss.
    - GRPO's generation (``model.generate`` before the step, under ``no_grad``): the KV cache of every
      completion at full length (layers x 2 x key/value width x tokens), freed before the training forward,
      so it adds only what exceeds the step's activations.
    """
    vocab = config.vocab_size
    tile = min(tokens, FUSED_HEAD_TILE)
    extra = {f"fused LM head: one tile of logits ({tile:,} tokens x {vocab:,}, + fp32 log-softmax)": (element + 4) * tile * vocab}
    if reference_model:
        extra["reference log-probs (adapter off, same weights; fp32 per token)"] = 4 * tokens
    if objective == "grpo":
        kv_width = config.num_key_value_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        kv_cache = config.num_hidden_layers * 2 * kv_width * element * sequences * seq_len
        training = sum(value for name, value in parts.items() if "activations" in name or "layer" in name)
        extra["generation: KV cache beyond the step's activations (freed before training)"] = max(0, kv_cache - training)
    return extra


def estimate_table(estimates: list[dict]) -> str:
    """The estimates as a markdown table, one column per run, one row per part (GiB)."""
    names = list(dict.fromkeys(part for estimate in estimates for part in estimate["parts"]))
    header = "| part | " + " | ".join(run_id(e["method"], e["gradient_checkpointing"]) for e in estimates) + " |"
    lines = [header, "|---" * (len(estimates) + 1) + "|"]
    for name in names:
        cells = [f"{e['parts'][name] / GIB:.2f}" if name in e["parts"] else "" for e in estimates]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total (GiB)** | " + " | ".join(f"**{e['total_bytes'] / GIB:.2f}**" for e in estimates) + " |")
    return "\n".join(lines)



def run_id(method: str, gradient_checkpointing: bool) -> str:
    return f"{method}+gc" if gradient_checkpointing else method


def parse_methods(methods: str, checkpointing: str = "both") -> list[tuple[str, bool]]:
    """(method, gradient checkpointing) pairs from ``--methods`` and ``--checkpointing``."""
    keywords = {"all": list(RUNS), "variants": list(VARIANTS), "trl": list(TRL_ROWS)}
    names = keywords.get(methods.strip()) or [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}. Use 'all', 'variants' "
                         f"(LoRA and its variants), 'trl' (DPO and GRPO) or a comma list of: {', '.join(RUNS)}.")
    flags = {"both": [False, True], "off": [False], "on": [True]}[checkpointing]
    return [(name, flag) for name in names for flag in flags]


def device_precision(method: BenchmarkRun, device: str, bf16_supported: bool = True) -> tuple[str, str]:
    """The precision a method really runs in here, and a note when it differs from what it asks for (the kit's one policy)."""
    from ..run.precision import decide_precision

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

    ``context`` is the mean number of keys a token attends to (``causal_context``), not the sequence length.

    A frozen base still needs the gradients with respect to its inputs (one more forward's worth), not
    those of its weights; recomputation under checkpointing is not counted (model FLOPs, as in MFU).
    """
    from ..common.presets import parameter_breakdown

    counts = parameter_breakdown(config)
    matmul = counts["linear"] + (counts["lm_head"] or counts["embedding"])
    q_dim = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    attention = 4 * config.num_hidden_layers * context * q_dim  # QK^T and AV over the keys this token attends to
    return (3 if trains_base else 2) * 2 * matmul + 3 * attention


def causal_context(lengths: list[int], virtual_tokens: int = 0) -> float:
    """Mean number of keys a token attends to under a causal mask, over examples of these lengths.

    Token i of an example sees i + 1 keys, so an example of L tokens contributes L (L + 1) / 2;
    prompt tuning's virtual tokens lengthen every example. Averaged over tokens, not examples.
    """
    full = [length + virtual_tokens for length in lengths]
    return sum(length * (length + 1) / 2 for length in full) / max(1, sum(full))


"""What a training step costs before it runs: the methods, the memory estimate and the FLOPs behind MFU.

No coefficient here is fitted by regression: every term counts a tensor the step keeps (weights,
adapter and optimiser state, per-layer activations, logits and the loss's fp32 copies) from the
model's shapes. Which tensors to count was decided against ten H200 measurements of plain
transformers + peft (tests/test_benchmark.py's H200_PEAKS: 0.5B and 7B, LoRA, QLoRA, full, prompt
tuning, Liger); ``held_out_errors`` reports the error on the reference rows that were not used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GIB = 2**30

@dataclass(frozen=True)
class Method:
    """One fine-tuning method as the benchmark runs it: which adapter, which precision, 4-bit or not."""

    name: str
    label: str
    adapter: Literal["full", "lora", "prompt_tuning"]
    precision: Literal["fp16", "bf16"]  # autocast dtype on a GPU; CPUs fall back to fp32
    load_in_4bit: bool = False
    lora_options: tuple[tuple[str, object], ...] = ()  # a LoRA variant: LoraArguments fields (use_dora, ...)

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
    # LoRA's variants, each beside lora_bf16 (its speed reference): the same method with one peft option
    "lora_dora": Method("lora_dora", "LoRA bf16 + DoRA", "lora", "bf16", lora_options=(("use_dora", True),)),
    "lora_rslora": Method("lora_rslora", "LoRA bf16 + rsLoRA", "lora", "bf16", lora_options=(("use_rslora", True),)),
    "lora_pissa": Method("lora_pissa", "LoRA bf16, PiSSA start", "lora", "bf16",
                         lora_options=(("init_lora_weights", "pissa_niter_4"),)),
    "lora_loraplus": Method("lora_loraplus", "LoRA+ bf16 (ratio 16)", "lora", "bf16",
                            lora_options=(("loraplus_lr_ratio", 16.0),)),
}
VARIANTS = ("lora_bf16", "lora_dora", "lora_rslora", "lora_pissa", "lora_loraplus")  # --methods variants

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
    from ..presets import linear_shapes

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
    from ..presets import LINEAR_NAMES, linear_shapes, lora_trainable_parameters, parameter_breakdown

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
        if dict(spec.lora_options).get("use_dora"):  # one magnitude per output row of each adapted layer
            trainable += layers * sum(linear_shapes(config)[name][1] for name in targets)
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
    if dict(spec.lora_options).get("use_dora"):
        # DoRA keeps, per token and adapted layer, the LoRA output and the rescaled sum its magnitude's gradient needs
        per_layer += 2 * element * sum(linear_shapes(config)[name][1] for name in targets)
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
    keywords = {"all": list(METHODS), "variants": list(VARIANTS)}
    names = keywords.get(methods.strip()) or [name.strip() for name in methods.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(empty)'}. Use 'all', 'variants' "
                         f"(LoRA and its variants) or a comma list of: {', '.join(METHODS)}.")
    flags = {"both": [False, True], "off": [False], "on": [True]}[checkpointing]
    return [(name, flag) for name in names for flag in flags]


def device_precision(method: Method, device: str, bf16_supported: bool = True) -> tuple[str, str]:
    """The precision a method really runs in here, and a note when it differs from what it asks for (the kit's one policy)."""
    from ..precision import decide_precision

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
    from ..presets import parameter_breakdown

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


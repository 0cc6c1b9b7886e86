"""The one table of Qwen model families: per ``config.json`` ``model_type``, everything the kit decides from it.

    model_type ──FAMILIES──▶ Family(class it loads as for text, hybrid linear attention?, vision tower?,
                                   routed experts (peft target_parameters), what stays out of 4-bit,
                                   tool-call format, Liger kernels)

Readers: the model check (:mod:`qwen_helpers.models.checks`: supported or refused in one line), batching
(packing is exact only without linear attention), LoRA targets (``all-linear`` plus the fused experts), 4-bit
loading (``llm_int8_skip_modules``), tool-call parsing and the deploy rules. Adding a family is one row here
plus a replica in :mod:`qwen_helpers.common.tiny`. Pure data: no transformers import, so the quick flag check
reads it before any library loads.

Where each value comes from (transformers 5.25's ``models/qwen*``, and the released checkpoints' files):

- ``qwen3_5`` / ``qwen3_5_moe`` (Qwen3.5, Qwen3.6, Qwen3.8): every release is ``Qwen3_5*ForConditionalGeneration``
  with a vision tower (``model.visual``); ``AutoModelForCausalLM`` loads the text model alone
  (``Qwen3_5*ForCausalLM``, ``_keys_to_ignore_on_load_unexpected = [r"^mtp.*", r"^model.visual.*"]``). Three
  Gated DeltaNet layers (``linear_attn.in_proj_qkv/in_proj_z/in_proj_a/in_proj_b/out_proj``) per gated
  full-attention layer: their recurrent state runs through a concatenated row, so padding-free packing is not exact.
  ``in_proj_a``/``in_proj_b`` are ``linear_num_value_heads`` wide (16 on 0.8B), too narrow for bitsandbytes'
  CPU 4-bit kernels. Tool calls are XML (``<tool_call><function=NAME><parameter=K>...``).
- ``qwen3_next``: the same Gated DeltaNet hybrid, text only, with fused experts; its row holds the facts (the packing
  test checks them), but the type is refused until a replica of its released folder tests it end to end.
- ``qwen2_moe`` / ``qwen3_moe`` / ``qwen3_5_moe``: routed experts are fused 3-D parameters
  (``mlp.experts.gate_up_proj`` [experts, 2*intermediate, hidden], ``mlp.experts.down_proj``), not ``nn.Linear``:
  ``target_modules="all-linear"`` never reaches them; peft trains them through ``target_parameters``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# peft target_parameters of transformers 5's fused routed experts (qwen2_moe, qwen3_moe, qwen3_next, qwen3_5_moe)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Gated DeltaNet's projections (Qwen3.5, Qwen3-Next): linear layers that all-linear LoRA covers beside attention's
LINEAR_ATTENTION_MODULES = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Family:
    """What the kit does with one ``model_type``."""

    label: str  # for messages and the table in docs/families.md
    releases: str  # the released checkpoints of this type
    text_class: str  # the class AutoModelForCausalLM loads it as (text data)
    hybrid_linear_attention: bool = False  # Gated DeltaNet layers: state flows along a row, so packing is not exact
    vision_tower: bool = False  # released folders carry one; text training loads text_class without it
    expert_parameters: tuple[str, ...] = ()  # fused routed experts, trained through peft's target_parameters
    keep_out_of_4bit: tuple[str, ...] = ()  # module names bitsandbytes must leave in 16-bit (llm_int8_skip_modules)
    tool_calls: Literal["json", "xml"] = "json"  # the template's tool-call body: hermes JSON or Qwen3.5's XML
    liger: bool = False  # Liger kernels patch this type (liger-kernel's apply_liger_kernel_to_<type>)

    @property
    def packing_exact(self) -> bool:
        """Padding-free rows give the padded batch's logits (only where attention alone separates examples)."""
        return not self.hybrid_linear_attention

    @property
    def has_experts(self) -> bool:
        return bool(self.expert_parameters)


_QWEN3_5 = Family(
    "Qwen3.5 / Qwen3.6 / Qwen3.8", "Qwen3.5-0.8B/2B/4B/9B/27B (base and instruct), Qwen3.6-27B, Qwen3.8-27B",
    "Qwen3_5ForCausalLM", hybrid_linear_attention=True, vision_tower=True,
    keep_out_of_4bit=("in_proj_a", "in_proj_b", "lm_head", "visual"), tool_calls="xml",
)
_QWEN3_5_MOE = Family(
    "Qwen3.5 / Qwen3.6 MoE", "Qwen3.5-35B-A3B/122B-A10B/397B-A17B, Qwen3.6-35B-A3B",
    "Qwen3_5MoeForCausalLM", hybrid_linear_attention=True, vision_tower=True, expert_parameters=EXPERT_PARAMETERS,
    keep_out_of_4bit=("in_proj_a", "in_proj_b", "lm_head", "visual", "mlp.gate", "shared_expert_gate"), tool_calls="xml",
)

FAMILIES: dict[str, Family] = {
    "qwen2": Family("Qwen1.5 / Qwen2 / Qwen2.5", "Qwen1.5-*, Qwen2-*, Qwen2.5-* (and Coder, Math)", "Qwen2ForCausalLM", liger=True),
    "qwen2_moe": Family("Qwen1.5 / Qwen2 MoE", "Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B", "Qwen2MoeForCausalLM",
                        expert_parameters=EXPERT_PARAMETERS, keep_out_of_4bit=("lm_head", "mlp.gate", "shared_expert_gate")),
    "qwen3": Family("Qwen3 / Qwen3-2507", "Qwen3-0.6B…32B (base, hybrid thinking), Qwen3-4B-Instruct/Thinking-2507",
                    "Qwen3ForCausalLM", liger=True),
    "qwen3_moe": Family("Qwen3 MoE", "Qwen3-30B-A3B, Qwen3-235B-A22B (and their 2507 Instruct/Thinking)", "Qwen3MoeForCausalLM",
                        expert_parameters=EXPERT_PARAMETERS, keep_out_of_4bit=("lm_head", "mlp.gate"), liger=True),
    "qwen3_next": Family("Qwen3-Next", "Qwen3-Next-80B-A3B-Instruct/Thinking", "Qwen3NextForCausalLM",
                         hybrid_linear_attention=True, expert_parameters=EXPERT_PARAMETERS,
                         keep_out_of_4bit=("in_proj_ba", "lm_head", "mlp.gate", "shared_expert_gate")),
    "qwen3_5": _QWEN3_5,
    "qwen3_5_text": _QWEN3_5,  # a text-only folder (the kit's merge of a Qwen3.5 adapter, or a converted one)
    "qwen3_5_moe": _QWEN3_5_MOE,
    "qwen3_5_moe_text": _QWEN3_5_MOE,
}

# model_types met in Qwen folders that the kit refuses, with what to do instead
REFUSED: dict[str, str] = {
    "qwen": "Qwen1 checkpoints need remote code and another tokenizer; use Qwen1.5 or later",
    "qwen4_exp": "qwen4_exp is an experimental architecture whose files and template are not released in a stable form; "
                 "use a Qwen3.5/3.6/3.8 checkpoint",
    "qwen2_vl": "Qwen2-VL is a vision-language model and the kit trains text; use Qwen2.5 or Qwen3.5 for text",
    "qwen2_5_vl": "Qwen2.5-VL is a vision-language model and the kit trains text; use Qwen2.5 or Qwen3.5 for text",
    "qwen3_vl": "Qwen3-VL is a vision-language model and the kit trains text; Qwen3.5 carries the same vision tower and "
                "trains as text here",
    "qwen3_vl_moe": "Qwen3-VL MoE is a vision-language model and the kit trains text; use Qwen3.5 MoE for text",
}
REFUSED["qwen3_next"] = ("Qwen3-Next's row is in the kit's family table, but no replica of its released folder (template, "
                         "generation settings) exists offline to test it end to end; use Qwen3.5 (the same Gated DeltaNet hybrid)")
SUPPORTED_MODEL_TYPES = tuple(model_type for model_type in FAMILIES if model_type not in REFUSED)


def text_config(config: dict) -> dict:
    """The language model's fields of a config.json: ``text_config`` of a multimodal release, else the config itself."""
    inner = config.get("text_config")
    return {**inner, "model_type": inner.get("model_type", config.get("model_type"))} if isinstance(inner, dict) else config


def family_of(model_type: str | None) -> Family | None:
    """The family of a ``model_type`` (None when the kit does not support it)."""
    return FAMILIES.get(model_type or "")


def same_family(first: str | None, second: str | None) -> bool:
    """Two model_types of one architecture (``qwen3_5`` and its text model ``qwen3_5_text``)."""
    return first == second or (family_of(first) is not None and family_of(first) is family_of(second))


def families_table() -> str:
    """docs/families.md's table, in Markdown, from :data:`FAMILIES` (one row per supported family)."""
    rows, seen = [], set()
    for model_type in SUPPORTED_MODEL_TYPES:
        family = FAMILIES[model_type]
        if family in seen:
            continue
        seen.add(family)
        types = ", ".join(f"`{name}`" for name in SUPPORTED_MODEL_TYPES if FAMILIES[name] is family)
        rows.append(f"| {family.label} | {types} | {'yes' if family.packing_exact else 'no (padded)'} | "
                    f"{'routed experts via `target_parameters`' if family.has_experts else '-'} | "
                    f"{', '.join(f'`{name}`' for name in family.keep_out_of_4bit) or '-'} | {family.tool_calls} |")
    header = ("| Family | model_type | padding-free exact | MoE experts | kept 16-bit under 4-bit | tool calls |\n"
              "|---|---|---|---|---|---|\n")
    return header + "\n".join(rows)

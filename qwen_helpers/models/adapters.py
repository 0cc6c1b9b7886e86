"""Load peft adapters on their base: which base, checked before loading, and whether an adapter can be merged.

An adapter folder holds peft's ``adapter_config.json`` and the kit's ``run_config.json`` (base model,
4-bit or not, precision asked), so ``load_model_with_adapter(path)`` needs nothing else. The folder is
read once (:func:`qwen_helpers.models.adapter_folder.read_adapter_folder`) and checked against the base before
any weights load (:func:`qwen_helpers.models.checks.check_adapter`); every problem is an :class:`AdapterError`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .adapter_folder import ADAPTER_CONFIG, AdapterError, AdapterFolder, read_adapter_folder
from .checks import check_adapter, same_base
from ..run.config import ModelArguments
from .loading import base_config_of, build_quantization_config, load_base_model, load_tokenizer, release_memory
from ..run.precision import inference_dtype
from ..run.prompt_settings import recorded_template_options, template_with_options
from ..common.tiny import resolve_model_path

PROMPT_TUNING_CANNOT_MERGE = (
    "a prompt-tuning adapter cannot be merged: its soft prompt is an input (learned vectors put in front of "
    "every prompt), not a change to any weight, so there is nothing to add into the base's matrices. "
    "Load it with PeftModel.from_pretrained (or --adapter_path) instead."
)


def base_model_path_of(adapter: str | AdapterFolder, model_path: str | None = None) -> str:
    """The base an adapter was trained on: ``model_path`` if given, else the kit's record, else peft's."""
    return model_path or read_adapter_folder(adapter).base()


def named_adapter_folders(paths: list[str], model_path: str) -> dict[str, str]:
    """The adapter folders among ``paths`` trained on ``model_path`` (name -> path), in order; one line for each
    path left out (missing, not an adapter, another base), so a comparison holds exactly the adapters it names."""
    folders = {}
    for path in paths:
        folder = Path(path)
        if not (folder / ADAPTER_CONFIG).is_file():
            print(f"{path}: no adapter there (yet); left out")
            continue
        recorded = read_adapter_folder(folder).recorded_base
        if not (recorded and same_base(recorded, model_path)):
            print(f"{path}: trained on {recorded or 'an unrecorded base'}, not {model_path}; left out")
            continue
        folders[folder.name] = str(folder)
    return folders


def load_base_for_inference(model_path: str = "tiny", load_in_4bit: bool = False, run_config: dict | None = None):
    """The base model alone, ready for generate (fp16 on GPU, fp32 on CPU, 4-bit if asked); returns (model, tokenizer)."""
    quantization_config = None
    if load_in_4bit:
        run = run_config or {}
        model_args = ModelArguments(
            model_path=model_path,
            load_in_4bit=True,
            bnb_4bit_quant_type=run.get("bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=run.get("bnb_4bit_use_double_quant", True),
            bnb_4bit_compute_dtype=run.get("bnb_4bit_compute_dtype", "auto"),
        )
        quantization_config = build_quantization_config(model_args, inference_dtype(run_config))
    model = load_base_model(model_path, inference_dtype(run_config), quantization_config=quantization_config)
    model.eval()
    tokenizer = load_tokenizer(model_path)
    if run_config:  # the template options the adapter was trained with become the defaults of every prompt
        tokenizer.chat_template = template_with_options(tokenizer.chat_template, recorded_template_options(run_config))
    return model, tokenizer


def _recorded_base_config(folder: AdapterFolder) -> tuple[str | None, dict | None]:
    """The base the adapter records and that base's config.json, when it is a local folder (no downloads)."""
    recorded = folder.recorded_base
    if not recorded:
        return None, None
    config_file = Path(resolve_model_path(recorded)) / "config.json"
    return recorded, json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None


def check_base_matches(model, folder: AdapterFolder) -> None:
    """Raise :class:`AdapterError` when the adapter was trained on a base of another shape than the loaded ``model``.

    For a base loaded by the caller (a notebook's model): LoRA weights of the wrong shape make peft raise, but
    a soft prompt of the wrong width loads silently (peft 0.21) and a same-shaped but different architecture
    would too; this check catches both. ``load_model_with_adapter`` checks the folder before loading instead.
    """
    config = base_config_of(model)
    problems = []
    token_dim = folder.adapter_config.get("token_dim")
    if token_dim and token_dim != config.hidden_size:
        problems.append(f"its soft prompt vectors have {token_dim} dimensions, the model's hidden size is {config.hidden_size}")
    recorded, recorded_config = _recorded_base_config(folder)
    recorded_config = folder.base_architecture or recorded_config
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if recorded_config and key in recorded_config and recorded_config.get(key) != getattr(config, key, None):
            problems.append(f"{key} is {recorded_config.get(key)} in its base, {getattr(config, key, None)} here")
    if problems:
        raise AdapterError(
            f"{folder.path} does not fit this base model ({config.model_type}, hidden size {config.hidden_size}): "
            f"{'; '.join(problems)}. It was trained on {recorded!r}: load it on that base (--model_path {recorded}), "
            "or train an adapter on this one."
        )


def language_model_key_mapping(folder: AdapterFolder) -> dict[str, str] | None:
    """peft's ``key_mapping`` for an adapter trained on a vision-language class (``model.language_model.layers.*``, as
    Qwen3.5 releases load in other tools) onto the text class the kit loads (``model.layers.*``); None when it needs none.

    Weights on the vision tower cannot load on a text model: refused, never loaded empty.
    """
    names = list(folder.shapes)
    if any(".visual." in name for name in names):
        raise AdapterError(f"{folder.path} also adapts the vision tower (model.visual.*), which a text model does not have; "
                           "the kit loads Qwen3.5 as its text model for text data. Use an adapter trained on the language model only.")
    if any(".model.language_model." in name for name in names):
        return {r"^model\.language_model\.": "model."}
    return None


def _put_adapter(model, folder: AdapterFolder, adapter_name: str):
    """peft's loader on a checked folder, its errors turned into one line that says what to do."""
    from peft import PeftModel

    key_mapping = language_model_key_mapping(folder)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(folder.path, adapter_name=adapter_name, key_mapping=key_mapping)
            return model
        return PeftModel.from_pretrained(model, folder.path, adapter_name=adapter_name, key_mapping=key_mapping)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise AdapterError(
                f"{folder.path} does not fit this base model (size mismatch): it was trained on another model. "
                f"Pass the base it was trained on with --model_path (it recorded {folder.recorded_base!r})."
            ) from error
        raise
    except ValueError as error:
        if "different peft types" in str(error):
            raise AdapterError(
                f"{folder.path} is a {folder.kind} adapter and the model already holds another kind; peft keeps "
                "one kind per model. Load it on its own model with load_model_with_adapter."
            ) from error
        raise


def load_adapter(model, adapter: str | AdapterFolder, adapter_name: str = "default"):
    """Put an adapter on a loaded base (a second call with another name adds it beside the first)."""
    folder = read_adapter_folder(adapter)
    check_base_matches(model, folder)
    return _put_adapter(model, folder, adapter_name)


def load_model_with_adapter(adapter: str | AdapterFolder, model_path: str | None = None, load_in_4bit: bool | None = None,
                            adapter_name: str = "default"):
    """Load base + adapter from just the adapter folder; returns (model, tokenizer), ready for generate.

    The base is the one the adapter records (``model_path`` overrides it), loaded 4-bit when the adapter
    was trained on a 4-bit base (QLoRA); LoRA and prompt-tuning adapters load the same way. The folder is
    read once and checked against the base (files, architecture, shapes, fingerprint) before any weights load.
    """
    folder, base = check_adapter(adapter, model_path)
    four_bit = load_in_4bit if load_in_4bit is not None else folder.load_in_4bit
    model, tokenizer = load_base_for_inference(base, four_bit, folder.run_config or None)
    model = _put_adapter(model, folder, adapter_name)
    model.eval()
    return model, tokenizer


def load_adapters(adapter_paths: dict[str, str], model_path: str | None = None):
    """Several adapters of one kind on one base, each under its name; switch with ``model.set_adapter(name)``."""
    names = list(adapter_paths)
    if not names:
        raise AdapterError("No adapters given: pass a dict such as {'lora': 'outputs/lora'}.")
    model, tokenizer = load_model_with_adapter(adapter_paths[names[0]], model_path, adapter_name=names[0])
    for name in names[1:]:
        load_adapter(model, adapter_paths[name], name)
    model.set_adapter(names[0])
    return model, tokenizer


def for_each_model(adapter_paths: dict[str, str], function, model_path: str | None = None, include_base: bool = True) -> dict:
    """Call ``function(name, model, tokenizer)`` for the base ("base") and then each adapter; returns name -> result.

    One model at a time, freed before the next loads (two 7B models do not fit one GPU), because peft
    keeps one adapter kind per model (LoRA and a soft prompt cannot share one) and QLoRA needs a 4-bit base.
    """
    base = model_path or (base_model_path_of(next(iter(adapter_paths.values()))) if adapter_paths else "tiny")
    results = {}
    for name, path in (({"base": None} if include_base else {}) | adapter_paths).items():
        model, tokenizer = load_base_for_inference(base) if path is None else load_model_with_adapter(path, model_path)
        results[name] = function(name, model, tokenizer)
        del model
        release_memory()
    return results


def merge_problem(peft_type: str) -> str | None:
    """Why an adapter of this peft type cannot be merged into the base's weights (None for LoRA, the kind that can)."""
    peft_type = peft_type.lower()
    if peft_type == "prompt_tuning":
        return PROMPT_TUNING_CANNOT_MERGE
    if peft_type != "lora":
        return f"merging is supported for LoRA adapters only; this one is {peft_type or 'of an unknown type'}."
    return None


def check_mergeable(model) -> None:
    """Raise :class:`AdapterError` unless ``model`` is a LoRA model on a 16/32-bit base (what merge_and_unload supports exactly)."""
    problem = merge_problem(model.active_peft_config.peft_type.value)
    if problem:
        raise AdapterError(f"This model's adapter: {problem}")
    if getattr(model.get_base_model(), "is_loaded_in_4bit", False):
        raise AdapterError(
            "This LoRA adapter sits on a 4-bit base: merging into 4-bit weights rounds the result. "
            "Merge it onto the 16-bit base instead (load_model_with_adapter(path, load_in_4bit=False), or export --format hf)."
        )


def merged_copy(model):
    """A merged copy of a LoRA model (``merge_and_unload`` on a deep copy); the original keeps its adapter."""
    check_mergeable(model)
    return copy.deepcopy(model).merge_and_unload()

"""Checks that run before any model loads: model folders, hub ids, adapter files and their fit to a base.

A bad value found after a 7B model has loaded costs minutes and surfaces as a torch error; found here,
it costs nothing and names the flag or file. Every problem is a :class:`~qwen_helpers.common.errors.KitError`.
The flags' own values are checked in :mod:`qwen_helpers.run.flag_checks`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .adapter_folder import AdapterError, AdapterFolder, read_adapter_folder
from ..common.errors import ModelFolderError
from ..common.families import FAMILIES, REFUSED, SUPPORTED_MODEL_TYPES, same_family, text_config

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------------- model folders


def looks_like_local_path(model_path: str) -> bool:
    """True when ``model_path`` names a folder on this machine rather than a hub id ("Qwen/Qwen2.5-0.5B-Instruct")."""
    from ..common.tiny import TINY_ALIASES

    if model_path in TINY_ALIASES:
        return False  # built on first use in the cache
    path = Path(model_path).expanduser()
    if path.exists() or model_path.startswith((".", "/", "~")) or "\\" in model_path:
        return True
    parts = model_path.split("/")
    return len(parts) != 2 or Path(parts[0]).is_dir()  # "outputs/missing" is a local folder that is not there


def read_model_config(folder: Path) -> dict:
    """config.json of a model folder, or a :class:`ModelFolderError` naming it."""
    config_file = folder / "config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFolderError(f"{config_file} cannot be read ({error}); the model folder is damaged: copy it again.") from None


def check_model_type(config: dict, where: str, flag: str = "--model_path") -> None:
    """Refuse a checkpoint whose architecture the kit does not support (:data:`~qwen_helpers.common.families.FAMILIES`)."""
    model_type = config.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES:
        return
    architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
    hint = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    labels = ", ".join(dict.fromkeys(FAMILIES[model_type].label for model_type in SUPPORTED_MODEL_TYPES))
    raise ModelFolderError(
        f"{flag} {where} is a {model_type or 'unknown'} model ({architectures}){hint}; this kit supports Qwen checkpoints "
        f"with model_type {', '.join(SUPPORTED_MODEL_TYPES)} ({labels}). Point {flag} at one of those."
    )


def model_type_of(model_path: str, config: dict | None) -> str | None:
    """The ``model_type`` of a base: from its config.json, a tiny alias's replica, else None (a hub id not yet downloaded)."""
    from ..common.tiny import REPLICAS, TINY_ALIASES

    if config is not None:
        return config.get("model_type")
    if model_path in TINY_ALIASES:
        replica = REPLICAS.get(model_path.removeprefix("tiny-"))
        return replica.arch if replica else "qwen2"
    return None


def uncached_hub_message(model_id: str, flag: str, why: str) -> str:
    """The sentence for a hub id that this machine does not have: where the cache is, why it was not fetched, what to do."""
    from huggingface_hub import constants

    option = flag if flag.startswith("--") else "--model_path"  # "the base recorded by ADAPTER": the flag that replaces it
    return (f"{flag} {model_id} is neither a local folder nor in the Hugging Face cache ({constants.HF_HUB_CACHE}, set by "
            f"HF_HUB_CACHE or HF_HOME), {why}. On a machine with internet run `hf download {model_id}` and copy the cache over "
            f"(or set HF_HOME to it), or pass {option} a local folder holding the checkpoint (config.json, weights, tokenizer files).")


def check_hub_model(model_id: str, flag: str = "--model_path") -> dict | None:
    """A hub id: its config.json from the local Hugging Face cache, checked like a folder's; no network is used.

    Not cached and downloads off (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``): refused in one line. Not cached and
    downloads allowed: None, and transformers downloads it (:func:`hub_download_errors` words a failed download).
    """
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except ValueError as error:  # huggingface_hub's HFValidationError: not a well-formed "owner/name"
        raise ModelFolderError(f"{flag} {model_id}: no such folder, and not a hub id ({error}). Check the path or the id.") from None
    if isinstance(cached, str):
        config = read_model_config(Path(cached).parent)
        check_model_type(config, model_id, flag)
        if is_offline_mode():  # online, transformers fetches what a partial download lacks
            check_model_files(Path(cached).parent, f"{model_id} (cached in {Path(cached).parent})", flag)
        return config
    if is_offline_mode():
        raise ModelFolderError(uncached_hub_message(model_id, flag, "and downloads are off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)"))
    print(f"note: {flag} {model_id} is not in the Hugging Face cache; transformers downloads it from the Hub.", flush=True)
    return None


@contextmanager
def hub_download_errors(model_path: str, flag: str = "--model_path"):
    """Around a ``from_pretrained``: a hub id that could not be fetched (no network, unknown or private id) becomes one line."""
    from huggingface_hub import try_to_load_from_cache

    from ..common.tiny import TINY_ALIASES

    try:
        yield
    except OSError as error:
        if model_path in TINY_ALIASES or looks_like_local_path(model_path):
            raise
        try:
            cached = isinstance(try_to_load_from_cache(model_path, "config.json"), str)
        except ValueError:  # not a well-formed hub id either: transformers' own error says so
            raise error from None
        if cached:
            raise  # a cached model that failed for another reason (disk full, ...): the error as it is
        reason = " ".join(str(error).split()).split(". ")[0]
        raise ModelFolderError(uncached_hub_message(model_path, flag, f"and it could not be downloaded ({reason})")) from error


def check_model_path(model_path: str, flag: str = "--model_path") -> dict | None:
    """Check a base model before loading it; return its config.json (None for the tiny alias, or a hub id still to download).

    Missing folders, empty folders, folders without config.json, weights or tokenizer files, and
    architectures other than Qwen's are refused with a sentence naming the folder.
    """
    from ..common.tiny import TINY_ALIASES

    if model_path in TINY_ALIASES:
        return None
    if not looks_like_local_path(model_path):
        return check_hub_model(model_path, flag)
    folder = Path(model_path).expanduser()
    if not folder.exists():
        raise ModelFolderError(f"{flag} {model_path}: no such folder. Check the path (relative to {Path.cwd()}), or use 'tiny' for the embedded test model.")
    if not folder.is_dir():
        raise ModelFolderError(f"{flag} {model_path} is a file; pass the folder that holds config.json and the weights.")
    if not any(folder.iterdir()):
        raise ModelFolderError(f"{flag} {model_path} is an empty folder; copy the checkpoint (config.json, weights, tokenizer files) into it.")
    if not (folder / "config.json").is_file():
        hint = " It holds an adapter: pass it as --adapter_path, and its base as --model_path." if (folder / "adapter_config.json").is_file() else ""
        raise ModelFolderError(f"{flag} {model_path} has no config.json, so it is not a model folder.{hint}")
    config = read_model_config(folder)
    check_model_type(config, model_path, flag)
    check_model_files(folder, model_path, flag)
    return config


def check_model_files(folder: Path, where: str, flag: str = "--model_path") -> None:
    """Refuse a model folder (or a cached snapshot) without weight or tokenizer files."""
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelFolderError(f"{flag} {where} has no weight files (*.safetensors or *.bin); the download or copy is incomplete.")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{flag} {where} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); copy them from the original checkpoint.")


# ---------------------------------------------------------------------------------------------- adapters


def expected_linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adaptable linear layer of a Qwen decoder layer, from its config.json.

    Attention projections of hybrid models exist only in their full-attention layers, with a gated query (twice as wide).
    """
    config = text_config(config)
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    intermediate = config.get("intermediate_size")
    family = FAMILIES.get(config.get("model_type", ""))
    gate = 2 if family and family.hybrid_linear_attention else 1  # Qwen3.5 / Qwen3-Next: q_proj also gives the output gate
    shapes = {
        "q_proj": (hidden, heads * head_dim * gate),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    if intermediate and not (family and family.has_experts):
        shapes.update(gate_proj=(hidden, intermediate), up_proj=(hidden, intermediate), down_proj=(intermediate, hidden))
    return shapes


def adapter_shape_problems(adapter_config: dict, shapes: dict[str, list[int]], base_config: dict) -> list[str]:
    """Where an adapter's weights do not fit a base of ``base_config``: layer count, widths, soft-prompt size."""
    problems = []
    hidden = base_config.get("hidden_size")
    token_dim = adapter_config.get("token_dim")
    if token_dim and hidden and token_dim != hidden:
        problems.append(f"its soft prompt has {token_dim} dimensions per token, the base's hidden size is {hidden}")
    linear = expected_linear_shapes(base_config) if hidden and base_config.get("num_attention_heads") else {}
    layers = base_config.get("num_hidden_layers")
    for name, shape in shapes.items():
        parts = name.split(".")
        if "layers" in parts and layers is not None:
            index = int(parts[parts.index("layers") + 1])
            if index >= layers:
                problems.append(f"it has weights for layer {index}, the base has {layers} layers")
                break
        module = next((part for part in parts if part in linear), None)
        if module is None or len(shape) != 2:
            continue
        in_features, out_features = linear[module]
        if "lora_A" in parts and shape[1] != in_features:
            problems.append(f"{module} takes {shape[1]} inputs in the adapter, {in_features} in the base")
            break
        if "lora_B" in parts and shape[0] != out_features:
            problems.append(f"{module} gives {shape[0]} outputs in the adapter, {out_features} in the base")
            break
    return problems


BASE_SUMMARY_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")


def base_summary(config) -> dict:
    """The architecture facts of a base worth recording beside an adapter (from a config object or dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    return {key: values.get(key) for key in BASE_SUMMARY_KEYS if values.get(key) is not None}


def check_adapter_against_base(adapter: str | AdapterFolder, base_model_path: str) -> None:
    """Refuse, before loading anything, an adapter whose files are damaged or whose architecture or shapes differ from the base.

    Works when the base the adapter recorded is not on this machine: the adapter's own record of its base
    architecture (run_config.json, written by the kit) and its tensor shapes are compared with the base's config.json.
    """
    from ..common.tiny import resolve_model_path

    folder = read_adapter_folder(adapter)
    base_folder = Path(resolve_model_path(base_model_path))
    if not (base_folder / "config.json").is_file():
        return  # a hub id: nothing to compare against before loading
    base_config = text_config(read_model_config(base_folder))  # a multimodal release: its language model's facts
    problems = []
    recorded = folder.base_architecture
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if key == "model_type" and same_family(recorded.get(key), base_config.get(key)):
            continue
        if key in recorded and base_config.get(key) is not None and recorded[key] != base_config.get(key):
            problems.append(f"{key} is {recorded[key]} in the base it was trained on, {base_config.get(key)} in {base_model_path}")
    problems += adapter_shape_problems(folder.adapter_config, folder.shapes, base_config)
    if problems:
        raise AdapterError(
            f"--adapter_path {folder.path} does not fit --model_path {base_model_path} "
            f"({base_config.get('model_type')}, hidden size {base_config.get('hidden_size')}): {'; '.join(problems)}. "
            f"It was trained on {folder.recorded_base or 'an unrecorded base'}: load it on that base, or train an adapter for this one."
        )
    check_base_fingerprint(folder, base_model_path)


def check_base_fingerprint(adapter: str | AdapterFolder, base_model_path: str) -> None:
    """Refuse a base whose config.json or weight files are not those the adapter was trained on (its run_config.json's
    ``base_fingerprint``); an adapter without one, or a hub id, is not checked."""
    from ..common.files import model_fingerprint

    folder = read_adapter_folder(adapter)
    recorded = folder.fingerprint
    current = model_fingerprint(base_model_path) if recorded else None
    parts = {"config": "its config.json", "weights": "its weight files (names or sizes)"}
    differs = [name for name in parts if current and name in recorded and recorded[name] != current.get(name)]
    if differs:
        verb = "do" if "weights" in differs else "does"
        raise AdapterError(
            f"--adapter_path {folder.path} was trained on another base than {base_model_path}: "
            f"{' and '.join(parts[name] for name in differs)} {verb} not match what the adapter recorded (it was "
            f"trained on {folder.run_config.get('model_path') or 'an unrecorded path'}). Load it on that base or an unchanged copy "
            f"of it (--model_path); if this is the same model saved again, delete \"base_fingerprint\" from "
            f"{Path(folder.path) / 'run_config.json'}."
        )


def adapter_command_inputs(adapter: str | AdapterFolder | None, model_path: str | None) -> dict[str, str | None]:
    """What a command that loads an adapter reads: the adapter folder and its base (given, or the one it records)."""
    if not adapter:
        return {"--model_path": model_path}
    if model_path:
        return {"--adapter_path": str(getattr(adapter, "path", adapter)), "--model_path": model_path}
    folder = read_adapter_folder(adapter)
    return {"--adapter_path": folder.path, f"the base recorded by {folder.path}": folder.recorded_base}


def same_base(recorded: str, model_path: str) -> bool:
    """Whether a recorded base and a --model_path name the same model (a tiny alias and its cache folder are one)."""
    from ..common.tiny import resolve_model_path

    return recorded == model_path or resolve_model_path(recorded) == resolve_model_path(model_path)


def check_continued_adapter(adapter: str, model_path: str) -> dict[str, str | None]:
    """A run that trains an adapter further (DPO, GRPO ``--adapter_path``) loads it on ``--model_path``: refuse, in one
    line, an adapter trained on another base (a different path is that base only if the adapter's fingerprint says
    so), and return what the run reads, the recorded base included, so that no output folder can replace it."""
    folder = read_adapter_folder(adapter)
    recorded = folder.recorded_base
    if recorded and not folder.fingerprint and not same_base(recorded, model_path):
        raise AdapterError(
            f"--adapter_path {folder.path} was trained on {recorded}, but this run would train it on --model_path "
            f"{model_path} (the default when the flag is not given); pass --model_path {recorded} (or an unchanged copy of it)."
        )
    check_adapter_against_base(folder, model_path)  # shapes, architecture and the recorded fingerprint
    return {"--adapter_path": folder.path, f"the base recorded by {folder.path}": recorded}


def check_adapter(adapter: str | AdapterFolder, model_path: str | None) -> tuple[AdapterFolder, str]:
    """Read an adapter folder once and check it and the base it will load on; return (the folder, that base)."""
    folder = read_adapter_folder(adapter)
    if model_path:
        check_model_path(model_path)
        base = model_path
    else:
        base = folder.base()
        if looks_like_local_path(base) and not Path(base).expanduser().is_dir():
            raise AdapterError(
                f"--adapter_path {folder.path} was trained on {base}, which is not on this machine; pass --model_path "
                "with that base (a copy of the same checkpoint)."
            )
        check_model_path(base, flag=f"the base recorded by {folder.path}")
    check_adapter_against_base(folder, base)
    return folder, base


def check_adapter_folder(adapter_path: str, model_path: str | None) -> str:
    """Check an adapter folder and the base it will load on; return that base (``model_path``, else the recorded one)."""
    return check_adapter(adapter_path, model_path)[1]


def check_inference_inputs(args) -> None:
    """Everything the inference command can check before loading a model: output file, model folder, adapter."""
    from ..common.files import check_output_file

    inputs = adapter_command_inputs(args.adapter_path, args.model_path or (None if args.adapter_path else "tiny"))
    if args.data_path:
        check_output_file(args.output_file, "--output_file", args.overwrite_output_file, "--overwrite_output_file",
                          inputs={"--data_path": args.data_path, **inputs})
    if args.adapter_path:
        check_adapter_folder(args.adapter_path, args.model_path)
    elif args.model_path:
        check_model_path(args.model_path)

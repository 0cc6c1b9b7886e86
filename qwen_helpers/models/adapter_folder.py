"""The one reader of adapter folders: every file read once, checked, into a frozen :class:`AdapterFolder`.

An adapter folder holds peft's ``adapter_config.json`` and weights and the kit's ``run_config.json``
(base model, 4-bit or not, precision asked, the base's architecture and fingerprint). Inference, export,
merge, the vLLM check and the checks before loading all take an ``AdapterFolder`` (or a path, read
here), so a folder is read once per command and every problem with it is one :class:`AdapterError`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..common.errors import KitError
from ..common.files import RUN_CONFIG

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(KitError, ValueError):
    """An adapter folder that is missing, damaged, of a kind that cannot do what was asked, or shaped for another base."""


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, after checking the file is complete (nothing is loaded)."""
    size = path.stat().st_size
    damaged = f"{path} is damaged or truncated ({size} bytes); copy it again or retrain the adapter."
    try:
        with path.open("rb") as file:
            (header_length,) = struct.unpack("<Q", file.read(8))
            if header_length > size - 8:
                raise AdapterError(damaged)
            header = json.loads(file.read(header_length))
    except (struct.error, ValueError, UnicodeDecodeError):
        raise AdapterError(damaged) from None
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    end = max((entry["data_offsets"][1] for entry in tensors.values()), default=0)
    if 8 + header_length + end > size:
        raise AdapterError(damaged)
    return {name: entry["shape"] for name, entry in tensors.items()}


@dataclass(frozen=True)
class AdapterFolder:
    """What an adapter folder holds, read once: peft's config, the kit's run record, the weights' tensor shapes."""

    path: str
    adapter_config: dict  # peft's adapter_config.json
    run_config: dict  # the kit's run_config.json ({} for an adapter another tool saved)
    shapes: dict[str, list[int]]  # tensor name -> shape from the safetensors header ({} for a .bin adapter)
    has_safetensors: bool = True  # False: saved as adapter_model.bin (peft loads it; vLLM does not)

    @property
    def recorded_base(self) -> str | None:
        """The base it was trained on: the kit's record first (it keeps aliases such as "tiny"), else peft's."""
        return self.run_config.get("model_path") or self.adapter_config.get("base_model_name_or_path")

    @property
    def base_architecture(self) -> dict:
        """The trained-on base's config facts the kit recorded (model_type, hidden_size, ...), or {}."""
        return self.run_config.get("base_model") or {}

    @property
    def fingerprint(self) -> dict:
        """The trained-on base's config and weight-file fingerprint the kit recorded, or {}."""
        return self.run_config.get("base_fingerprint") or {}

    @property
    def peft_type(self) -> str:
        return str(self.adapter_config.get("peft_type", "")).lower()

    @property
    def load_in_4bit(self) -> bool:
        """Trained on a 4-bit base (QLoRA): it loads on a 4-bit base unless told otherwise."""
        return bool(self.run_config.get("load_in_4bit", False))

    @property
    def kind(self) -> str:
        """The method name of the adapter ('lora', 'qlora', 'prompt_tuning', or peft's type in lower case)."""
        return "qlora" if self.peft_type == "lora" and self.load_in_4bit else self.peft_type

    def base(self, model_path: str | None = None) -> str:
        """The base to load it on: ``model_path`` if given, else the one it records, else a one-line error."""
        if model_path:
            return model_path
        if not self.recorded_base:
            raise AdapterError(f"--adapter_path {self.path} does not record its base model; pass --model_path.")
        return self.recorded_base


def _read_json(path: Path, advice: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); {advice}") from None


def read_adapter_folder(adapter: str | Path | AdapterFolder, flag: str = "--adapter_path") -> AdapterFolder:
    """Read and check an adapter folder once (an ``AdapterFolder`` passes through); any problem is one line naming it."""
    if isinstance(adapter, AdapterFolder):
        return adapter
    folder = Path(adapter)
    if folder.is_file():
        raise AdapterError(f"{flag} {adapter} is a file; pass the adapter folder that holds it "
                           f"({folder.parent}, with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
    if not folder.is_dir():
        raise AdapterError(f"{flag} {adapter}: no such folder. Train one first (python -m qwen_helpers.train_lora) "
                           "or fix the path.")
    if not (folder / ADAPTER_CONFIG).is_file():
        hint = (" It looks like a full model folder: pass it as --model_path (or load it with AutoModelForCausalLM) "
                "instead." if (folder / "config.json").is_file() else "")
        raise AdapterError(f"{flag} {adapter} has no {ADAPTER_CONFIG}, so it is not a peft adapter folder.{hint}")
    adapter_config = _read_json(folder / ADAPTER_CONFIG, "copy the adapter folder again or retrain it.")
    run_file = folder / RUN_CONFIG
    run_config = _read_json(run_file, "delete it and pass --model_path explicitly.") if run_file.is_file() else {}
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        return AdapterFolder(str(adapter), adapter_config, run_config, safetensors_shapes(weights))
    if (folder / "adapter_model.bin").is_file():
        return AdapterFolder(str(adapter), adapter_config, run_config, {}, has_safetensors=False)
    raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS}; the adapter was not saved completely. Retrain it.")

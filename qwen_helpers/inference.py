"""Load adapters and generate with them: the kit's inference path.

Prompts are formatted by :func:`qwen_helpers.data.format_prompt`, the same function training uses;
generation stops at ``<|im_end|>`` (the generation config's EOS) and batches are left-padded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import format_prompt
from .modeling import device_type, load_base_model, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded, with the path and what to do."""


def read_adapter_info(adapter_path: str) -> dict:
    """The adapter's peft config plus the kit's run config (base model path, 4-bit or not), validated."""
    path = Path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"Adapter folder {path} does not exist. Train one first (python -m qwen_helpers.train_lora) or fix --adapter_path.")
    if not (path / ADAPTER_CONFIG).is_file():
        hint = " It looks like a full model folder: load it with AutoModelForCausalLM instead." if (path / "config.json").is_file() else ""
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}, so it is not a peft adapter folder.{hint}")
    info = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    run_config = path / "run_config.json"
    if run_config.is_file():
        run = json.loads(run_config.read_text(encoding="utf-8"))
        info["kit_model_path"] = run.get("model_path")
        info["kit_load_in_4bit"] = run.get("load_in_4bit", False)
        info["kit_run"] = run
    return info


def base_model_path_of(adapter_path: str, model_path: str | None = None) -> str:
    """The base an adapter was trained on: ``model_path`` if given, else the kit's record, else peft's."""
    if model_path:
        return model_path
    info = read_adapter_info(adapter_path)
    recorded = info.get("kit_model_path") or info.get("base_model_name_or_path")
    if not recorded:
        raise AdapterError(f"{adapter_path}: the adapter does not record its base model; pass --model_path.")
    return recorded


def inference_dtype() -> torch.dtype:
    """fp16 on a GPU (as the seed's ``model.half()``), fp32 on a CPU."""
    return torch.float16 if device_type() == "cuda" else torch.float32


def load_adapter(model, adapter_path: str, adapter_name: str = "default"):
    """Put an adapter on a loaded base (a second call with another name adds it beside the first)."""
    from peft import PeftModel

    read_adapter_info(adapter_path)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_path, adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise AdapterError(
                f"{adapter_path} does not fit this base model (size mismatch): it was trained on another model. "
                f"Pass the base it was trained on with --model_path (it recorded {base_model_path_of(adapter_path)!r})."
            ) from error
        raise


def load_model_with_adapter(adapter_path: str, model_path: str | None = None, load_in_4bit: bool | None = None):
    """Load base + adapter from just the adapter folder; returns (model, tokenizer), ready for generate."""
    info = read_adapter_info(adapter_path)
    base = base_model_path_of(adapter_path, model_path)
    quantization_config = None
    if load_in_4bit if load_in_4bit is not None else info.get("kit_load_in_4bit"):
        from .config import ModelArguments
        from .modeling import build_quantization_config

        run = info.get("kit_run", {})
        model_args = ModelArguments(
            model_path=base,
            load_in_4bit=True,
            bnb_4bit_quant_type=run.get("bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=run.get("bnb_4bit_use_double_quant", True),
        )
        quantization_config = build_quantization_config(model_args, inference_dtype())
    model = load_base_model(base, inference_dtype(), quantization_config=quantization_config)
    model = load_adapter(model, adapter_path)
    model.eval()
    return model, load_tokenizer(base)


@torch.no_grad()
def generate(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Answer each record (instruction/input) with the model: left-padded batches, stop at ``<|im_end|>``, greedy by default."""
    generate_kwargs.setdefault("do_sample", False)
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in range(0, len(records), batch_size):
            prompts = [format_prompt(tokenizer, record) for record in records[start : start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")],
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return [answer.strip() for answer in answers]

"""LoRA's variants as the training path uses them: LoRA+'s optimiser, and saving PiSSA/OLoRA as plain LoRA.

DoRA and rsLoRA are ``LoraConfig`` options and need nothing here (:func:`qwen_helpers.run.methods.build_lora_config`).
PiSSA and OLoRA start the adapter from the base's principal directions and subtract them from the base
weights, so the trained adapter only works on that residual base. peft's documented conversion
(``save_pretrained(..., path_initial_model_for_weight_conversion=...)``) turns it into a plain LoRA adapter
of twice the rank, ``[A | A0]`` and ``[B | -B0]``, that gives the trained model on the ORIGINAL base.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..run.config import LoraArguments
from ..run.methods import rewrites_base_weights

INITIAL_ADAPTER = "initial_adapter"  # peft loads the start back under its folder's name


def describe_variants(lora_args: LoraArguments | None) -> str | None:
    """One line naming the LoRA variant options in use (None for plain LoRA), for the run's notes."""
    if lora_args is None:
        return None
    parts = [
        name
        for name, on in (("DoRA", lora_args.use_dora), ("rsLoRA (scale alpha/sqrt(r))", lora_args.use_rslora))
        if on
    ]
    init = lora_args.peft_init_lora_weights()
    if init is not True:
        parts.append(
            f"init {init}"
            + (
                " (saved converted to plain LoRA of rank 2r for the original base)"
                if rewrites_base_weights(lora_args)
                else ""
            )
        )
    if lora_args.loraplus_lr_ratio:
        parts.append(f"LoRA+ (lora_B at {lora_args.loraplus_lr_ratio:g}x the learning rate; --optim is not used)")
    return "LoRA variant: " + ", ".join(parts) if parts else None


def loraplus_optimizer(model, lora_args: LoraArguments | None, training_args):
    """peft's LoRA+ optimiser (AdamW, the Trainer's betas, eps, weight decay) with --loraplus_lr_ratio, else None."""
    if lora_args is None or not lora_args.loraplus_lr_ratio:
        return None
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=training_args.learning_rate,
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
        loraplus_weight_decay=training_args.weight_decay,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
    )


def save_initial_adapter(model, lora_args: LoraArguments | None) -> str | None:
    """Save a PiSSA/OLoRA adapter's start before training (the conversion needs it); None for other starts."""
    if not rewrites_base_weights(lora_args):
        return None
    folder = Path(tempfile.mkdtemp(prefix="qwen_helpers_initial_")) / INITIAL_ADAPTER
    model.save_pretrained(str(folder))
    return str(folder)


def save_as_plain_lora(model, output_dir: str, initial_dir: str) -> None:
    """Overwrite the saved adapter with peft's conversion to plain LoRA for the original base, then drop the start.

    peft's conversion keeps the LoRA matrices only; other trained tensors (a base checkpoint's chat-token
    rows, ``trainable_token_indices``) do not depend on the start and are copied back from the trained model.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    model.save_pretrained(output_dir, path_initial_model_for_weight_conversion=initial_dir)
    weights = Path(output_dir) / "adapter_model.safetensors"
    converted = load_file(str(weights))
    trained = get_peft_model_state_dict(model)
    missing = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in trained.items()
        if name not in converted and "lora_A" not in name and "lora_B" not in name
    }
    if missing:
        save_file({**converted, **missing}, str(weights), metadata={"format": "pt"})
    shutil.rmtree(Path(initial_dir).parent, ignore_errors=True)

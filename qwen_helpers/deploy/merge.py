"""Merge a LoRA adapter into its base and prove the merge: the library behind ``python -m qwen_helpers.export``.

Merging into a 4-bit base would round the LoRA update into 4-bit weights and lose most of it, so the
base is always reloaded in 16-bit (fp16 on a GPU, fp32 on a CPU) and merged there with
``merge_and_unload``. The merge checks its own work: the merged model must give the same logits as
the 16-bit base with the adapter on top (up to rounding), and for a QLoRA adapter it reports how far
the merged model is from what was trained (the 4-bit base + adapter).

    from qwen_helpers.deploy.merge import merge_and_export
    report = merge_and_export("outputs/qlora", "outputs/qlora_merged")
    print(report)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.adapter_folder import AdapterError, AdapterFolder, read_adapter_folder
from ..models.adapters import load_model_with_adapter, merge_problem
from ..data.encoding import format_prompt
from ..models.checks import adapter_command_inputs
from ..common.files import OutputExistsError, check_not_an_input, folder_size, give_default_modes, human_bytes
from ..models.loading import evaluation_mode, release_memory
from ..run.prompt_settings import (PROMPT_SETTINGS, PromptSettings, has_thinking_switch, settings_from_run_config,
                              template_with_thinking_default, write_prompt_settings)

DEFAULT_PROMPTS = [
    "把下面的句子翻译成英文。今天天气很好，我们去公园散步吧。",
    "What is the capital of France?",
    "Summarize in one sentence: LoRA trains two small matrices beside each frozen weight matrix.",
]
# Largest allowed |logits difference| between the merged model and base + adapter, relative to the largest |logit|:
# the merged weights are rounded once to the model's dtype, nothing else changes.
MERGE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class ExportDirExistsError(OutputExistsError):
    """The export folder already holds files."""


class MergeMismatchError(RuntimeError):
    """The merged model does not reproduce base + adapter: the merge went wrong and nothing was saved."""


@dataclass
class ExportReport:
    """Where the merged model went, how large it is, and how far its logits are from base + adapter."""

    output_dir: str
    max_abs_diff_vs_16bit_adapter: float
    max_abs_diff_vs_4bit_adapter: float | None
    merged_size_bytes: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"merged model saved to {self.output_dir}/ ({human_bytes(self.merged_size_bytes)} of safetensors)",
            f"max |logits difference| merged vs unquantised base + adapter: {self.max_abs_diff_vs_16bit_adapter:.3g} (rounding only)",
        ]
        if self.max_abs_diff_vs_4bit_adapter is not None:
            lines.append(f"max |logits difference| merged vs 4-bit base + adapter (as trained): {self.max_abs_diff_vs_4bit_adapter:.3g}")
        return "\n".join(lines + self.notes)


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str], enable_thinking: bool = False) -> list[torch.Tensor]:
    """Logits at every position of each prompt, chat-formatted as in training, one prompt at a time (fp32, on the CPU)."""
    rows = []
    with evaluation_mode(model):
        for prompt in prompts:
            text = format_prompt(tokenizer, {"instruction": prompt}, enable_thinking)
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            rows.append(model(**inputs).logits[0].float().cpu())
    return rows


def largest_difference(logits_a: list[torch.Tensor], logits_b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of logits computed on the same prompts."""
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def max_logits_difference(model_a, model_b, tokenizer, prompts: list[str]) -> float:
    """Largest absolute logits difference between two models on the same chat-formatted prompts (0 means identical)."""
    return largest_difference(prompt_logits(model_a, tokenizer, prompts), prompt_logits(model_b, tokenizer, prompts))


def check_mergeable_adapter(adapter: str | AdapterFolder) -> AdapterFolder:
    """The adapter folder, read once, or an :class:`AdapterError` when it is not a LoRA adapter (the only kind that merges into weights)."""
    folder = read_adapter_folder(adapter)
    problem = merge_problem(folder.peft_type)
    if problem:
        raise AdapterError(f"{folder.path}: {problem}")
    return folder


def check_export_dir(output_dir: str, adapter_path: str | AdapterFolder, overwrite: bool, flag: str = "--overwrite_output_dir True",
                     model_path: str | None = None, inputs: dict | None = None) -> None:
    """Refuse, always, a folder that is, holds or lies in the adapter, its base or another input (``inputs``), and a
    non-empty folder unless ``overwrite``: nothing is replaced silently."""
    path = Path(output_dir)
    inputs = {**adapter_command_inputs(adapter_path, model_path), **(inputs or {})}
    check_not_an_input(output_dir, "--output_dir", inputs, example="outputs/lora_merged")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportDirExistsError(
            f"--output_dir {output_dir} already holds files. Choose an empty folder, or pass overwrite=True "
            f"({flag}) to replace the model files in it."
        )


def merge_tolerance(dtype: torch.dtype, logits: list[torch.Tensor]) -> float:
    """The largest logits difference a correct merge can show in ``dtype``: its rounding, scaled by the logits' size."""
    scale = max(row.abs().max().item() for row in logits)
    return MERGE_TOLERANCE[dtype] * max(1.0, scale)


def trained_on_4bit_logits(adapter_path: str | AdapterFolder, model_path: str | None, prompts: list[str],
                           enable_thinking: bool) -> list[torch.Tensor]:
    """Logits of the model as it was trained (the 4-bit base with the adapter on top); the model is freed on return."""
    model, tokenizer = load_model_with_adapter(adapter_path, model_path, load_in_4bit=True)
    return prompt_logits(model, tokenizer, prompts, enable_thinking)


def merge_and_export(adapter_path: str | AdapterFolder, output_dir: str, model_path: str | None = None, prompts: list[str] | None = None,
                     overwrite: bool = False, settings: PromptSettings | None = None) -> ExportReport:
    """Merge a LoRA (or QLoRA) adapter into its 16-bit base, check the logits, save model + tokenizer as safetensors.

    ``settings``: how the merged model is to be asked (default: what the adapter's run_config.json records). They
    are saved as prompt_settings.json, and the saved chat template's ``enable_thinking`` defaults to their mode.
    """
    folder = check_mergeable_adapter(adapter_path)  # read once: every step below takes the folder
    check_export_dir(output_dir, folder, overwrite, model_path=model_path)
    if settings is None and folder.run_config:
        settings = settings_from_run_config(folder.run_config)
    thinking = bool(settings and settings.enable_thinking)
    prompts = prompts or DEFAULT_PROMPTS
    four_bit_logits = None
    if folder.load_in_4bit:
        four_bit_logits = trained_on_4bit_logits(folder, model_path, prompts, thinking)
    release_memory()

    model, tokenizer = load_model_with_adapter(folder, model_path, load_in_4bit=False)
    adapter_logits = prompt_logits(model, tokenizer, prompts, thinking)
    merged = model.merge_and_unload(safe_merge=True)
    merged_logits = prompt_logits(merged, tokenizer, prompts, thinking)
    difference = largest_difference(adapter_logits, merged_logits)
    dtype = merged.dtype
    tolerance = merge_tolerance(dtype, adapter_logits)
    if difference > tolerance:
        raise MergeMismatchError(
            f"Merging {folder.path} changed the logits by {difference:.3g} (more than {tolerance:.3g} allowed in "
            f"{dtype}); nothing was saved. That points to a numerical problem such as fp16 overflow in the merged "
            "weights: merge on the CPU in fp32 instead (CUDA_VISIBLE_DEVICES= python -m qwen_helpers.export --format hf ...)."
        )
    started = time.time()
    merged.save_pretrained(output_dir)
    if settings is not None:
        tokenizer.chat_template = template_with_thinking_default(tokenizer.chat_template, settings.enable_thinking)
        write_prompt_settings(output_dir, settings)
    tokenizer.save_pretrained(output_dir)
    give_default_modes(output_dir, since=started - 2)  # the files just written (safetensors' are owner-only otherwise)
    return ExportReport(
        output_dir=output_dir,
        max_abs_diff_vs_16bit_adapter=difference,
        max_abs_diff_vs_4bit_adapter=None if four_bit_logits is None else largest_difference(four_bit_logits, merged_logits),
        merged_size_bytes=folder_size(output_dir, "*.safetensors"),
        notes=export_notes(output_dir, four_bit_logits is not None, dtype)
        + prompt_notes(output_dir, settings, tokenizer.chat_template),
    )


def export_notes(output_dir: str, trained_on_4bit: bool, merged_dtype: torch.dtype) -> list[str]:
    """What the numbers mean and how to load the result."""
    dtype = str(merged_dtype).removeprefix("torch.")
    if trained_on_4bit:
        notes = [
            f"merged in {dtype} into the unquantised base: merging into 4-bit weights would round the LoRA update away",
            "the adapter was trained on a 4-bit base, so the merged model differs from the trained model by the 4-bit rounding "
            "of the base weights (the second difference above); compare their answers on your own prompts before shipping it",
        ]
    else:
        notes = [f"merged in {dtype}: the adapter was trained on an unquantised base, so the merged model is the trained model up to rounding"]
    return notes + [f"load it without peft: AutoModelForCausalLM.from_pretrained({output_dir!r})"]


def prompt_notes(output_dir: str, settings: PromptSettings | None, chat_template) -> list[str]:
    """How the merged model is to be asked, and where the folder records it."""
    if settings is None:
        return ["no run_config.json beside the adapter: the chat template is saved as it was (prompt format unknown)"]
    system = repr(settings.system_prompt) if settings.system_prompt else "none (the chat template's default)"
    notes = [f"trained prompt format recorded in {Path(output_dir) / PROMPT_SETTINGS}: system prompt {system}"]
    if has_thinking_switch(chat_template):
        mode = "thinking" if settings.enable_thinking else "non-thinking"
        notes.append(f"{mode} mode, as trained: the saved chat template's enable_thinking now defaults to "
                     f"{settings.enable_thinking} (a request that passes enable_thinking still decides)")
    return notes

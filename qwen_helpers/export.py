"""Merge a LoRA adapter into its base and export a model people run: a transformers folder, a verified GGUF, a vLLM check.

Merging into a 4-bit base would round the LoRA update into 4-bit weights and lose most of it, so the
base is always reloaded in 16-bit (fp16 on a GPU, fp32 on a CPU) and merged there with
``merge_and_unload``. The export checks its own work: the merged model must give the same logits as
the 16-bit base with the adapter on top (up to rounding), and for a QLoRA adapter it reports how far
the merged model is from what was trained (the 4-bit base + adapter).

    report = merge_and_export("outputs/qlora", "outputs/qlora_merged")
    print(report)

The command (GGUF and the vLLM check live in gguf_export.py, ollama.py and serving.py):

    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_merged --format hf
    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_gguf --format gguf --gguf_type q8_0
    python -m qwen_helpers.export --check vllm --adapter_path outputs/lora --max_lora_rank 16
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from .adapters import AdapterError, load_model_with_adapter, merge_problem, read_adapter_info
from .data import format_prompt
from .records import DataValidationError, load_records
from .files import OutputExistsError, folder_size, human_bytes
from .modeling import evaluation_mode, release_memory

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
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    """Logits at every position of each prompt, chat-formatted as in training, one prompt at a time (fp32, on the CPU)."""
    rows = []
    with evaluation_mode(model):
        for prompt in prompts:
            text = format_prompt(tokenizer, {"instruction": prompt})
            inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
            rows.append(model(**inputs).logits[0].float().cpu())
    return rows


def largest_difference(logits_a: list[torch.Tensor], logits_b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two lists of logits computed on the same prompts."""
    return max((a - b).abs().max().item() for a, b in zip(logits_a, logits_b, strict=True))


def max_logits_difference(model_a, model_b, tokenizer, prompts: list[str]) -> float:
    """Largest absolute logits difference between two models on the same chat-formatted prompts (0 means identical)."""
    return largest_difference(prompt_logits(model_a, tokenizer, prompts), prompt_logits(model_b, tokenizer, prompts))


def check_mergeable_adapter(adapter_path: str) -> dict:
    """The adapter's info, or an :class:`AdapterError` when it is not a LoRA adapter (the only kind that merges into weights)."""
    info = read_adapter_info(adapter_path)
    problem = merge_problem(str(info.get("peft_type", "")))
    if problem:
        raise AdapterError(f"{adapter_path}: {problem}")
    return info


def check_export_dir(output_dir: str, adapter_path: str, overwrite: bool, flag: str = "--overwrite True") -> None:
    """Refuse the adapter's own folder always, and a non-empty folder unless ``overwrite``: nothing is replaced silently."""
    path = Path(output_dir)
    if path.resolve() == Path(adapter_path).resolve():
        raise ExportDirExistsError(f"--output_dir {output_dir} is the adapter's own folder; export the merged model to another folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportDirExistsError(
            f"--output_dir {output_dir} already holds files. Choose an empty folder, or pass overwrite=True "
            f"({flag}) to replace the model files in it."
        )


def merge_tolerance(dtype: torch.dtype, logits: list[torch.Tensor]) -> float:
    """The largest logits difference a correct merge can show in ``dtype``: its rounding, scaled by the logits' size."""
    scale = max(row.abs().max().item() for row in logits)
    return MERGE_TOLERANCE[dtype] * max(1.0, scale)


def trained_on_4bit_logits(adapter_path: str, model_path: str | None, prompts: list[str]) -> list[torch.Tensor]:
    """Logits of the model as it was trained (the 4-bit base with the adapter on top); the model is freed on return."""
    model, tokenizer = load_model_with_adapter(adapter_path, model_path, load_in_4bit=True)
    return prompt_logits(model, tokenizer, prompts)


def merge_and_export(adapter_path: str, output_dir: str, model_path: str | None = None, prompts: list[str] | None = None,
                     overwrite: bool = False) -> ExportReport:
    """Merge a LoRA (or QLoRA) adapter into its 16-bit base, check the logits, and save model + tokenizer as safetensors."""
    info = check_mergeable_adapter(adapter_path)
    check_export_dir(output_dir, adapter_path, overwrite)
    prompts = prompts or DEFAULT_PROMPTS
    four_bit_logits = trained_on_4bit_logits(adapter_path, model_path, prompts) if info.get("kit_load_in_4bit") else None
    release_memory()

    model, tokenizer = load_model_with_adapter(adapter_path, model_path, load_in_4bit=False)
    adapter_logits = prompt_logits(model, tokenizer, prompts)
    merged = model.merge_and_unload(safe_merge=True)
    merged_logits = prompt_logits(merged, tokenizer, prompts)
    difference = largest_difference(adapter_logits, merged_logits)
    dtype = merged.dtype
    tolerance = merge_tolerance(dtype, adapter_logits)
    if difference > tolerance:
        raise MergeMismatchError(
            f"Merging {adapter_path} changed the logits by {difference:.3g} (more than {tolerance:.3g} allowed in "
            f"{dtype}); nothing was saved. That points to a numerical problem such as fp16 overflow in the merged "
            "weights: merge on the CPU in fp32 instead (CUDA_VISIBLE_DEVICES= python -m qwen_helpers.inference --merge True ...)."
        )
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return ExportReport(
        output_dir=output_dir,
        max_abs_diff_vs_16bit_adapter=difference,
        max_abs_diff_vs_4bit_adapter=None if four_bit_logits is None else largest_difference(four_bit_logits, merged_logits),
        merged_size_bytes=folder_size(output_dir, "*.safetensors"),
        notes=export_notes(output_dir, four_bit_logits is not None, dtype),
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


# ---------------------------------------------------------------------------------------------- the command


@dataclass
class ExportArguments:
    """Flags of ``python -m qwen_helpers.export``: merge and export an adapter, check it for vLLM, or fetch llama.cpp's converter."""

    adapter_path: str | None = field(default=None, metadata={"help": "The LoRA/QLoRA adapter folder to export or check."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for the merged model (and the GGUF, Modelfile and export_report.json)."})
    format: Literal["hf", "gguf"] = field(default="hf", metadata={"help": "hf: merged transformers folder; gguf: that folder plus a verified GGUF and an Ollama Modelfile."})
    gguf_type: Literal["f32", "f16", "q8_0", "q4_k_m"] = field(default="q8_0", metadata={"help": "GGUF weight type: f32/f16 (answers must equal transformers'), q8_0, q4_k_m (quantised: agreement is reported)."})
    verify_prompts: int = field(default=5, metadata={"help": "Prompts from --verify_data on which the GGUF must tokenise and answer like transformers."})
    verify_data: str = field(default="data/test.json", metadata={"help": "Records (instruction, input) whose prompts the verification uses."})
    verify_max_new_tokens: int = field(default=16, metadata={"help": "Greedy tokens compared per verification prompt."})
    model_path: str | None = field(default=None, metadata={"help": "Base model; default: the base the adapter records."})
    system: str | None = field(default=None, metadata={"help": "System prompt for the Modelfile; default: the one every training record shares, else the template's."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow a non-empty --output_dir (its model files are replaced)."})
    llama_cpp_dir: str | None = field(default=None, metadata={"help": "A llama.cpp source folder holding convert_hf_to_gguf.py; default: the fetched one."})
    check: Literal["vllm"] | None = field(default=None, metadata={"help": "vllm: report whether vLLM's LoRA loader takes the adapter (no vLLM needed); exports nothing."})
    max_lora_rank: int = field(default=16, metadata={"help": "With --check vllm: the --max-lora-rank vLLM will be started with (its default is 16)."})
    fetch_converter: bool = field(default=False, metadata={"help": "Download llama-cpp-python's pinned source with pip and keep llama.cpp's converter, then stop."})

    def __post_init__(self):
        if self.fetch_converter:
            return
        if not self.adapter_path:
            raise ValueError("Pass --adapter_path (the adapter to export or check), or --fetch_converter True.")
        if self.check is None and not self.output_dir:
            raise ValueError("Pass --output_dir (where the merged model goes), or --check vllm to check the adapter without exporting.")
        if self.verify_prompts < 1:
            raise ValueError(f"--verify_prompts must be at least 1 (verification is always on), got {self.verify_prompts}.")


def parse_export_args(argv: list[str] | None = None) -> ExportArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ExportArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def verification_records(args: ExportArguments) -> list[dict]:
    """The first --verify_prompts records of --verify_data, read before any model loads."""
    if not Path(args.verify_data).is_file():
        raise AdapterError(f"--verify_data {args.verify_data} does not exist; pass a JSON/JSONL file of records (instruction, input), e.g. your test set.")
    return load_records(args.verify_data)[: args.verify_prompts]


def training_system(info: dict) -> str | None:
    """The system prompt every training record shared, if the training file is still where the run recorded it."""
    from .ollama import training_system_prompt

    data_path = (info.get("kit_run") or {}).get("data_path")
    return training_system_prompt(load_records(data_path)) if data_path and Path(data_path).is_file() else None


def export_gguf(args: ExportArguments, records: list[dict], tools: dict, info: dict) -> tuple[dict, Path]:
    """Convert the merged folder with llama.cpp's converter, verify it, write the Modelfile; returns (verification, GGUF path)."""
    from .gguf_export import convert_to_gguf, verify_gguf
    from .modeling import load_tokenizer
    from .ollama import write_modelfile

    gguf_file = Path(args.output_dir) / f"model-{args.gguf_type}.gguf"
    convert_to_gguf(args.output_dir, str(gguf_file), args.gguf_type, tools["converter"])
    verification = verify_gguf(str(gguf_file), args.output_dir, records, args.gguf_type, args.verify_max_new_tokens)
    write_modelfile(str(gguf_file), load_tokenizer(args.output_dir), args.system or training_system(info))
    return verification, gguf_file


def run_export(args: ExportArguments) -> int:
    """Merge, write the transformers folder, and for --format gguf convert, verify and write the Modelfile; 1 if verification fails."""
    from .gguf_export import LLAMA_CPP_PYTHON_VERSION, check_gguf_tools, verification_summary

    info = check_mergeable_adapter(args.adapter_path)  # prompt tuning stops here, saying why
    check_export_dir(args.output_dir, args.adapter_path, args.overwrite_output_dir, "--overwrite_output_dir True")
    tools = check_gguf_tools(args.gguf_type, args.llama_cpp_dir) if args.format == "gguf" else {}
    records = verification_records(args) if args.format == "gguf" else []
    if tools:
        print(f"llama.cpp converter and runtime: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({tools['converter']})", flush=True)
    merge = merge_and_export(args.adapter_path, args.output_dir, model_path=args.model_path, overwrite=args.overwrite_output_dir)
    print(merge, flush=True)
    report = {"adapter_path": args.adapter_path, "format": args.format, "merge": {k: v for k, v in merge.__dict__.items()}, **({"tools": tools} if tools else {})}
    status = 0
    if args.format == "gguf":
        verification, gguf_file = export_gguf(args, records, tools, info)
        report["verification"] = verification
        print(verification_summary(verification))
        print(f"GGUF: {gguf_file}; Ollama: ollama create my-model -f {Path(args.output_dir) / 'Modelfile'} && ollama run my-model")
        if not verification["passed"]:
            print(f"error: the GGUF does not match the transformers model (details in {Path(args.output_dir) / 'export_report.json'}).", file=sys.stderr)
            status = 1
    (Path(args.output_dir) / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point: export an adapter (--format hf|gguf), check it for vLLM (--check vllm), or fetch llama.cpp's converter."""
    from .gguf_export import LLAMA_CPP_PYTHON_VERSION, MissingToolError, fetch_converter
    from .serving import check_vllm_adapter

    try:
        args = parse_export_args(argv)
    except ValueError as error:  # a bad flag combination, found by ExportArguments.__post_init__
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        if args.fetch_converter:
            print(f"llama.cpp's converter from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} is in {fetch_converter()}")
            return 0
        if args.check == "vllm":
            result = check_vllm_adapter(args.adapter_path, args.model_path, args.max_lora_rank)
            print(result)
            return 0 if result.passed else 1
        return run_export(args)
    except (AdapterError, DataValidationError, FileExistsError, MissingToolError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

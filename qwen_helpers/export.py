"""Export a LoRA adapter as a model people run: a merged transformers folder, a verified GGUF, a vLLM check.

    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_merged --format hf
    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_gguf --format gguf --gguf_type q8_0
    python -m qwen_helpers.export --check vllm --adapter_path outputs/lora --max_lora_rank 16

The merge and its logits check live in :mod:`qwen_helpers.merge`; GGUF, Ollama and vLLM in
gguf_export.py, ollama.py and serving.py. Flags are checked before torch is imported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import command_boundary
from .quickflags import dataclass_parser, parse_command_flags
from .records import load_records


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
    """The flags, checked (types, choices and ``__post_init__``'s sentences) before torch or transformers is imported."""
    (args,) = parse_command_flags("export", lambda: dataclass_parser(ExportArguments), argv,
                                  check=lambda flags: ExportArguments(**vars(flags)))
    return args


def verification_records(args: ExportArguments) -> list[dict]:
    """The first --verify_prompts records of --verify_data, read before any model loads."""
    from .adapters import AdapterError

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
    from .merge import check_export_dir, check_mergeable_adapter, merge_and_export

    info = check_mergeable_adapter(args.adapter_path)  # prompt tuning stops here, saying why
    gguf = args.format == "gguf"
    gguf_inputs = {"--verify_data": args.verify_data, "--llama_cpp_dir": args.llama_cpp_dir} if gguf else {}
    check_export_dir(args.output_dir, args.adapter_path, args.overwrite_output_dir, "--overwrite_output_dir True",
                     args.model_path, gguf_inputs)
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


@command_boundary
def main(argv: list[str] | None = None) -> int:
    """Entry point: export an adapter (--format hf|gguf), check it for vLLM (--check vllm), or fetch llama.cpp's converter."""
    args = parse_export_args(argv)
    from .gguf_export import LLAMA_CPP_PYTHON_VERSION, fetch_converter
    from .serving import check_vllm_adapter

    if args.fetch_converter:
        print(f"llama.cpp's converter from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} is in {fetch_converter()}")
        return 0
    if args.check == "vllm":
        result = check_vllm_adapter(args.adapter_path, args.model_path, args.max_lora_rank)
        print(result)
        return 0 if result.passed else 1
    return run_export(args)  # a missing GGUF tool (MissingToolError) is a KitError: one line naming the install command

if __name__ == "__main__":
    sys.exit(main())

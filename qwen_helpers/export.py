"""Export a LoRA adapter as a model people run: a merged transformers folder, a verified GGUF, a vLLM check.

    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_merged --format hf
    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_gguf --format gguf --gguf_type q8_0
    python -m qwen_helpers.export --check vllm --adapter_path outputs/lora --max_lora_rank 16

The merge and its logits check live in :mod:`qwen_helpers.deploy.merge`; GGUF, Ollama and vLLM in
deploy/gguf.py, deploy/ollama.py and deploy/serving.py. How the model is asked (thinking mode, system prompt, record
fields) comes from the adapter's run_config.json (:mod:`qwen_helpers.run.prompt_settings`), never from the
current directory. Flags are checked before torch is imported.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from .common.errors import command_boundary
from .run.prompt_settings import (PromptSettings, data_format_flag, field_flag, read_records_as_trained,
                              settings_from_run_config, with_system_prompt)
from .run.quickflags import dataclass_parser, parse_command_flags


@dataclass
class ExportArguments:
    """Flags of ``python -m qwen_helpers.export``: merge and export an adapter, check it for vLLM, or fetch llama.cpp's converter."""

    adapter_path: str | None = field(default=None, metadata={"help": "The LoRA/QLoRA adapter folder to export or check."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder for the merged model (and the GGUF, Modelfile and export_report.json)."})
    format: Literal["hf", "gguf"] = field(default="hf", metadata={"help": "hf: merged transformers folder; gguf: that folder plus a verified GGUF and an Ollama Modelfile."})
    gguf_type: Literal["f32", "f16", "q8_0", "q4_k_m"] = field(default="q8_0", metadata={"help": "GGUF weight type: f32/f16 (answers must equal transformers'), q8_0, q4_k_m (quantised: agreement is reported)."})
    verify_prompts: int = field(default=5, metadata={"help": "Prompts from --verify_data on which the GGUF must tokenise and answer like transformers."})
    verify_data: str = field(default="data/test.json", metadata={"help": "Records (instruction, input) whose prompts the verification uses."})
    instruction_field: str | None = field_flag("instruction")
    input_field: str | None = field_flag("input")
    output_field: str | None = field_flag("output")
    system_field: str | None = field_flag("system")
    data_format: Literal["auto", "alpaca", "messages", "sharegpt"] | None = data_format_flag()
    verify_max_new_tokens: int = field(default=16, metadata={"help": "Greedy tokens compared per verification prompt."})
    model_path: str | None = field(default=None, metadata={"help": "Base model; default: the base the adapter records."})
    system: str | None = field(default=None, metadata={
        "help": "System prompt for the Modelfile and the verification; default: the one every training record shared "
                "(recorded in the adapter's run_config.json), else the chat template's."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace a non-empty --output_dir (the old folder is removed once the new export is complete)."})
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
    """The flags, parsed once and checked (types, choices and ``__post_init__``'s sentences) before any model loads."""
    (args,) = parse_command_flags("export", lambda: dataclass_parser(ExportArguments), argv)
    return args


def export_settings(args: ExportArguments, adapter=None) -> tuple[PromptSettings | None, PromptSettings]:
    """(what the adapter records or None, what the export uses: that record with --system on top, else the defaults).

    ``adapter``: the folder already read (:class:`qwen_helpers.models.adapter_folder.AdapterFolder`), else --adapter_path.
    """
    from .models.adapter_folder import read_adapter_folder

    adapter = read_adapter_folder(adapter or args.adapter_path)
    recorded = settings_from_run_config(adapter.run_config) if adapter.run_config else None
    settings = recorded or PromptSettings()
    if args.system:
        settings = replace(settings, system_prompt=args.system)
    return (settings if recorded or args.system else None), settings


def verification_records(args: ExportArguments, settings: PromptSettings) -> list[dict]:
    """The first --verify_prompts records of --verify_data (read with the trained field map), before any model loads.

    Records without a system prompt get the one the Modelfile sets, as Ollama sends them.
    """
    from .models.adapter_folder import AdapterError

    if not Path(args.verify_data).is_file():
        raise AdapterError(f"--verify_data {args.verify_data} does not exist; pass a JSON/JSONL file of records "
                           "(instruction, input), e.g. your test set.")
    records = read_records_as_trained(args.verify_data, args, settings)[: args.verify_prompts]
    return [with_system_prompt(record, settings.system_prompt) for record in records]


def export_gguf(args: ExportArguments, folder: Path, records: list[dict], tools: dict,
                settings: PromptSettings) -> tuple[dict, Path]:
    """Convert the merged model in ``folder`` with llama.cpp's converter, verify it, write the Modelfile.

    Returns (verification, GGUF path). A llama.cpp crash while quantising or verifying becomes a failed verification
    that says so: the GGUF stays (unverified, if it was written) and no Modelfile is written for it.
    """
    from .deploy.gguf import LlamaCrashError, convert_to_gguf, verify_gguf
    from .models.loading import load_tokenizer
    from .deploy.ollama import write_modelfile

    gguf_file = folder / f"model-{args.gguf_type}.gguf"
    try:
        convert_to_gguf(str(folder), str(gguf_file), args.gguf_type, tools["converter"])
        verification = verify_gguf(str(gguf_file), str(folder), records, args.gguf_type, args.verify_max_new_tokens,
                                   settings.enable_thinking)
    except LlamaCrashError as crash:
        return {"passed": False, "crashed": str(crash), "gguf_written": gguf_file.is_file()}, gguf_file
    write_modelfile(str(gguf_file), load_tokenizer(str(folder)), settings.system_prompt, settings.enable_thinking)
    return verification, gguf_file


def crash_line(verification: dict, output_dir: Path, gguf_file: Path) -> str:
    """The one line a llama.cpp crash gets: what crashed, what was kept, where the details are."""
    kept = f"the GGUF is kept at {gguf_file} (unverified)" if verification["gguf_written"] else "no GGUF was written"
    return (f"error: {verification['crashed']}; {kept}, no Modelfile written; the merged model is in {output_dir} "
            f"(details in {output_dir / 'export_report.json'}). Reinstall llama-cpp-python portably: bash scripts/install_llama_cpp.sh")


def build_export(args: ExportArguments, adapter, folder: Path, records: list[dict], tools: dict, recorded,
                 settings: PromptSettings) -> tuple[int, dict]:
    """Merge into ``folder`` and, for --format gguf, convert, verify and write the Modelfile there; (exit status, report)."""
    from .deploy.gguf import verification_summary
    from .deploy.merge import merge_and_export

    output_dir = Path(args.output_dir)
    merge = merge_and_export(adapter, str(folder), model_path=args.model_path, overwrite=True, settings=recorded)
    # where it will be once the folder is swapped in, in the report and in the notes' "load it" line
    merge.output_dir = str(output_dir)
    merge.notes = [note.replace(str(folder), str(output_dir)) for note in merge.notes]
    print(merge, flush=True)
    report = {"adapter_path": args.adapter_path, "format": args.format, "merge": dict(merge.__dict__),
              "prompt_settings": settings.to_json(), **({"tools": tools} if tools else {})}
    if args.format != "gguf":
        return 0, report
    verification, gguf_file = export_gguf(args, folder, records, tools, settings)
    final_gguf = output_dir / gguf_file.name
    report["verification"] = {**verification, **({"gguf_file": str(final_gguf)} if "gguf_file" in verification else {})}
    if "crashed" in verification:
        print(crash_line(verification, output_dir, final_gguf), file=sys.stderr)
        return 1, report
    print(verification_summary(verification))
    print(f"GGUF: {final_gguf}; Ollama: ollama create my-model -f {output_dir / 'Modelfile'} && ollama run my-model")
    if not verification["passed"]:
        print(f"error: the GGUF does not match the transformers model (details in {output_dir / 'export_report.json'}).", file=sys.stderr)
        return 1, report
    return 0, report


def run_export(args: ExportArguments) -> int:
    """Merge, write the transformers folder, and for --format gguf convert, verify and write the Modelfile; 1 if verification fails.

    Everything is written into a staging folder beside --output_dir and swapped in whole at the end: an
    interrupted export leaves no half-written folder, and a failed verification leaves a complete folder whose
    export_report.json says what failed.
    """
    from .common.files import atomic_write_text, new_staging_folder, remove_folders, swap_in
    from .deploy.gguf import LLAMA_CPP_PYTHON_VERSION, check_gguf_tools
    from .deploy.merge import check_export_dir, check_mergeable_adapter

    adapter = check_mergeable_adapter(args.adapter_path)  # read once; prompt tuning stops here, saying why
    gguf = args.format == "gguf"
    gguf_inputs = {"--verify_data": args.verify_data, "--llama_cpp_dir": args.llama_cpp_dir} if gguf else {}
    check_export_dir(args.output_dir, adapter, args.overwrite_output_dir, "--overwrite_output_dir True",
                     args.model_path, gguf_inputs)
    recorded, settings = export_settings(args, adapter)  # before any model loads: an old run re-reads its data file here
    records = verification_records(args, settings) if args.format == "gguf" else []
    tools = check_gguf_tools(args.gguf_type, args.llama_cpp_dir) if args.format == "gguf" else {}
    if tools:
        print(f"llama.cpp converter and runtime: llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({tools['converter']})", flush=True)
    staging = new_staging_folder(args.output_dir)
    try:
        status, report = build_export(args, adapter, staging, records, tools, recorded, settings)
        atomic_write_text(staging / "export_report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str))
        swap_in(staging, args.output_dir)
    except BaseException:
        remove_folders([staging])
        raise
    return status


@command_boundary
def main(argv: list[str] | None = None) -> int:
    """Entry point: export an adapter (--format hf|gguf), check it for vLLM (--check vllm), or fetch llama.cpp's converter."""
    args = parse_export_args(argv)
    from .deploy.gguf import LLAMA_CPP_PYTHON_VERSION, fetch_converter
    from .deploy.serving import check_vllm_adapter

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

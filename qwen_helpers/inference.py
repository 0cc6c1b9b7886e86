"""Load adapters and generate with them: the kit's inference path and the ``python -m qwen_helpers.inference`` command.

Prompts are formatted by :func:`qwen_helpers.data.format_prompt`, the same function training uses;
generation stops at ``<|im_end|>`` (the end of an assistant turn) and batches are left-padded, so
the last prompt token of every row sits next to its first new token.

    python -m qwen_helpers.inference --adapter_path outputs/lora --instruction "翻译为英文" --input "早安"
    python -m qwen_helpers.inference --adapter_path outputs/lora --data_path data/test.json --output_file outputs/preds.jsonl
    python -m qwen_helpers.inference --merge True --adapter_path outputs/lora --output_dir outputs/lora_merged
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .data import DataValidationError, format_prompt, load_records
from .modeling import device_type, load_base_model, load_tokenizer, release_memory, synchronize
from .tiny import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end of an assistant turn; end of a document (base models)
PROMPT_TUNING_CANNOT_MERGE = (
    "a prompt-tuning adapter cannot be merged: its soft prompt is an input (learned vectors put in front of "
    "every prompt), not a change to any weight, so there is nothing to add into the base's matrices. "
    "Load it with PeftModel.from_pretrained (or --adapter_path) instead."
)


class AdapterError(ValueError):
    """An adapter folder that cannot be loaded, with the path and what to do."""


# ---------------------------------------------------------------------------------------------- loading


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
    recorded = recorded_base(read_adapter_info(adapter_path))
    if not recorded:
        raise AdapterError(f"{adapter_path}: the adapter does not record its base model; pass --model_path.")
    return recorded


def recorded_base(info: dict) -> str | None:
    """The base an adapter records: the kit's run config first (it keeps aliases such as "tiny"), else peft's."""
    return info.get("kit_model_path") or info.get("base_model_name_or_path")


def adapter_kind(info: dict) -> str:
    """'lora', 'qlora' (LoRA trained on a 4-bit base), 'prompt_tuning', or peft's type in lower case."""
    peft_type = str(info.get("peft_type", "")).lower()
    if peft_type == "lora" and info.get("kit_load_in_4bit"):
        return "qlora"
    return peft_type


def find_adapter_folders(root: str = "outputs", model_path: str | None = None) -> dict[str, str]:
    """Adapter folders directly under ``root`` (name -> path); with ``model_path``, only those trained on that base."""
    folders = {}
    for folder in sorted(Path(root).iterdir()) if Path(root).is_dir() else []:
        if not (folder / ADAPTER_CONFIG).is_file():
            continue
        recorded = recorded_base(read_adapter_info(str(folder)))
        if model_path is None or (recorded and _same_base(recorded, model_path)):
            folders[folder.name] = str(folder)
    return folders


def _same_base(recorded: str, model_path: str) -> bool:
    return recorded == model_path or resolve_model_path(recorded) == resolve_model_path(model_path)


def inference_dtype(run_config: dict | None = None) -> torch.dtype:
    """fp32 on a CPU; on a GPU bf16 when the run trained in bf16 (and the card has it), else fp16 as the seed's ``model.half()``."""
    if device_type() != "cuda":
        return torch.float32
    if (run_config or {}).get("bf16") and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # a bf16-trained Qwen2.5+ can overflow fp16
    return torch.float16


def load_base_for_inference(model_path: str = "tiny", load_in_4bit: bool = False, run_config: dict | None = None):
    """The base model alone, ready for generate (fp16 on GPU, fp32 on CPU, 4-bit if asked); returns (model, tokenizer)."""
    quantization_config = None
    if load_in_4bit:
        from .config import ModelArguments
        from .modeling import build_quantization_config

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
    return model, load_tokenizer(model_path)


def _recorded_base_config(info: dict) -> tuple[str | None, dict | None]:
    """The base the adapter records and that base's config.json, when it is a local folder (no downloads)."""
    recorded = recorded_base(info)
    if not recorded:
        return None, None
    config_file = Path(resolve_model_path(recorded)) / "config.json"
    return recorded, json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None


def check_base_matches(model, adapter_path: str, info: dict) -> None:
    """Raise :class:`AdapterError` when the adapter was trained on a base of another shape than ``model``.

    LoRA weights of the wrong shape make peft raise, but a soft prompt of the wrong width loads
    silently (peft 0.21) and a same-shaped but different architecture would too; this check catches both.
    """
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    problems = []
    token_dim = info.get("token_dim")
    if token_dim and token_dim != config.hidden_size:
        problems.append(f"its soft prompt vectors have {token_dim} dimensions, the model's hidden size is {config.hidden_size}")
    recorded, recorded_config = _recorded_base_config(info)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if recorded_config and recorded_config.get(key) != getattr(config, key, None):
            problems.append(f"{key} is {recorded_config.get(key)} in its base, {getattr(config, key, None)} here")
    if problems:
        raise AdapterError(
            f"{adapter_path} does not fit this base model ({config.model_type}, hidden size {config.hidden_size}): "
            f"{'; '.join(problems)}. It was trained on {recorded!r}: load it on that base (--model_path {recorded}), "
            "or train an adapter on this one."
        )


def load_adapter(model, adapter_path: str, adapter_name: str = "default"):
    """Put an adapter on a loaded base (a second call with another name adds it beside the first)."""
    from peft import PeftModel

    info = read_adapter_info(adapter_path)
    check_base_matches(model, adapter_path, info)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(adapter_path, adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, adapter_path, adapter_name=adapter_name)
    except RuntimeError as error:
        if "size mismatch" in str(error):
            raise AdapterError(
                f"{adapter_path} does not fit this base model (size mismatch): it was trained on another model. "
                f"Pass the base it was trained on with --model_path (it recorded {_recorded_base_config(info)[0]!r})."
            ) from error
        raise
    except ValueError as error:
        if "different peft types" in str(error):
            raise AdapterError(
                f"{adapter_path} is a {adapter_kind(info)} adapter and the model already holds another kind; peft keeps "
                "one kind per model. Load it on its own model with load_model_with_adapter."
            ) from error
        raise


def load_model_with_adapter(adapter_path: str, model_path: str | None = None, load_in_4bit: bool | None = None, adapter_name: str = "default"):
    """Load base + adapter from just the adapter folder; returns (model, tokenizer), ready for generate.

    The base is the one the adapter records (``model_path`` overrides it), loaded 4-bit when the adapter
    was trained on a 4-bit base (QLoRA); LoRA and prompt-tuning adapters load the same way.
    """
    info = read_adapter_info(adapter_path)
    base = base_model_path_of(adapter_path, model_path)
    four_bit = load_in_4bit if load_in_4bit is not None else bool(info.get("kit_load_in_4bit"))
    model, tokenizer = load_base_for_inference(base, four_bit, info.get("kit_run"))
    model = load_adapter(model, adapter_path, adapter_name)
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


# ---------------------------------------------------------------------------------------------- generation


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an answer: ``<|im_end|>`` first, then ``<|endoftext|>``."""
    return [tokenizer.convert_tokens_to_ids(token) for token in STOP_TOKENS]


def cut_at_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    """The new tokens up to and including the first stop token (padding after it removed)."""
    for position, token in enumerate(token_ids):
        if token in stop_ids:
            return token_ids[: position + 1]
    return token_ids


def uses_soft_prompt(model) -> bool:
    """True for a peft model whose active adapter is a soft prompt put in front of the input embeddings (prompt tuning, p-tuning)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(model, "_adapters_disabled", False):  # inside disable_adapter() the base runs alone
        return False
    return str(config.peft_type.value) in ("PROMPT_TUNING", "P_TUNING")


@torch.no_grad()
def generate_new_tokens(model, batch, **generate_kwargs):
    """``model.generate`` on a tokenised batch, keeping only the new tokens (in ``.sequences`` with ``return_dict_in_generate``).

    A soft prompt is prepended once, as input embeddings, and the base generates from them: peft 0.21's own
    ``generate`` looks for ``past_key_values``, which transformers 5 calls ``cache``, so it re-inserts the
    virtual tokens at every step and every token after the first comes from a corrupted cache.
    """
    if uses_soft_prompt(model):
        word_embeddings = model.get_input_embeddings()(batch["input_ids"])
        soft_prompt = model.get_prompt(batch_size=word_embeddings.shape[0]).to(word_embeddings.dtype)
        prompt_mask = batch["attention_mask"].new_ones(soft_prompt.shape[:2])
        return model.get_base_model().generate(
            inputs_embeds=torch.cat([soft_prompt, word_embeddings], dim=1),
            attention_mask=torch.cat([prompt_mask, batch["attention_mask"]], dim=1),
            **generate_kwargs,
        )  # generating from embeddings, transformers returns only the new tokens
    output = model.generate(**batch, **generate_kwargs)
    prompt_length = batch["input_ids"].shape[1]
    if generate_kwargs.get("return_dict_in_generate"):
        output.sequences = output.sequences[:, prompt_length:]
        return output
    return output[:, prompt_length:]


@torch.no_grad()
def generate_ids(model, tokenizer, records: list[dict], max_new_tokens: int = 64, **generate_kwargs) -> list[list[int]]:
    """New token ids for one left-padded batch of records, each cut after its first stop token; greedy by default."""
    previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        prompts = [format_prompt(tokenizer, record) for record in records]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = previous_side
    generate_kwargs.setdefault("do_sample", False)
    output = generate_new_tokens(
        model, batch, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id, **generate_kwargs
    )
    stops = stop_token_ids(tokenizer)
    return [cut_at_stop(row, stops) for row in output.tolist()]


def generate_timed(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, progress: bool = False, **generate_kwargs) -> list[dict]:
    """Answer every record in batches; per record: prediction, new tokens (EOS included) and its batch's time."""
    from tqdm.auto import tqdm

    results = []
    with tqdm(total=len(records), desc="generating", unit="record", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            synchronize()
            began = time.perf_counter()
            rows = generate_ids(model, tokenizer, chunk, max_new_tokens, **generate_kwargs)
            synchronize()
            seconds = time.perf_counter() - began
            for ids in rows:
                text = tokenizer.decode(ids, skip_special_tokens=True).strip()
                results.append({"prediction": text, "new_tokens": len(ids), "batch_seconds": round(seconds, 4), "batch_size": len(chunk)})
            bar.update(len(chunk))
    return results


def total_seconds(rows: list[dict]) -> float:
    """Wall time of a :func:`generate_timed` run: each batch counted once (its records all carry its time)."""
    seconds, index = 0.0, 0
    while index < len(rows):
        seconds += rows[index]["batch_seconds"]
        index += rows[index]["batch_size"]
    return seconds


def generate(model, tokenizer, records: list[dict], max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[str]:
    """Answer each record (instruction/input) with the model: left-padded batches, stop at ``<|im_end|>``, greedy by default."""
    return [row["prediction"] for row in generate_timed(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)]


def stream(model, tokenizer, record: dict, max_new_tokens: int = 64, **generate_kwargs) -> Iterator[str]:
    """Yield the answer to one record piece by piece as it is generated (``TextIteratorStreamer`` + a thread)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    inputs = tokenizer([format_prompt(tokenizer, record)], return_tensors="pt", add_special_tokens=False).to(model.device)
    generate_kwargs.setdefault("do_sample", False)
    errors = []

    def run():
        try:
            generate_new_tokens(model, inputs, streamer=streamer, max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                                pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        except Exception as error:  # re-raised below, in the caller's thread
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def compare_adapters(model, tokenizer, records: list[dict], adapter_names: list[str] | None = None, include_base: bool = True,
                     max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> list[dict]:
    """Answers side by side: one row per record, one column per adapter of ``model`` (``set_adapter``) and the base."""
    names = adapter_names or list(model.peft_config)
    columns = {}
    if include_base:
        with model.disable_adapter():
            columns["base"] = generate(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)
    for name in names:
        model.set_adapter(name)
        columns[name] = generate(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)
    return [
        {"instruction": record["instruction"], "input": record.get("input", ""), "reference": record.get("output", ""),
         **{name: answers[index] for name, answers in columns.items()}}
        for index, record in enumerate(records)
    ]


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class Comparison:
    """Scores (one row per model and task, task "all" included) and the predictions of each model, on one record set."""

    records: list[dict]
    scores: list[dict] = field(default_factory=list)
    predictions: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, predictions: list[str]) -> None:
        """Record one model's predictions and score them per task."""
        from .metrics import scores_by_task

        self.predictions[name] = predictions
        self.scores += [{"model": name, **row} for row in scores_by_task(self.records, predictions)]

    def overall(self) -> list[dict]:
        """One row per model: its scores over all records."""
        return [row for row in self.scores if row["task"] == "all"]

    def side_by_side(self) -> list[dict]:
        """One row per record: instruction, input, reference, then each model's answer."""
        return [
            {"instruction": record["instruction"], "input": record.get("input", ""), "reference": record["output"],
             **{name: answers[index] for name, answers in self.predictions.items()}}
            for index, record in enumerate(self.records)
        ]


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


def evaluate_adapters(adapter_paths: dict[str, str], records: list[dict], model_path: str | None = None, include_base: bool = True,
                      max_new_tokens: int = 64, batch_size: int = 8, **generate_kwargs) -> Comparison:
    """Generate with the base and each adapter and score them per task: the base-vs-adapters table."""
    comparison = Comparison(records)

    def answer(name, model, tokenizer):
        comparison.add(name, generate(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs))

    for_each_model(adapter_paths, answer, model_path, include_base)
    return comparison


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
            "Merge it onto the 16-bit base instead (load_model_with_adapter(path, load_in_4bit=False), or --merge)."
        )


def merged_copy(model):
    """A merged copy of a LoRA model (``merge_and_unload`` on a deep copy); the original keeps its adapter."""
    check_mergeable(model)
    return copy.deepcopy(model).merge_and_unload()


def measure_throughput(model, tokenizer, records: list[dict], batch_size: int, max_new_tokens: int = 32, **generate_kwargs) -> dict:
    """New tokens per second of greedy generation over ``records`` at ``batch_size`` (tokens counted until EOS)."""
    generate_ids(model, tokenizer, records[:1], max_new_tokens=2)  # warm-up: first-call allocations and kernels
    rows = generate_timed(model, tokenizer, records, max_new_tokens, batch_size, **generate_kwargs)
    seconds = total_seconds(rows)
    new_tokens = sum(row["new_tokens"] for row in rows)
    return {"batch_size": min(batch_size, len(records)), "records": len(records), "new_tokens": new_tokens, "seconds": seconds, "tokens_per_second": new_tokens / seconds}


def throughput_table(model, tokenizer, records: list[dict], batch_sizes: tuple[int, ...] = (1, 8), max_new_tokens: int = 32, **generate_kwargs) -> list[dict]:
    """Tokens per second of the base (adapter disabled), the adapter unmerged, and merged (LoRA only), per batch size.

    Pass ``min_new_tokens=max_new_tokens`` to compare equal numbers of generated tokens (no early stop).
    """
    variants = {"base": model.disable_adapter, "adapter": contextlib.nullcontext}
    rows = []
    for name, context in variants.items():
        with context():
            rows += [{"model": name, **measure_throughput(model, tokenizer, records, size, max_new_tokens, **generate_kwargs)} for size in batch_sizes]
    try:
        merged = merged_copy(model)
    except AdapterError as error:
        rows.append({"model": "merged", "note": str(error)})
        return rows
    rows += [{"model": "merged", **measure_throughput(merged, tokenizer, records, size, max_new_tokens, **generate_kwargs)} for size in batch_sizes]
    del merged
    return rows


# ---------------------------------------------------------------------------------------------- command line


@dataclass
class InferenceArguments:
    """Flags of ``python -m qwen_helpers.inference``: what to load, what to answer, how to generate."""

    adapter_path: str | None = field(default=None, metadata={"help": "Adapter folder (train_lora/train_prompt_tuning/train_qlora output); omit for the base model alone."})
    model_path: str | None = field(default=None, metadata={"help": "Base model; default: the base the adapter records ('tiny' without an adapter)."})
    load_in_4bit: bool | None = field(default=None, metadata={"help": "Load the base in 4-bit; default: as the adapter was trained."})
    instruction: str | None = field(default=None, metadata={"help": "Answer one prompt: the instruction."})
    input: str = field(default="", metadata={"help": "Optional input that goes with --instruction."})
    system: str | None = field(default=None, metadata={"help": "Optional system prompt for --instruction."})
    data_path: str | None = field(default=None, metadata={"help": "Evaluate on a JSON/JSONL file of records (instruction, input, output, task)."})
    output_file: str = field(default="outputs/preds.jsonl", metadata={"help": "With --data_path: one JSON line per record (record, prediction, timing)."})
    max_records: int | None = field(default=None, metadata={"help": "With --data_path: use only the first N records."})
    batch_size: int = field(default=8, metadata={"help": "Records per generate call (left-padded)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest answer in tokens; generation also stops at <|im_end|>."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "With --do_sample: softmax temperature (lower is more conservative)."})
    top_p: float = field(default=0.9, metadata={"help": "With --do_sample: nucleus sampling mass."})
    top_k: int = field(default=50, metadata={"help": "With --do_sample: sample among the k most likely tokens."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Above 1.0 discourages repeating tokens (1.0 = off)."})
    merge: bool = field(default=False, metadata={"help": "Merge the LoRA adapter into its base and save a plain model to --output_dir."})
    output_dir: str | None = field(default=None, metadata={"help": "With --merge: folder for the merged model."})
    overwrite: bool = field(default=False, metadata={"help": "With --merge: replace an existing --output_dir."})

    def __post_init__(self):
        modes = [name for name, on in (("--instruction", self.instruction), ("--data_path", self.data_path), ("--merge", self.merge)) if on]
        if len(modes) != 1:
            raise ValueError(f"Pass exactly one of --instruction, --data_path or --merge True (got {', '.join(modes) or 'none'}).")
        if self.merge and not (self.adapter_path and self.output_dir):
            raise ValueError("--merge True needs --adapter_path (the LoRA adapter) and --output_dir (where the merged model goes).")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"--temperature must be above 0 when sampling, got {self.temperature}; use --do_sample False for greedy.")

    def generation_kwargs(self) -> dict:
        """Keyword arguments for generate: sampling settings only when sampling (greedy ignores them)."""
        options = {"do_sample": self.do_sample}
        if self.do_sample:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty != 1.0:
            options["repetition_penalty"] = self.repetition_penalty
        return options


def parse_inference_args(argv: list[str] | None = None) -> InferenceArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(InferenceArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def load_for_command(args: InferenceArguments):
    """The model the flags ask for: base + adapter, or the base alone when no --adapter_path is given."""
    if args.adapter_path:
        return load_model_with_adapter(args.adapter_path, args.model_path, args.load_in_4bit)
    return load_base_for_inference(args.model_path or "tiny", bool(args.load_in_4bit))


def run_evaluation(args: InferenceArguments, model, tokenizer) -> None:
    """Answer every record of --data_path, write --output_file (JSON lines), print the scores and the speed."""
    from .metrics import format_table, scores_by_task

    records = load_records(args.data_path)[: args.max_records]
    rows = generate_timed(model, tokenizer, records, args.max_new_tokens, args.batch_size, progress=True, **args.generation_kwargs())
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8") as file:
        for record, row in zip(records, rows):
            file.write(json.dumps({**record, **row}, ensure_ascii=False) + "\n")
    seconds = total_seconds(rows)
    new_tokens = sum(row["new_tokens"] for row in rows)
    print(format_table(scores_by_task(records, [row["prediction"] for row in rows])))
    print(f"{len(records)} predictions written to {output}; {new_tokens} new tokens in {seconds:.1f} s ({new_tokens / seconds:.1f} tokens/s at batch {args.batch_size})")


def run_merge(args: InferenceArguments) -> None:
    """Merge the LoRA adapter into its 16-bit base and save a plain model folder (via export.merge_and_export)."""
    from .export import merge_and_export  # refuses prompt-tuning adapters, saying why

    print(merge_and_export(args.adapter_path, args.output_dir, model_path=args.model_path, overwrite=args.overwrite))


def main(argv: list[str] | None = None) -> int:
    """Entry point: one answer (--instruction), an evaluation file (--data_path), or a merge (--merge True)."""
    try:
        args = parse_inference_args(argv)
        if args.merge:
            run_merge(args)
            return 0
        model, tokenizer = load_for_command(args)
        if args.instruction:
            record = {"instruction": args.instruction, "input": args.input, **({"system": args.system} if args.system else {})}
            answer = generate(model, tokenizer, [record], args.max_new_tokens, 1, **args.generation_kwargs())[0]
            print(answer if answer else "(empty answer: the model ended its turn with <|im_end|> at once)")
            return 0
        run_evaluation(args, model, tokenizer)
        return 0
    except (AdapterError, DataValidationError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

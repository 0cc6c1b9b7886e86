"""GGUF for llama.cpp and Ollama, written by llama.cpp's own converter and checked against transformers.

The converter (``convert_hf_to_gguf.py`` with its ``conversion/`` package and ``gguf-py``) is taken from
the source distribution of the pinned llama-cpp-python release, the same llama.cpp that
``llama_cpp.Llama`` runs, so the file is written and read by one version. ``--fetch_converter True``
downloads that source distribution with pip (PyPI only, into the kit's cache) and keeps the converter;
``--llama_cpp_dir`` points at a llama.cpp checkout instead.

Every llama.cpp call (quantising, loading, decoding) runs in a child process (:mod:`qwen_helpers.deploy.llama_child`):
a native crash there becomes a failed step with one line, never a dead command, test run or notebook kernel.

Verification is always on: the GGUF is loaded with llama-cpp-python, the evaluation prompts (in the
thinking mode the adapter was trained in) must tokenise to the kit's ids, and greedy answers from the
kit's ids are compared with the merged transformers model (identical tokens expected for f32, and for f16 but
for near-ties its rounding flips; agreement rate and log-prob gap for quantised types). A prompt whose text holds typed control-token
text (``<|im_end|>`` written in a record) is a known serving difference, counted apart: the kit keeps it
as text, llama.cpp and Ollama turn it into the control token.

    python -m qwen_helpers.export --fetch_converter True
    python -m qwen_helpers.export --adapter_path outputs/lora --output_dir outputs/lora_gguf --format gguf --gguf_type q8_0
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.encoding import build_messages, format_prompt, tokenize_prompt
from ..common.errors import KitError
from ..models.generation import generate_ids, stop_token_ids
from ..common.tiny import cache_root

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # pinned: converter and runtime come from this one release
# llama-cpp-python built portably (no -march=native: see the script) first, then the extra's pure-Python pieces.
INSTALL_EXTRA = "bash scripts/install_llama_cpp.sh && pip install -e '.[gguf]'"
RISKY_KERNELS = ("AVX512 = 1", "AMX_INT8 = 1")  # native builds with these segfaulted decoding q8_0/q4_k_m here
FETCH_CONVERTER = "python -m qwen_helpers.export --fetch_converter True"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")  # what the converter imports, and its licence
CONVERTER_TYPES = ("f32", "f16", "q8_0")  # written directly by the converter
QUANTIZE_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # written by llama.cpp's quantizer from an f32 GGUF
GGUF_TYPES = CONVERTER_TYPES + tuple(QUANTIZE_TYPES)
LLAMA_CHILD = Path(__file__).with_name("llama_child.py")  # every llama.cpp call runs there, in a child process
EXACT_TYPES = ("f32", "f16")  # same weights as transformers (f16: rounded once): greedy tokens must be identical
# f16 rounds every weight once, which can flip a near-tie: where transformers' top two tokens are within TIE_NATS,
# llama.cpp may pick the other. Such a flip (and only such a flip) is allowed for f16, judged position by position on
# transformers' own answer (teacher-forced), so one flip cannot hide a later real difference.
ROUNDED_EXACT_TYPES = ("f16",)
TIE_NATS = 0.02
TOP_LOGPROBS = 8  # transformers' log-probs kept per answer position: a token outside them is no near-tie


class MissingToolError(KitError, RuntimeError):
    """A piece the GGUF export needs is not installed; the message holds the one command that installs it.

    A :class:`~qwen_helpers.common.errors.KitError`: the command boundary prints it as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- the tools


def converter_cache() -> Path:
    """Where ``--fetch_converter`` keeps llama.cpp's converter: the kit's cache, one folder per pinned version."""
    return cache_root() / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def find_converter(llama_cpp_dir: str | None = None) -> Path:
    """The converter script: in ``llama_cpp_dir`` if given, else in the cache; a sentence with the fix if it is missing."""
    folder = Path(llama_cpp_dir) if llama_cpp_dir else converter_cache()
    script = folder / CONVERTER_SCRIPT
    if not script.is_file():
        where = f"--llama_cpp_dir {llama_cpp_dir} has no {CONVERTER_SCRIPT}" if llama_cpp_dir else f"llama.cpp's converter is not in {folder}"
        raise MissingToolError(f"{where}. Fetch the converter of llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} with: {FETCH_CONVERTER}")
    return script


def check_gguf_tools(gguf_type: str, llama_cpp_dir: str | None = None) -> dict:
    """Every piece the export needs, checked before any work: llama-cpp-python at the pinned version, sentencepiece, the converter."""
    try:
        import llama_cpp
    except ImportError as error:
        raise MissingToolError(f"llama-cpp-python is not installed ({error}). Install the kit's gguf extra: {INSTALL_EXTRA}") from error
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise MissingToolError(
            f"llama-cpp-python {llama_cpp.__version__} is installed; the kit is pinned to {LLAMA_CPP_PYTHON_VERSION} "
            f"(its converter and runtime must match). Install it with: {INSTALL_EXTRA}"
        )
    if importlib.util.find_spec("sentencepiece") is None:
        raise MissingToolError(f"llama.cpp's converter imports sentencepiece, which is not installed. Install it with: {INSTALL_EXTRA}")
    if gguf_type in QUANTIZE_TYPES and not hasattr(llama_cpp, "llama_model_quantize"):
        raise MissingToolError(f"--gguf_type {gguf_type} needs llama.cpp's quantizer, and this llama-cpp-python does not expose llama_model_quantize.")
    script = find_converter(llama_cpp_dir)
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    if any(kernel in system_info for kernel in RISKY_KERNELS):
        print(f"notice: this llama-cpp-python was built with native AVX-512/AMX kernels, which crashed decoding quantised "
              f"GGUFs on such CPUs; if verification crashes, reinstall it portably: {INSTALL_EXTRA}", file=sys.stderr)
    return {"llama_cpp_python": llama_cpp.__version__, "converter": str(script), "llama_cpp_system_info": system_info}


def fetch_converter() -> Path:
    """Download llama-cpp-python's pinned source distribution with pip and keep llama.cpp's converter from it (once)."""
    target = converter_cache()
    if (target / CONVERTER_SCRIPT).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".converter-") as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", staging]
        if subprocess.run(command).returncode != 0:
            raise MissingToolError(f"pip could not download llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s source distribution; check the network and retry: {FETCH_CONVERTER}")
        archive = next(Path(staging).glob("llama_cpp_python-*.tar.gz"))
        extracted = Path(staging) / "llama.cpp"
        with tarfile.open(archive) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [member for member in tar.getmembers() if member.name.startswith(prefix)
                       and any(member.name[len(prefix):].startswith(part) for part in CONVERTER_PARTS)]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(extracted, members=members, filter="data")
        (extracted / "FETCHED_FROM.json").write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "archive": archive.name}), encoding="utf-8")
        extracted.rename(target)  # complete or absent: a half-extracted converter is never found
    return target


# ---------------------------------------------------------------------------------------------- conversion


def convert_to_gguf(hf_dir: str, gguf_file: str, gguf_type: str, converter: str) -> Path:
    """Run llama.cpp's converter on a transformers folder; quantise with llama.cpp's quantizer for the k-quant types."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf_type must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    direct = gguf_type if gguf_type in CONVERTER_TYPES else "f32"
    converted = Path(gguf_file) if direct == gguf_type else Path(gguf_file).with_suffix(".f32-intermediate.gguf")
    # Qwen3.5's config counts a multi-token-prediction layer whose weights transformers drops on load, so a merge has
    # none: without --no-mtp the converter writes a block count the weights do not fill and llama.cpp refuses the file.
    no_mtp = ["--no-mtp"] if json.loads((Path(hf_dir) / "config.json").read_text()).get("mtp_num_hidden_layers") else []
    result = subprocess.run([sys.executable, converter, hf_dir, "--outfile", str(converted), "--outtype", direct, *no_mtp],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {hf_dir} (exit {result.returncode}):\n{result.stderr[-3000:]}")
    if converted != Path(gguf_file):
        quantize_gguf(str(converted), gguf_file, gguf_type)
        converted.unlink()
    return Path(gguf_file)


def quantize_gguf(source: str, target: str, gguf_type: str) -> None:
    """Quantise a GGUF with llama.cpp's own quantizer (``llama_model_quantize``, as the llama-quantize tool), in a child process."""
    answer = run_llama("quantize", f"quantising {Path(source).name} to {gguf_type}", source=source, target=target,
                       ftype=QUANTIZE_TYPES[gguf_type], threads=max(1, torch.get_num_threads()))
    if answer["status"] != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed to write {target} as {gguf_type} (status {answer['status']}).")


# ---------------------------------------------------------------------------------------------- llama.cpp, out of process


class LlamaCrashError(RuntimeError):
    """llama.cpp died in its child process (a native crash, or killed); the caller's process is unharmed."""

    def __init__(self, doing: str, returncode: int, stderr: str = ""):
        self.doing, self.returncode = doing, returncode
        if returncode < 0:
            try:
                how = f"signal {-returncode}, {signal.Signals(-returncode).name}"
            except ValueError:
                how = f"signal {-returncode}"
        else:
            how = f"exit code {returncode}"
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        super().__init__(f"llama.cpp crashed ({how}) while {doing}" + (f": {last}" if last and returncode > 0 else ""))


def run_llama(operation: str, doing: str, **arguments) -> dict:
    """Run one llama.cpp operation of :mod:`qwen_helpers.deploy.llama_child` in a child process and return its JSON answer.

    A segfault, an abort or a kill there raises :class:`LlamaCrashError` here, naming ``doing``; nothing of
    llama.cpp is ever loaded into this process, so a command, a test run or a notebook kernel survives it.
    """
    with tempfile.TemporaryDirectory(prefix="qwen-helpers-llama-") as folder:
        request, answer = Path(folder) / "request.json", Path(folder) / "answer.json"
        request.write_text(json.dumps({"operation": operation, "arguments": arguments}), encoding="utf-8")
        done = subprocess.run([sys.executable, str(LLAMA_CHILD), str(request), str(answer)], capture_output=True, text=True)
        if done.returncode != 0 or not answer.is_file():
            raise LlamaCrashError(doing, done.returncode, done.stderr)
        return json.loads(answer.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- verification


@dataclass
class PromptComparison:
    """One prompt: both tokenisations agree?, both greedy answers, and the teacher-forced agreement on transformers' answer."""

    prompt_tokens: int  # the kit's ids, as training and generation tokenise the prompt
    gguf_prompt_tokens: int  # llama.cpp's tokenisation of the same prompt text
    same_prompt_ids: bool
    serving_difference: bool  # llama.cpp's ids differ from the kit's only as transformers' whole-text tokenisation does
    typed_control_tokens: list[str]  # control-token text typed in the record (text to the kit, a token to llama.cpp)
    transformers_answer: list[int]
    gguf_answer: list[int]
    first_divergence: int | None  # index of the first differing new token, None if identical
    agreement: float  # share of transformers' answer tokens that are also llama.cpp's argmax, fed the same prefix
    mean_logprob_gap: float  # mean |log p_transformers - log p_llama.cpp| of transformers' answer tokens
    near_ties: int = 0  # positions where llama.cpp's argmax is transformers' runner-up within TIE_NATS
    mismatches: int = 0  # positions where llama.cpp's argmax differs otherwise: a real difference


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@torch.no_grad()
def answer_logprobs(model, prompt_ids: list[int], answer: list[int]) -> np.ndarray:
    """transformers' log-probs at the positions that predict each answer token (rows: answer tokens, columns: vocabulary)."""
    ids = torch.tensor([prompt_ids + answer], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float().cpu().numpy()
    return log_softmax(logits)


def typed_control_tokens(tokenizer, record: dict) -> list[str]:
    """Control-token text written inside the record's messages (e.g. a literal ``<|im_end|>``)."""
    text = "".join(message["content"] for message in build_messages(record, with_response=False))
    control = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return sorted(token for token in control if token.startswith("<|") and token in text)


def transformers_side(model, tokenizer, record: dict, max_new_tokens: int, enable_thinking: bool = False) -> dict:
    """One prompt as transformers sees it: its text, the kit's ids, the ids a server would make of the same text,
    the greedy answer from the kit's ids and the log-prob of each answer token.

    The kit's ids are the reference (message contents tokenised with control-token text kept as text);
    llama.cpp parses control-token text in the prompt, as Ollama does. Ids that differ only as transformers'
    own whole-text tokenisation differs are a serving difference, not a fault of the GGUF.
    """
    text = format_prompt(tokenizer, record, enable_thinking)
    prompt_ids = tokenize_prompt(tokenizer, record, enable_thinking)
    reference = generate_ids(model, tokenizer, [record], max_new_tokens, enable_thinking)[0]
    logprobs = answer_logprobs(model, prompt_ids, reference).astype(np.float64)
    top = np.argpartition(-logprobs, TOP_LOGPROBS, axis=-1)[:, :TOP_LOGPROBS] if len(reference) else np.zeros((0, 0), int)
    return {"text": text, "prompt_ids": prompt_ids, "reference": reference,
            "top_logprobs": [{int(token): float(logprobs[row, token]) for token in top[row]} for row in range(len(reference))],
            "served_ids": tokenizer(text, add_special_tokens=False)["input_ids"],  # control-token text parsed
            "typed_control_tokens": typed_control_tokens(tokenizer, record),
            "reference_logprobs": [float(logprobs[row, token]) for row, token in enumerate(reference)]}


def near_ties_and_mismatches(hf: dict, gguf: dict) -> tuple[int, int]:
    """Where llama.cpp's argmax on transformers' answer (teacher-forced) differs: near-ties (transformers' own top two
    within TIE_NATS) and the rest, real differences."""
    ties = mismatches = 0
    for ours, token, theirs in zip(hf["top_logprobs"], hf["reference"], gguf["argmax"], strict=True):
        if token == theirs:
            continue
        if theirs in ours and ours[token] - ours[theirs] <= TIE_NATS:
            ties += 1
        else:
            mismatches += 1
    return ties, mismatches


def compare_prompt(hf: dict, gguf: dict) -> PromptComparison:
    """transformers' and llama.cpp's view of one prompt, side by side."""
    reference, gguf_answer = hf["reference"], gguf["gguf_answer"]
    ties, mismatches = near_ties_and_mismatches(hf, gguf)
    divergence = next((index for index, (a, b) in enumerate(zip(reference, gguf_answer)) if a != b), None)
    if divergence is None and len(reference) != len(gguf_answer):
        divergence = min(len(reference), len(gguf_answer))
    return PromptComparison(
        prompt_tokens=len(hf["prompt_ids"]),
        gguf_prompt_tokens=len(gguf["gguf_ids"]),
        same_prompt_ids=gguf["gguf_ids"] == hf["prompt_ids"],
        serving_difference=gguf["gguf_ids"] != hf["prompt_ids"] and gguf["gguf_ids"] == hf["served_ids"],
        typed_control_tokens=hf["typed_control_tokens"],
        transformers_answer=reference,
        gguf_answer=gguf_answer,
        first_divergence=divergence,
        agreement=float(np.mean(np.array(gguf["argmax"]) == np.array(reference))) if reference else 1.0,
        mean_logprob_gap=float(np.mean(np.abs(np.array(hf["reference_logprobs"]) - np.array(gguf["reference_logprobs"]))))
        if reference else 0.0,
        near_ties=ties,
        mismatches=mismatches,
    )


def verdict(rows: list[PromptComparison], gguf_type: str) -> bool:
    """Passed: every prompt tokenises as the kit does (or differs only as a known serving difference), and for an
    exact type the greedy answers are identical; f16 may differ only by near-ties its rounding flips."""
    if any(not row.same_prompt_ids and not row.serving_difference for row in rows):
        return False
    if gguf_type not in EXACT_TYPES or all(row.first_divergence is None for row in rows):
        return True
    return gguf_type in ROUNDED_EXACT_TYPES and all(row.mismatches == 0 for row in rows)


def verify_gguf(gguf_file: str, hf_dir: str, records: list[dict], gguf_type: str, max_new_tokens: int = 16,
                enable_thinking: bool = False) -> dict:
    """Compare the GGUF with the merged transformers model (fp32, on the CPU) on ``records``; export_report.json's part.

    ``enable_thinking``: the mode the adapter was trained in, so the prompts are the ones the model will be asked.
    transformers runs here; llama.cpp runs in a child process (:func:`run_llama`), so a llama.cpp crash raises
    :class:`LlamaCrashError` instead of ending this process.
    """
    from ..models.loading import load_base_model, load_tokenizer, release_memory

    tokenizer = load_tokenizer(hf_dir)
    model = load_base_model(hf_dir, torch.float32).to("cpu").eval()
    sides = [transformers_side(model, tokenizer, record, max_new_tokens, enable_thinking) for record in records]
    del model
    release_memory()
    longest = max(len(side["prompt_ids"]) for side in sides)
    gguf = run_llama("verify", f"verifying {Path(gguf_file).name}", gguf_file=str(gguf_file),
                     context_tokens=longest + max_new_tokens + 8, threads=max(1, torch.get_num_threads()),
                     prompts=[{key: side[key] for key in ("text", "prompt_ids", "reference")} for side in sides],
                     stops=stop_token_ids(tokenizer), max_new_tokens=max_new_tokens)
    rows = [compare_prompt(side, row) for side, row in zip(sides, gguf["rows"], strict=True)]
    identical = all(row.first_divergence is None for row in rows)
    report = {
        "gguf_file": str(gguf_file),
        "gguf_type": gguf_type,
        "prompts": len(rows),
        "enable_thinking": enable_thinking,
        "identical_tokenisation": all(row.same_prompt_ids for row in rows),
        "serving_differences": sum(row.serving_difference for row in rows),  # known (typed control tokens), not faults
        "tokenisation_faults": sum(not row.same_prompt_ids and not row.serving_difference for row in rows),
        "identical_greedy_answers": identical,
        "greedy_answers_identical_count": sum(row.first_divergence is None for row in rows),
        "agreement_rate": float(np.mean([row.agreement for row in rows])),
        "mean_logprob_gap": float(np.mean([row.mean_logprob_gap for row in rows])),
        "near_ties": sum(row.near_ties for row in rows),
        "mismatches": sum(row.mismatches for row in rows),
        "exact_type": gguf_type in EXACT_TYPES,
        "kv_cache": "f32",  # llama.cpp's default f16 cache is left out of the comparison
        "per_prompt": [
            {**row.__dict__, "transformers_text": tokenizer.decode(row.transformers_answer), "gguf_text": tokenizer.decode(row.gguf_answer)}
            for row in rows
        ],
    }
    report["passed"] = verdict(rows, gguf_type)
    return report


def tokenisation_lines(report: dict) -> list[str]:
    """The tokenisation verdict: identical prompts, known serving differences (typed control tokens), genuine faults."""
    same = report["prompts"] - report["serving_differences"] - report["tokenisation_faults"]
    lines = [f"tokenisation: identical ids on {same}/{report['prompts']} prompts (llama.cpp vs the kit's prompt ids)"]
    rows = [row for row in report["per_prompt"] if row["serving_difference"]]
    typed = sorted({token for row in rows for token in row["typed_control_tokens"]})
    if rows:
        why = (f"hold typed control-token text ({', '.join(typed)}): the kit keeps it as text, llama.cpp and Ollama "
               "turn it into control tokens" if typed
               else "tokenise apart from the template in the kit, and as one text in llama.cpp (and in transformers)")
        lines.append(f"  {len(rows)} prompt(s) {why}. A known serving difference, not a fault of the GGUF; "
                     "answers are compared from the kit's ids")
    if report["tokenisation_faults"]:
        lines.append(f"  {report['tokenisation_faults']} prompt(s) tokenise DIFFERENTLY in llama.cpp and transformers: "
                     "the GGUF's tokenizer is wrong")
    return lines


def verification_summary(report: dict) -> str:
    """A few lines for the terminal: tokenisation, greedy answers, agreement and log-prob gap."""
    mode = "thinking" if report.get("enable_thinking") else "non-thinking"
    lines = [
        *tokenisation_lines(report),
        f"greedy answers ({mode} mode): {report['greedy_answers_identical_count']}/{report['prompts']} identical"
        + ("" if report["exact_type"] else f" (expected to differ a little for {report['gguf_type']})"),
        f"agreement on transformers' answer tokens: {report['agreement_rate']:.1%}; mean |log-prob gap|: {report['mean_logprob_gap']:.4f}",
    ]
    if report["exact_type"] and report.get("near_ties"):
        lines.append(f"  {report['near_ties']} answer token(s) differ on a near-tie (transformers' top two within {TIE_NATS} nats), "
                     f"which {report['gguf_type']}'s rounding can flip; {report.get('mismatches', 0)} other difference(s)")
    for index, row in enumerate(report["per_prompt"]):
        if row["first_divergence"] is not None and report["exact_type"]:
            position = row["first_divergence"]
            lines.append(f"  prompt {index}: first divergence at new token {position}: transformers {row['transformers_answer'][position:position + 1]} "
                         f"vs llama.cpp {row['gguf_answer'][position:position + 1]}")
    return "\n".join(lines)

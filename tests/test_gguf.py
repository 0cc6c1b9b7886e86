"""GGUF export of the tiny LoRA: llama.cpp's own converter, then llama-cpp-python must tokenise and answer as transformers does.

The end-to-end tests need the gguf extra (``bash scripts/install_llama_cpp.sh && pip install -e '.[gguf]'``,
llama-cpp-python built without native CPU flags) and the fetched converter; ``.ci/run`` installs both. Without them they are skipped with the reason; the
tests of what happens when a piece is missing always run.
"""

import copy
import importlib.util
import json
import sys
import types

import pytest

from qwen_helpers import export

from qwen_helpers.deploy import gguf as gguf_export
from qwen_helpers.deploy.gguf import FETCH_CONVERTER, INSTALL_EXTRA, LLAMA_CPP_PYTHON_VERSION, MissingToolError, check_gguf_tools

LLAMA_CPP_MISSING = importlib.util.find_spec("llama_cpp") is None
needs_llama_cpp = pytest.mark.skipif(LLAMA_CPP_MISSING, reason=f"llama-cpp-python is not installed: {INSTALL_EXTRA} (CI's .ci/run installs it)")


@pytest.fixture(scope="module")
def base_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path)


@pytest.fixture(scope="module")
def lora_adapter(base_model, tmp_path_factory):
    """A LoRA on every projection with random A and B (peft's init_lora_weights=False), so merging changes the weights."""
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("gguf") / "lora"
    config = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(base_model), config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def converter():
    if LLAMA_CPP_MISSING:
        pytest.skip(f"llama-cpp-python is not installed: {INSTALL_EXTRA}")
    try:
        return str(gguf_export.find_converter())
    except MissingToolError:
        pytest.skip(f"llama.cpp's converter is not fetched: {FETCH_CONVERTER} (CI's .ci/run fetches it)")


def exported(adapter: str, output_dir, gguf_type: str) -> dict:
    code = export.main(["--adapter_path", adapter, "--output_dir", str(output_dir), "--format", "gguf", "--gguf_type", gguf_type,
                        "--verify_prompts", "3", "--verify_max_new_tokens", "12"])
    report = json.loads((output_dir / "export_report.json").read_text(encoding="utf-8"))
    return {"code": code, **report}


# ------------------------------------------------------------------------------ end to end (needs the extra)


@needs_llama_cpp
def test_f32_gguf_tokenises_and_answers_exactly_like_transformers(lora_adapter, converter, tmp_path):
    report = exported(lora_adapter, tmp_path / "f32", "f32")
    verification = report["verification"]
    assert report["code"] == 0 and verification["passed"]
    assert report["tools"]["llama_cpp_python"] == LLAMA_CPP_PYTHON_VERSION
    assert (tmp_path / "f32" / "model-f32.gguf").is_file() and (tmp_path / "f32" / "model.safetensors").is_file()
    assert verification["identical_tokenisation"] and verification["prompts"] == 3
    for row in verification["per_prompt"]:
        assert row["gguf_answer"] == row["transformers_answer"] and len(row["transformers_answer"]) > 0
    assert verification["agreement_rate"] == 1.0
    assert verification["mean_logprob_gap"] < 1e-4  # same fp32 weights, f32 KV cache: only summation order differs
    modelfile = (tmp_path / "f32" / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith("#") and "FROM ./model-f32.gguf" in modelfile


@needs_llama_cpp
def test_q8_0_gguf_reports_its_agreement(lora_adapter, converter, tmp_path):
    report = exported(lora_adapter, tmp_path / "q8", "q8_0")
    verification = report["verification"]
    assert report["code"] == 0 and verification["identical_tokenisation"]
    assert 0.0 <= verification["agreement_rate"] <= 1.0 and verification["mean_logprob_gap"] > 0.0  # 8-bit weights: not bit-identical
    assert len(verification["per_prompt"]) == 3
    assert (tmp_path / "q8" / "model-q8_0.gguf").stat().st_size < (tmp_path / "q8" / "model.safetensors").stat().st_size / 2


@needs_llama_cpp
def test_q4_k_m_gguf_is_quantised_by_llama_cpp_and_verified(lora_adapter, converter, tmp_path):
    report = exported(lora_adapter, tmp_path / "q4", "q4_k_m")
    verification = report["verification"]
    assert report["code"] == 0 and verification["identical_tokenisation"] and verification["prompts"] == 3
    assert 0.0 <= verification["agreement_rate"] <= 1.0 and verification["mean_logprob_gap"] > 0.0
    assert sorted(path.name for path in (tmp_path / "q4").glob("*.gguf")) == ["model-q4_k_m.gguf"]  # no f32 intermediate left


# ------------------------------------------------------------------------------ llama.cpp crashes in its child process

CRASH_IN_CHILD = """
import ctypes
import llama_cpp

def crash(*args, **kwargs):
    ctypes.string_at(0)  # a real segfault inside the process that runs llama.cpp

llama_cpp.{target} = crash
"""


def crashing_llama(tmp_path, monkeypatch, target: str) -> None:
    """Every child process started from now on segfaults when it calls llama_cpp.{target} (a sitecustomize on its path)."""
    folder = tmp_path / "crash_site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(CRASH_IN_CHILD.format(target=target), encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(folder))  # llama_child.py imports nothing of the kit


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type, target, doing", [("q8_0", "Llama.eval", "verifying model-q8_0.gguf"),
                                                      ("q4_k_m", "llama_model_quantize", "quantising")])
def test_a_llama_cpp_crash_fails_the_export_in_one_line_and_this_process_survives(lora_adapter, converter, tmp_path,
                                                                                    monkeypatch, capsys, gguf_type, target, doing):
    crashing_llama(tmp_path, monkeypatch, target)
    output_dir = tmp_path / "out"
    code = export.main(["--adapter_path", lora_adapter, "--output_dir", str(output_dir), "--format", "gguf",
                        "--gguf_type", gguf_type, "--verify_prompts", "2", "--verify_max_new_tokens", "4"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1
    assert f"llama.cpp crashed (signal 11, SIGSEGV) while {doing}" in errors[0] and "no Modelfile written" in errors[0]
    report = json.loads((output_dir / "export_report.json").read_text(encoding="utf-8"))
    assert report["verification"]["passed"] is False and "SIGSEGV" in report["verification"]["crashed"]
    assert (output_dir / "model.safetensors").is_file() and not (output_dir / "Modelfile").exists()
    assert (output_dir / f"model-{gguf_type}.gguf").is_file() == (gguf_type == "q8_0")  # quantising never finished
    assert not list(tmp_path.glob(".out.staging-*")), "the export folder is complete or absent, never half-written"


def test_an_interrupted_export_leaves_no_folder(lora_adapter, tmp_path, monkeypatch):
    from qwen_helpers.deploy import merge

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "export_notes", interrupted)  # after the merged weights are saved, before the report
    with pytest.raises(KeyboardInterrupt):
        export.run_export(export.ExportArguments(adapter_path=lora_adapter, output_dir=str(tmp_path / "hf"), format="hf"))
    assert sorted(path.name for path in tmp_path.iterdir()) == [], "neither the folder nor its staging copy may stay"


# ------------------------------------------------------------------------------ missing pieces (always run)


def test_missing_llama_cpp_stops_before_any_work_with_the_install_command(lora_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(MissingToolError, match=r"pip install -e '\.\[gguf\]'"):
        check_gguf_tools("q8_0")
    output_dir = tmp_path / "never"
    assert export.main(["--adapter_path", lora_adapter, "--output_dir", str(output_dir), "--format", "gguf"]) == 2
    assert INSTALL_EXTRA in capsys.readouterr().err
    assert not output_dir.exists(), "nothing may be written before every tool is found"


def test_wrong_llama_cpp_version_or_missing_converter_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.1"))
    with pytest.raises(MissingToolError, match=f"pinned to {LLAMA_CPP_PYTHON_VERSION}"):
        check_gguf_tools("f32")
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__=LLAMA_CPP_PYTHON_VERSION))
    if importlib.util.find_spec("sentencepiece") is not None:
        with pytest.raises(MissingToolError, match=r"--fetch_converter True"):
            check_gguf_tools("f32", llama_cpp_dir=str(tmp_path))
        with pytest.raises(MissingToolError, match="llama_model_quantize"):
            check_gguf_tools("q4_k_m", llama_cpp_dir=str(tmp_path))


def test_export_refuses_prompt_tuning_and_a_full_folder(base_model, lora_adapter, tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    prompt = tmp_path / "prompt"
    get_peft_model(copy.deepcopy(base_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt)
    assert export.main(["--adapter_path", str(prompt), "--output_dir", str(tmp_path / "out")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine", encoding="utf-8")
    assert export.main(["--adapter_path", lora_adapter, "--output_dir", str(occupied)]) == 2
    assert "--overwrite_output_dir True" in capsys.readouterr().err
    assert [path.name for path in occupied.iterdir()] == ["notes.txt"]


def test_hf_export_writes_the_merged_folder_and_its_report(lora_adapter, tmp_path):
    output_dir = tmp_path / "hf"
    assert export.main(["--adapter_path", lora_adapter, "--output_dir", str(output_dir), "--format", "hf"]) == 0
    report = json.loads((output_dir / "export_report.json").read_text(encoding="utf-8"))
    assert report["format"] == "hf" and report["merge"]["max_abs_diff_vs_16bit_adapter"] < 1e-3
    assert (output_dir / "model.safetensors").is_file() and not (output_dir / "adapter_config.json").exists()
    assert not list(output_dir.glob("*.gguf"))
    assert report["merge"]["output_dir"] == str(output_dir) and "staging" not in json.dumps(report["merge"])
    assert any(f"from_pretrained({str(output_dir)!r})" in note for note in report["merge"]["notes"])


@needs_llama_cpp
def test_qwen3_f32_gguf_answers_exactly_like_transformers(converter, tmp_path):
    """The tiny Qwen3 (q/k norms, explicit head_dim) goes through the same converter and verification."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_helpers.common.tiny import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen3"))
    config = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "lora")
    report = exported(str(tmp_path / "lora"), tmp_path / "out", "f32")
    assert report["code"] == 0 and report["verification"]["identical_tokenisation"] and report["verification"]["identical_greedy_answers"]


def test_typed_control_tokens_are_reported_apart_from_tokenisation_faults():
    """The verdict lines: a serving difference names the typed tokens; a genuine difference is called a fault."""
    from qwen_helpers.deploy.gguf import tokenisation_lines

    rows = [{"serving_difference": True, "typed_control_tokens": ["<|im_end|>"]},
            {"serving_difference": False, "typed_control_tokens": []}]
    known = tokenisation_lines({"prompts": 2, "serving_differences": 1, "tokenisation_faults": 0, "per_prompt": rows})
    assert known[0].startswith("tokenisation: identical ids on 1/2") and "(<|im_end|>)" in known[1]
    assert not any("DIFFERENTLY" in line for line in known)
    fault = tokenisation_lines({"prompts": 2, "serving_differences": 0, "tokenisation_faults": 1,
                                "per_prompt": [rows[1]] * 2})
    assert "identical ids on 1/2" in fault[0] and "DIFFERENTLY" in fault[1] and len(fault) == 2


@needs_llama_cpp
@pytest.mark.parametrize("like, expert_parameters", [("tiny-qwen3.5", None), ("tiny-qwen3.5-moe", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])])
def test_qwen3_5_f32_gguf_answers_exactly_like_transformers(converter, tmp_path, like, expert_parameters):
    """Qwen3.5 (hybrid Gated DeltaNet, 248k vocabulary, an MTP layer in the config) and its MoE, LoRA on every linear
    layer and, for the MoE, on the routed experts: llama.cpp's qwen35/qwen35moe converter and the same verification."""
    from peft import LoraConfig, get_peft_model

    from qwen_helpers.models.loading import load_base_model

    config = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear", target_parameters=expert_parameters,
                        init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(load_base_model(like), config).save_pretrained(tmp_path / "lora")
    report = exported(str(tmp_path / "lora"), tmp_path / "out", "f32")
    assert report["code"] == 0 and report["verification"]["identical_tokenisation"] and report["verification"]["identical_greedy_answers"]

"""DPO and GRPO adapters travel like SFT adapters: plain peft loads them (the kit's loader gives the same logits),
``export --format hf`` merges them with its logits check, ``--format gguf`` converts and verifies them with llama.cpp,
and ``--check vllm`` passes. One 2-step adapter per method, trained once for the module."""

import json

import pytest
import torch

from conftest import DATA
from qwen_helpers import export

COMMON = ["--model_path", "tiny", "--max_steps", "2", "--learning_rate", "1e-3", "--warmup_steps", "0", "--seed", "0",
          "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]  # fmt: skip


@pytest.fixture(scope="module")
def dpo_adapter(tmp_path_factory) -> str:
    from qwen_helpers import train_dpo

    output_dir = tmp_path_factory.mktemp("dpo") / "adapter"
    flags = [*COMMON, "--data_path", str(DATA / "preference.json"), "--per_device_train_batch_size", "2"]
    assert train_dpo.main([*flags, "--output_dir", str(output_dir)]) == 0
    return str(output_dir)


@pytest.fixture(scope="module")
def grpo_adapter(tmp_path_factory) -> str:
    from qwen_helpers import train_grpo

    output_dir = tmp_path_factory.mktemp("grpo") / "adapter"
    flags = [*COMMON, "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4"]  # fmt: skip
    assert train_grpo.main([*flags, "--output_dir", str(output_dir)]) == 0
    return str(output_dir)


@pytest.fixture(params=["dpo_adapter", "grpo_adapter"])
def adapter(request) -> str:
    return request.getfixturevalue(request.param)


IDS = torch.tensor([[151644, 872, 198, 9707, 11, 1879, 151645, 198, 151644, 77091, 198]])  # a user turn, then the answer's start


def test_plain_peft_loads_it_with_the_kit_loaders_logits(adapter, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_helpers.models.adapters import load_model_with_adapter

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_path)
        base_logits = base(IDS).logits
        plain_logits = PeftModel.from_pretrained(base, adapter).eval()(IDS).logits
        kit_model, _ = load_model_with_adapter(adapter)
        kit_logits = kit_model(IDS).logits
    assert json.loads((open(f"{adapter}/run_config.json", encoding="utf-8")).read())["method"] in ("dpo", "grpo")
    assert (plain_logits - base_logits).abs().max() > 1e-4  # two steps at 1e-3 moved the adapter off the identity
    torch.testing.assert_close(kit_logits, plain_logits, atol=1e-5, rtol=0)


def test_export_hf_merges_with_its_logits_check(adapter, tmp_path):
    from transformers import AutoModelForCausalLM

    from qwen_helpers.models.adapters import load_model_with_adapter

    merged_dir = tmp_path / "merged"
    assert export.main(["--adapter_path", adapter, "--output_dir", str(merged_dir), "--format", "hf"]) == 0
    report = json.loads((merged_dir / "export_report.json").read_text(encoding="utf-8"))
    assert report["merge"]["max_abs_diff_vs_16bit_adapter"] < 1e-4  # the command's own check, on its prompts
    tuned, _ = load_model_with_adapter(adapter)
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged_dir)(IDS).logits, tuned(IDS).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed (gguf extra)"
)
def test_export_gguf_q8_0_is_verified_by_llama_cpp(adapter, tmp_path):
    from qwen_helpers.deploy import gguf as gguf_export

    try:
        gguf_export.find_converter()
    except gguf_export.MissingToolError:
        pytest.skip(f"llama.cpp's converter is not fetched: {gguf_export.FETCH_CONVERTER}")
    output_dir = tmp_path / "q8"
    code = export.main(["--adapter_path", adapter, "--output_dir", str(output_dir), "--format", "gguf",
                        "--gguf_type", "q8_0", "--verify_prompts", "2", "--verify_max_new_tokens", "6"])  # fmt: skip
    verification = json.loads((output_dir / "export_report.json").read_text(encoding="utf-8"))["verification"]
    assert code == 0 and verification["passed"] and verification["identical_tokenisation"]
    assert verification["prompts"] == 2 and (output_dir / "model-q8_0.gguf").is_file()
    assert "FROM ./model-q8_0.gguf" in (output_dir / "Modelfile").read_text(encoding="utf-8")


def test_vllm_check_passes(adapter, capsys):
    from qwen_helpers.deploy.serving import check_vllm_adapter

    result = check_vllm_adapter(adapter)
    assert result.passed, result.problems
    assert export.main(["--check", "vllm", "--adapter_path", adapter]) == 0
    assert "--enable-lora" in capsys.readouterr().out  # the serve command is printed for an adapter vLLM would load

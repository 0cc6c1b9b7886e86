"""train_dpo and train_grpo on the checkpoint replicas: Qwen3 (thinking mode off and on) and Qwen2.5 base (chat-token
rows trained, as SFT trains them there), and continuing a base checkpoint's SFT adapter that trained those rows.

Two steps per run: the tests check that the runs go through, what the adapters hold, which tokens DPO trains (SFT's
rule: each answer and its ``<|im_end|>``), and that the reference is the start (rewards and KL 0 before the first
update). Marked ``replica`` (about 5 minutes on a busy 2-core CPU); ``-m "not replica"`` skips them.
"""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import DATA
from qwen_helpers.data.encoding import IGNORE_INDEX, tokenize_example
from qwen_helpers.data.preference import load_preference_records

pytestmark = pytest.mark.replica
TOKEN_ROWS = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
FAST = ["--max_steps", "2", "--warmup_steps", "0", "--seed", "0", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "True"]  # fmt: skip
DPO = [*FAST, "--data_path", str(DATA / "preference.json"), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]
GRPO = [*FAST, "--data_path", str(DATA / "grpo_toy.json"), "--per_device_train_batch_size", "4", "--num_generations", "4",
        "--max_completion_length", "4", "--learning_rate", "1e-3"]  # fmt: skip


def token_rows(adapter) -> torch.Tensor | None:
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as weights:
        return weights.get_tensor(TOKEN_ROWS) if TOKEN_ROWS in weights.keys() else None


def history(adapter) -> list[dict]:
    return json.loads((adapter / "loss_history.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base_sft_adapter(tmp_path_factory):
    """A 2-step SFT adapter on the Qwen2.5 base replica: LoRA plus the trained <|im_start|>/<|im_end|> rows."""
    from qwen_helpers import train_lora

    folder = tmp_path_factory.mktemp("sft")
    data = folder / "chat.json"
    data.write_text(json.dumps(json.loads((DATA / "multiturn.json").read_text(encoding="utf-8"))[:4], ensure_ascii=False),
                    encoding="utf-8")  # fmt: skip
    flags = ["--model_path", "tiny-qwen2.5-base", "--data_path", str(data), "--max_length", "256",
             "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", *FAST]  # fmt: skip
    assert train_lora.main([*flags, "--output_dir", str(folder / "adapter")]) == 0
    assert token_rows(folder / "adapter") is not None
    return folder / "adapter"


@pytest.mark.parametrize("model_path, enable_thinking", [("tiny-qwen3", False), ("tiny-qwen3", True),
                                                          ("tiny-qwen2.5-base", False)])  # fmt: skip
def test_dpo_runs_and_trains_the_sft_spans(model_path, enable_thinking, tmp_path):
    from qwen_helpers.training.dpo import publish, train_dpo
    from qwen_helpers.train_dpo import parse_dpo_args

    output = tmp_path / "dpo"
    flags = ["--model_path", model_path, *DPO, "--enable_thinking", str(enable_thinking), "--output_dir", str(output)]
    result = train_dpo(*parse_dpo_args(flags))
    publish(result)
    pairs = load_preference_records(DATA / "preference.json")
    for pair, row in list(zip(pairs, result.trainer.train_dataset))[:4]:
        for key in ("chosen", "rejected"):  # what TRL scores (its completion mask covers these ids) is what SFT trains
            sft = tokenize_example(result.tokenizer, pair[key], enable_thinking=enable_thinking)
            assert row[f"{key}_ids"] == [token for token, label in zip(sft["input_ids"], sft["labels"]) if label != IGNORE_INDEX]
        if model_path == "tiny-qwen3":  # non-thinking: the empty think block is prompt; thinking: the model writes it
            prompt = result.tokenizer.decode(row["prompt_ids"])
            assert prompt.endswith("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
    assert (output / "adapter_model.safetensors").is_file() and not (output / "ref").exists()
    assert (token_rows(output) is not None) == (model_path == "tiny-qwen2.5-base")  # chat-token rows on a base only
    assert [record["step"] for record in history(output) if "loss" in record] == [1, 2]
    assert json.loads((output / "run_config.json").read_text(encoding="utf-8"))["enable_thinking"] == enable_thinking


@pytest.mark.parametrize("model_path, enable_thinking, reward", [("tiny-qwen3", False, "language"),
                                                                  ("tiny-qwen3", True, "think_format,language"),
                                                                  ("tiny-qwen2.5-base", False, "language")])  # fmt: skip
def test_grpo_runs_and_saves(model_path, enable_thinking, reward, tmp_path):
    from qwen_helpers.training.grpo import train_grpo
    from qwen_helpers.training.dpo import publish
    from qwen_helpers.train_grpo import parse_grpo_args

    output = tmp_path / "grpo"
    flags = ["--model_path", model_path, *GRPO, "--reward", reward, "--enable_thinking", str(enable_thinking),
             "--output_dir", str(output)]  # fmt: skip
    result = train_grpo(*parse_grpo_args(flags))
    publish(result)
    prompt = result.trainer.train_dataset[0]["prompt"]
    if model_path == "tiny-qwen3":
        assert prompt.endswith("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
    logs = [record for record in history(output) if "reward" in record]
    assert len(logs) == 2 and all(f"rewards/{name}/mean" in logs[-1] for name in ("language_match",))
    assert (output / "adapter_model.safetensors").is_file() and not (output / "ref").exists()
    rows = token_rows(output)
    assert (rows is not None) == (model_path == "tiny-qwen2.5-base")
    if rows is not None:  # the rows learned through TRL's fused LM head (peft initialises them to the base's rows)
        start = result.model.get_base_model().model.embed_tokens.token_adapter.base_layer.weight[[151644, 151645]]
        assert (rows - start.detach()).abs().max() > 0


def test_dpo_continues_a_base_sft_adapter_with_its_chat_token_rows(base_sft_adapter, tmp_path):
    """The bug: TRL 1.16's fused LM head read ``lm_head.bias`` from peft's TrainableTokensWrapper (AttributeError), and
    its "ref" copy skipped the token rows (the reference scored <|im_start|>/<|im_end|> with the base's rows)."""
    from qwen_helpers import train_dpo

    output = tmp_path / "dpo"
    flags = ["--model_path", "tiny-qwen2.5-base", *DPO, "--adapter_path", str(base_sft_adapter), "--output_dir", str(output)]
    assert train_dpo.main(flags) == 0
    first = history(output)[0]  # logged before any update: the policy is its reference, rows included
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    sft_rows, dpo_rows = token_rows(base_sft_adapter), token_rows(output)
    assert dpo_rows is not None and (dpo_rows - sft_rows).abs().max() > 0  # continued and trained, not dropped
    config = json.loads((output / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["trainable_token_indices"] == [151644, 151645]


def test_grpo_continues_a_base_sft_adapter_with_its_chat_token_rows(base_sft_adapter, tmp_path):
    from qwen_helpers import train_grpo

    output = tmp_path / "grpo"
    flags = ["--model_path", "tiny-qwen2.5-base", *GRPO, "--reward", "language", "--beta", "0.04", "--disable_dropout", "True",
             "--adapter_path", str(base_sft_adapter), "--output_dir", str(output)]  # fmt: skip
    assert train_grpo.main(flags) == 0
    logs = [record for record in history(output) if "kl" in record]
    # the reference is the SFT adapter, its token rows included (LoRA dropout off: GRPOConfig keeps it on by default)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert (token_rows(output) - token_rows(base_sft_adapter)).abs().max() > 0

"""Prompt tuning: TEXT init as peft builds it, the soft prompt really used at generation, save/reload, and the command end to end."""

import json

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from qwen_helpers import train_prompt_tuning
from qwen_helpers.run.config import PromptTuningArguments
from qwen_helpers.data.encoding import format_prompt
from qwen_helpers.data.records import load_records
from qwen_helpers.models.generation import generate_new_tokens
from qwen_helpers.models.loading import load_base_model
from qwen_helpers.run.methods import build_prompt_tuning_config
from qwen_helpers.training.sft import describe_text_init

from conftest import DATA

RECORDS = [
    {"instruction": "判断以下商品评论的情感倾向，只回答：正面、负面或中性。", "input": "很好用"},
    {"instruction": "Translate into Chinese", "input": "Hello world, how are you today?"},  # longer: the first row is left-padded
]


@pytest.fixture(scope="module")
def base_model(tiny_path):
    return load_base_model(tiny_path, torch.float32).eval()


@pytest.fixture(scope="module")
def soft_prompted(tiny_path):
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=6, prompt_tuning_init=PromptTuningInit.RANDOM)
    return get_peft_model(load_base_model(tiny_path, torch.float32), config).eval()


@pytest.mark.parametrize("num_virtual_tokens, expected_how", [(7, "repeated 3x and cut to 7"), (2, "cut to its first 2 tokens")])
def test_text_init_copies_the_init_text_embeddings_as_peft_does(tiny_path, tokenizer, base_model, num_virtual_tokens, expected_how):
    arguments = PromptTuningArguments(num_virtual_tokens=num_virtual_tokens, prompt_init_text="分类任务：")
    model = get_peft_model(load_base_model(tiny_path, torch.float32), build_prompt_tuning_config(arguments, tiny_path))
    text_ids = tokenizer("分类任务：", add_special_tokens=False)["input_ids"]
    assert len(text_ids) == 3
    expected_ids = (text_ids * 3)[:num_virtual_tokens]
    initial = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(initial, base_model.get_input_embeddings().weight[expected_ids], rtol=0, atol=0)
    assert initial.requires_grad and expected_how in describe_text_init(tokenizer, arguments)


def _left_padded(tokenizer, records):
    tokenizer.padding_side = "left"
    try:
        return tokenizer([format_prompt(tokenizer, record) for record in records], return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = "right"


def _greedy_scores(model, tokenizer, batch, steps):
    output = generate_new_tokens(model, batch, max_new_tokens=steps, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return output.sequences, output.scores


def test_generation_uses_the_soft_prompt_at_every_step(soft_prompted, base_model, tokenizer):
    batch, steps = _left_padded(tokenizer, RECORDS), 3
    new_tokens, scores = _greedy_scores(soft_prompted, tokenizer, batch, steps)
    _, base_scores = _greedy_scores(base_model, tokenizer, batch, 1)
    assert (scores[0] - base_scores[0]).abs().max() > 1e-2  # the virtual tokens change the next-token logits
    soft_prompt = soft_prompted.get_prompt(batch_size=len(RECORDS))
    for step in range(steps):  # each step equals a plain forward with the virtual token embeddings prepended
        ids = torch.cat([batch["input_ids"], new_tokens[:, :step]], dim=1)
        mask = torch.cat([torch.ones(len(RECORDS), soft_prompt.shape[1], dtype=torch.long), batch["attention_mask"], torch.ones(len(RECORDS), step, dtype=torch.long)], dim=1)
        embeddings = torch.cat([soft_prompt, base_model.get_input_embeddings()(ids)], dim=1)
        with torch.no_grad():
            expected = base_model(inputs_embeds=embeddings, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
        torch.testing.assert_close(scores[step], expected, atol=1e-4, rtol=1e-4)


def test_saved_soft_prompt_reloads_onto_a_fresh_base(tmp_path, tiny_path, soft_prompted, tokenizer):
    soft_prompted.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(load_base_model(tiny_path, torch.float32), tmp_path).eval()
    batch = tokenizer([format_prompt(tokenizer, RECORDS[0])], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, soft_prompted(**batch).logits)


def test_command_trains_and_writes_adapter_and_classification_metrics(tmp_path):
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(load_records(DATA / "classify_test.json")[::6], ensure_ascii=False), encoding="utf-8")
    output = tmp_path / "prompt_tuning"
    code = train_prompt_tuning.main([
        "--data_path", str(DATA / "classify_train.json"), "--eval_data_path", str(eval_file), "--output_dir", str(output),
        "--num_virtual_tokens", "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no",
        "--disable_tqdm", "True", "--report_to", "none",
    ])
    assert code == 0
    assert {"adapter_model.safetensors", "adapter_config.json", "run_config.json", "loss_plot.png"} <= {path.name for path in output.iterdir()}
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 4 and adapter["prompt_tuning_init"] == "TEXT"
    assert json.loads((output / "run_config.json").read_text())["learning_rate"] == 3e-2  # the seed's prompt tuning default
    metrics = json.loads((output / "classification_metrics.json").read_text(encoding="utf-8"))
    assert metrics["examples"] == 6 and metrics["labels"] == ["中性", "正面", "负面"]
    assert sum(map(sum, metrics["confusion_matrix"])) == 6 and 0 <= metrics["accuracy"] <= 1
    assert len(metrics["predictions"]) == len(metrics["generated"]) == 6

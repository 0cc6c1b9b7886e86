"""Batching: padding-free rows give the padded loss and never attend across examples; token-budget batches; the flags."""


import pytest
import torch

from qwen_helpers.training.batching import (
    TokenBudgetBatchSampler,
    batch_cost,
    examples_in_batch,
    make_padding_free_collator,
    only_trained_logits,
    real_tokens_in_batch,
    resolve_padding_free,
)
from qwen_helpers.run.config import DataArguments, KitTrainingArguments, LoraArguments, ModelArguments
from qwen_helpers.data.encoding import make_collator
from qwen_helpers.data.loading import load_dataset_for_training
from tests.conftest import DATA


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Five tokenised training examples of different lengths."""
    dataset = load_dataset_for_training(tokenizer, DATA / "train.json", 512).dataset
    rows = [dict(row) for row in dataset.select(range(5))]
    assert len({len(row["input_ids"]) for row in rows}) > 1  # the test needs padding to happen
    return rows


def _model(tiny_path, attn_implementation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32, attn_implementation=attn_implementation).eval()
    model.config.use_cache = False  # as Trainer sets it (TrainingArguments.use_cache=False): with a cache, masks ignore packing
    return model


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padding_free_loss_equals_padded_loss(tiny_path, tokenizer, examples, attn_implementation):
    model = _model(tiny_path, attn_implementation)
    padded = make_collator(tokenizer)(examples)
    flat = make_padding_free_collator(attn_implementation)(examples)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    assert (padded["labels"] != -100).sum() == (flat["labels"] != -100).sum()  # the same tokens count in the mean
    with torch.no_grad():
        padded_loss, flat_loss = model(**padded).loss, model(**flat).loss
    assert flat_loss.item() == pytest.approx(padded_loss.item(), abs=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_no_attention_crosses_examples(tiny_path, examples, attn_implementation):
    """Changing the first example's tokens leaves the second example's logits exactly where they were."""
    model = _model(tiny_path, attn_implementation)
    first, second = examples[0], examples[1]
    changed = dict(first, input_ids=[(token + 7) % 150000 for token in first["input_ids"]])
    collate = make_padding_free_collator(attn_implementation)
    start = len(first["input_ids"])
    with torch.no_grad():
        before = model(**collate([first, second])).logits[0]
        after = model(**collate([changed, second])).logits[0]
        # Control: the same row without restarting positions is one long sequence, and then the change does leak.
        plain = {"input_ids": collate([first, second])["input_ids"]}
        leaked = model(**plain).logits[0, start:] - model(input_ids=collate([changed, second])["input_ids"]).logits[0, start:]
    assert not torch.allclose(before[:start], after[:start])  # the first example did change
    torch.testing.assert_close(after[start:], before[start:], atol=1e-5, rtol=0)
    assert leaked.abs().max() > 1e-3


@pytest.mark.parametrize("padding_free", [False, True])
def test_logits_only_for_trained_positions_give_the_same_loss_and_gradients(tiny_path, tokenizer, examples, padding_free):
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_path, "sdpa")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = make_padding_free_collator()(examples) if padding_free else make_collator(tokenizer)(examples)
    results = []
    for inputs in (batch, only_trained_logits(batch)):
        model.zero_grad()
        output = model(**inputs)
        output.loss.backward()
        results.append((output.loss.detach(), output.logits.shape, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (full_loss, full_shape, full_grads), (kept_loss, kept_shape, kept_grads) = results
    trained = int((batch["labels"][..., 1:] != -100).sum())
    assert kept_shape[-2] == trained < full_shape[-2]  # logits only where the loss reads them
    assert kept_loss.item() == pytest.approx(full_loss.item(), abs=1e-5)
    for full, kept in zip(full_grads, kept_grads):
        torch.testing.assert_close(kept, full, atol=1e-5, rtol=1e-4)


def test_collated_batches_count_examples_and_real_tokens(tokenizer, examples):
    padded = make_collator(tokenizer)(examples)
    flat = make_padding_free_collator()(examples)
    total = sum(len(row["input_ids"]) for row in examples)
    assert examples_in_batch(padded) == examples_in_batch(flat) == len(examples)
    assert real_tokens_in_batch(padded) == real_tokens_in_batch(flat) == total
    assert padded["input_ids"].numel() > total  # padding was computed on


def test_token_budget_batches_cover_every_example_once_within_budget():
    lengths = [int(x) for x in torch.randint(10, 200, (300,), generator=torch.Generator().manual_seed(0))] + [900]
    for padding_free in (False, True):
        sampler = TokenBudgetBatchSampler(lengths, 1000, padding_free, seed=3)
        batches = list(sampler)
        assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
        for batch in batches:
            assert batch_cost([lengths[i] for i in batch], padding_free) <= 1000 or len(batch) == 1
        assert len({len(batch) for batch in batches}) > 1 and len(batches) == len(sampler)
    padded, flat = TokenBudgetBatchSampler(lengths, 1000, False), TokenBudgetBatchSampler(lengths, 1000, True)
    assert len(flat) < len(padded) * 1.2  # bucketing by length keeps padding small
    oversized = TokenBudgetBatchSampler(lengths, 500, True)
    assert oversized.oversized == 1 and [300] in list(oversized)  # the 900-token example trains alone, not dropped


def test_token_budget_order_is_seeded_and_changes_per_epoch():
    lengths = list(range(5, 400, 3))
    first, again = TokenBudgetBatchSampler(lengths, 800, True, seed=1), TokenBudgetBatchSampler(lengths, 800, True, seed=1)
    assert list(first) == list(again)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0 and sorted(map(tuple, first)) == sorted(map(tuple, epoch0))


def test_padding_free_is_on_by_default_only_where_it_works():
    assert resolve_padding_free(None, "lora", "sdpa")[0] is True
    assert resolve_padding_free(None, "prompt_tuning", "sdpa")[0] is False
    assert resolve_padding_free(False, "lora", "sdpa")[0] is False
    with pytest.raises(ValueError, match="--padding_free True: prompt tuning"):
        resolve_padding_free(True, "prompt_tuning", "sdpa")


def test_training_with_a_token_budget_and_accumulation_logs_examples_per_step(tmp_path, small_train_file):
    from qwen_helpers.training.sft import train

    training_args = KitTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, token_budget=600, gradient_accumulation_steps=2,
                                         save_strategy="no", disable_tqdm=True, report_to="none")
    result = train(ModelArguments(), DataArguments(data_path=small_train_file), training_args, "lora", LoraArguments(), save=False)
    logged = [record for record in result.history if "loss" in record]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(record["loss"])) for record in logged)
    assert all(record["examples_per_step"] >= 2 for record in logged)  # two budget batches of >= 1 example each
    assert any("token budget 600" in note for note in result.notes) and any("padding-free" in note for note in result.notes)


def test_flags_parse_and_bad_values_stop_before_loading(tmp_path, small_train_file):
    from qwen_helpers.cli import parse_training_args
    from qwen_helpers.training.sft import train

    *_, training_args = parse_training_args("lora", ["--padding_free", "False", "--token_budget", "2048", "--output_dir", str(tmp_path / "x")])
    assert training_args.padding_free is False and training_args.token_budget == 2048
    small_budget = KitTrainingArguments(output_dir=str(tmp_path / "y"), token_budget=8, report_to="none")
    with pytest.raises(ValueError, match="--token_budget 8 is too small"):
        train(ModelArguments(model_path="/no/such/model"), DataArguments(data_path=small_train_file), small_budget, "lora", LoraArguments())
    liger = KitTrainingArguments(output_dir=str(tmp_path / "z"), use_liger_kernel=True, report_to="none")
    with pytest.raises(ValueError, match="--use_liger_kernel True: "):
        train(ModelArguments(model_path="/no/such/model"), DataArguments(data_path=small_train_file), liger, "lora", LoraArguments())


def test_liger_reasons():
    from qwen_helpers.training.speed import liger_problem

    assert "not installed" in liger_problem("qwen2", True, False)
    assert "CUDA" in liger_problem("qwen2", False, True)
    assert "qwen2, qwen3, qwen3_moe only" in liger_problem("llama", True, True) and liger_problem("qwen3_5", True, True)
    assert liger_problem("qwen3", True, True) is None

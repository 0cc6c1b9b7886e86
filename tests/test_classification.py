"""Classification: the label set, label scoring (against a brute-force computation and a model whose logits we set), metrics, the sequence-classification route."""

import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from sklearn.metrics import classification_report, confusion_matrix

from qwen_helpers.evaluation.classification import (
    build_sequence_classifier,
    check_labels_known,
    classification_metrics,
    detect_task,
    predict_by_scoring,
    resolve_labels,
    score_labels,
)
from qwen_helpers.run.config import LoraArguments
from qwen_helpers.data.encoding import IGNORE_INDEX, tokenize_example
from qwen_helpers.data.records import load_records
from qwen_helpers.models.loading import load_base_model

from conftest import DATA

LABELS = ["中性", "正面", "负面"]


@pytest.fixture(scope="module")
def test_records():
    return load_records(DATA / "classify_test.json")[:4]


@pytest.fixture(scope="module")
def base_model(tiny_path):
    return load_base_model(tiny_path, torch.float32).eval()


def brute_force_scores(model, tokenizer, records, labels, virtual_tokens=0):
    """One unpadded forward per (record, label), full logits, log-softmax over the vocabulary, summed over the answer."""
    scores = torch.zeros(len(records), len(labels))
    for row, record in enumerate(records):
        for column, label in enumerate(labels):
            example = tokenize_example(tokenizer, {**record, "output": label})
            ids, targets = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(input_ids=ids).logits[0, virtual_tokens:], dim=-1)
            scores[row, column] = sum(log_probs[p - 1, targets[p]] for p in range(1, len(targets)) if targets[p] != IGNORE_INDEX)
    return scores


def test_task_and_labels_come_from_the_data():
    train = load_records(DATA / "classify_train.json")
    assert detect_task(train) == "classification" and detect_task(load_records(DATA / "train.json")) == "generation"
    assert detect_task(train, "generation") == "generation"
    assert resolve_labels(train) == LABELS
    assert resolve_labels(train, "负面,正面,中性") == ["负面", "正面", "中性"]
    with pytest.raises(ValueError, match="also answers"):
        resolve_labels(train, "正面,负面")
    with pytest.raises(ValueError, match="record 1: the answer 'maybe'"):
        check_labels_known([{"output": "正面"}, {"output": "maybe"}], LABELS, "test.json")


def test_batched_label_scoring_equals_brute_force(base_model, tokenizer, test_records):
    records = test_records[:3]
    batched = score_labels(base_model, tokenizer, records, LABELS, batch_size=4)  # batches cut across records
    expected = brute_force_scores(base_model, tokenizer, records, LABELS)
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=1e-5)
    assert predict_by_scoring(base_model, tokenizer, records, LABELS) == [LABELS[i] for i in expected.argmax(1).tolist()]


def test_label_scoring_counts_the_soft_prompt_positions(tiny_path, tokenizer, test_records):
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=5, prompt_tuning_init=PromptTuningInit.RANDOM)
    model = get_peft_model(load_base_model(tiny_path, torch.float32), config).eval()
    batched = score_labels(model, tokenizer, test_records[:2], LABELS, batch_size=4)
    torch.testing.assert_close(batched, brute_force_scores(model, tokenizer, test_records[:2], LABELS, virtual_tokens=5), atol=1e-4, rtol=1e-5)


class FavouriteTokenModel(torch.nn.Module):
    """A stand-in LM whose every next-token distribution puts extra weight on a few chosen tokens."""

    def __init__(self, favourite_ids, vocabulary=151936):
        super().__init__()
        self.bias = torch.zeros(vocabulary)
        self.bias[favourite_ids] = 8.0
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask, logits_to_keep):
        return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], len(logits_to_keep), -1))


@pytest.mark.parametrize("favourite", LABELS)
def test_label_scoring_picks_the_label_the_model_favours(tokenizer, test_records, favourite):
    favourite_ids = tokenizer(favourite + "<|im_end|>", add_special_tokens=False)["input_ids"]
    model = FavouriteTokenModel(favourite_ids)
    assert predict_by_scoring(model, tokenizer, test_records, LABELS, batch_size=4) == [favourite] * len(test_records)


def test_metrics_match_scikit_learn_on_a_fixed_prediction_set():
    true = ["正面", "正面", "负面", "负面", "中性", "中性", "中性"]
    predicted = ["正面", "负面", "负面", "负面", "正面", "中性", "负面"]
    metrics = classification_metrics(true, predicted, LABELS)
    report = classification_report(true, predicted, labels=LABELS, output_dict=True, zero_division=0)
    assert metrics["accuracy"] == pytest.approx(4 / 7)
    assert metrics["macro_f1"] == pytest.approx(report["macro avg"]["f1-score"])
    for label in LABELS:
        assert metrics["per_label"][label]["precision"] == pytest.approx(report[label]["precision"])
        assert metrics["per_label"][label]["recall"] == pytest.approx(report[label]["recall"])
    assert metrics["per_label"]["负面"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2}
    assert metrics["confusion_matrix"] == confusion_matrix(true, predicted, labels=LABELS).tolist() == [[1, 1, 1], [0, 1, 1], [0, 0, 2]]
    json.dumps(metrics)  # JSON-ready


def test_sequence_classifier_head_survives_save_and_reload(tmp_path, tiny_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model, _ = build_sequence_classifier(tiny_path, LABELS, LoraArguments())
    assert model.config.pad_token_id == tokenizer.pad_token_id
    head = model.base_model.model.score.modules_to_save["default"]
    with torch.no_grad():
        head.weight.add_(0.5)  # stands in for training: the saved head must be this one, not a fresh random one
    tokenizer.padding_side = "right"
    batch = tokenizer(["很好的产品", "质量太差了，不推荐"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)

    torch.manual_seed(1)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=len(LABELS), pad_token_id=tokenizer.pad_token_id)
    assert not torch.equal(fresh.score.weight, head.weight)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(reloaded.base_model.model.score.modules_to_save["default"].weight, head.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, logits)


def test_evaluate_run_after_any_method_labels_in_sample_figures(tmp_path, tiny_path, tokenizer):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from qwen_helpers.evaluation.classification import evaluate_run
    from qwen_helpers.run.config import DataArguments

    records = json.loads((DATA / "classify_train.json").read_text(encoding="utf-8"))[:15]
    data_file = tmp_path / "few.json"
    data_file.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    result = SimpleNamespace(
        model=AutoModelForCausalLM.from_pretrained(tiny_path).eval(), tokenizer=tokenizer,
        trainer=SimpleNamespace(args=SimpleNamespace(per_device_eval_batch_size=8)), output_dir=str(tmp_path),
    )
    line = evaluate_run(result, DataArguments(data_path=str(data_file)), prompt_args=None)  # a LoRA run: task detected
    written = json.loads((tmp_path / "classification_metrics.json").read_text(encoding="utf-8"))
    assert written["examples"] == 15 and written["split"].startswith("training data (in-sample")
    assert "in-sample" in line
    assert evaluate_run(result, DataArguments(data_path=str(DATA / "train.json")), prompt_args=None) is None

"""The widget panels: they start at the parameters cell's exact values, and value() is a fresh, validated config."""

import pytest

pytest.importorskip("ipywidgets")

from qwen_helpers.run.config import KitTrainingArguments, LoraArguments, PromptTuningArguments  # noqa: E402
from qwen_helpers.notebook.widgets import config_panel, panel_row  # noqa: E402


def training_panel(tmp_path, **values):
    values = {"output_dir": str(tmp_path), "learning_rate": 2e-3, "max_steps": 12, "fp16": True, "save_strategy": "no", **values}
    return config_panel(KitTrainingArguments, ["learning_rate", "max_steps", "num_train_epochs", "fp16"], "Training", **values)


@pytest.mark.parametrize("rate", [2e-3, 3e-2, 5.01e-3, 1e-2])
def test_showing_a_panel_never_changes_a_value(tmp_path, rate):
    panel = training_panel(tmp_path, learning_rate=rate)
    assert panel.widgets["learning_rate"].value == rate
    assert panel.value().learning_rate == rate


def test_value_is_a_new_validated_config_with_the_moved_widget(tmp_path):
    panel = training_panel(tmp_path)
    first = panel.value()
    panel.set(learning_rate=1e-3, max_steps=30)
    second = panel.value()
    assert second is not first and isinstance(second, KitTrainingArguments)
    assert (first.learning_rate, first.max_steps) == (2e-3, 12)
    assert (second.learning_rate, second.max_steps) == (1e-3, 30)
    assert second.output_dir == str(tmp_path)  # fields without a widget keep the parameters cell's values


def test_the_panel_shows_the_request_and_what_will_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    panel = training_panel(tmp_path)
    assert panel.widgets["fp16"].value is True  # the request, even though a CPU run falls back to fp32
    assert "fp16 requested → fp32 on this CPU" in panel.effective.value
    assert "max_steps=12" in panel.effective.value
    panel.set(max_steps=-1)
    assert "passes over the data" in panel.effective.value


def test_invalid_text_is_reported_in_the_panel_and_raised_by_value():
    panel = config_panel(PromptTuningArguments, ["prompt_tuning_init", "prompt_init_text"], prompt_tuning_init="TEXT")
    panel.widgets["prompt_init_text"].value = "   "
    assert "not valid" in panel.effective.value and "prompt_init_text" in panel.effective.value
    with pytest.raises(ValueError, match="prompt_init_text"):
        panel.value()


def test_an_instance_works_too_and_stays_untouched():
    lora = LoraArguments(lora_r=8, target_modules="q_proj,v_proj")
    panel = config_panel(lora, ["lora_r", "target_modules"])
    panel.set(lora_r=16, target_modules="all-linear")
    assert panel.value() == LoraArguments(lora_r=16, target_modules="all-linear")
    assert lora.lora_r == 8


def test_unknown_field_names_fail_with_the_class_name():
    with pytest.raises(ValueError, match="LoraArguments has no field lora_rank"):
        config_panel(LoraArguments, ["lora_rank"])


def test_panels_wrap_instead_of_scrolling(tmp_path):
    row = panel_row(training_panel(tmp_path), config_panel(LoraArguments, ["lora_r"]))
    assert row.layout.flex_flow == "row wrap"
    assert all(child.layout.width == "400px" for child in row.children)


def test_optional_fields_get_a_tri_state_choice_and_typed_text():
    """padding_free (bool | None) is auto/True/False; token_budget (int | None) reads as an int, empty as None."""
    from qwen_helpers.run.config import KitTrainingArguments
    from qwen_helpers.notebook.widgets import config_panel

    panel = config_panel(KitTrainingArguments, ["padding_free", "token_budget"], output_dir="unused", padding_free=None, token_budget=None)
    assert panel.widgets["padding_free"].label == "auto"  # shown as a choice, not as an empty selection
    assert panel.value().padding_free is None and panel.value().token_budget is None
    panel.set(padding_free=False, token_budget="2048")
    built = panel.value()
    assert built.padding_free is False and built.token_budget == 2048
    panel.set(token_budget="", padding_free=None)
    assert panel.value().token_budget is None and panel.value().padding_free is None


def test_lora_variant_widgets_reach_the_config():
    names = ["use_dora", "use_rslora", "init_lora_weights", "loraplus_lr_ratio"]
    panel = config_panel(LoraArguments, names, "LoRA")
    assert panel.value() == LoraArguments()  # shown at the defaults: plain LoRA, nothing changed
    assert "pissa_niter_4" in panel.widgets["init_lora_weights"].options
    panel.set(use_dora=True, init_lora_weights="gaussian")
    panel.widgets["loraplus_lr_ratio"].value = "16"
    built = panel.value()
    assert (built.use_dora, built.init_lora_weights, built.loraplus_lr_ratio) == (True, "gaussian", 16.0)
    panel.widgets["loraplus_lr_ratio"].value = "0.5"
    assert "not valid" in panel.effective.value and "loraplus_lr_ratio" in panel.effective.value

"""Plots return figures and stay readable where no CJK font is installed."""

from matplotlib.figure import Figure

from qwen_helpers.notebook import plots


def test_chinese_labels_fall_back_to_english_without_a_cjk_font(monkeypatch):
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    shown, note = plots.displayable_labels(["中性", "正面", "负面", "其他", "ok"])
    assert shown == ["neutral", "positive", "negative", "label 3", "ok"] and "no CJK font" in note
    monkeypatch.setattr(plots, "cjk_font", lambda: "Noto Sans CJK SC")
    assert plots.displayable_labels(["中性", "正面"]) == (["中性", "正面"], "")


def test_confusion_matrix_figure_uses_the_shown_labels(monkeypatch):
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    figure = plots.plot_confusion_matrix([[2, 0], [1, 3]], ["正面", "负面"])
    assert isinstance(figure, Figure)
    assert [tick.get_text() for tick in figure.axes[0].get_xticklabels()] == ["positive", "negative"]

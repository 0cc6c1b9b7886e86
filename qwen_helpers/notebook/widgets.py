"""ipywidgets panels generated from the config dataclasses: a widget per field, and a freshly validated config on demand.

    training_panel = config_panel(KitTrainingArguments, ["learning_rate", "max_steps"], "Training",
                                  output_dir=OUTPUT_DIR, learning_rate=LEARNING_RATE, max_steps=MAX_STEPS)
    show_panels(training_panel)
    ...
    trainer = Trainer(model=model, args=training_panel.value(), ...)   # the widgets' values, validated now

``value()`` builds a new dataclass from the widgets' current values every time it is called, so its
``__post_init__`` validation runs and a cell re-run after moving a widget always sees the new value.
Each panel shows the requested settings and, on its last line, what will actually run (precision on
this device, steps or epochs). Sliders only offer stops that include the parameters cell's value, so
showing a panel never changes a value nobody touched. Without a display (CI, a plain Python run)
nothing is shown and ``value()`` returns the parameters cell's values.
"""

from __future__ import annotations

import dataclasses
import html
import typing

import ipywidgets as widgets

# Slider stops per field; the parameters cell's value is always added, so a panel never rounds it.
STOPS = {
    "lora_r": [1, 2, 4, 8, 16, 32, 64],
    "lora_alpha": [4, 8, 16, 32, 64, 128],
    "lora_dropout": [0.0, 0.05, 0.1, 0.2, 0.3],
    "learning_rate": [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 1e-1],
    "num_train_epochs": [1.0, 2.0, 3.0, 5.0, 10.0, 20.0],
    "per_device_train_batch_size": [1, 2, 4, 8, 16, 32],
    "num_virtual_tokens": [1, 5, 10, 20, 50, 100],
    "max_length": [128, 256, 512, 1024, 2048],
    "max_steps": [-1, 5, 10, 20, 30, 40, 60, 100, 200, 500, 1000],
    "seq_len": [16, 32, 64, 128, 256, 512, 1024, 2048],
    "batch_size": [1, 2, 4, 8, 16],
    "steps": [1, 2, 3, 5, 10, 20],
    "eval_steps": [5, 10, 20, 25, 50, 100, 200],
    "early_stopping_patience": [1, 2, 3, 5, 10],
    "beta": [0.0, 0.01, 0.04, 0.1, 0.2, 0.5, 1.0],  # DPO's (0.1) and GRPO's KL weight (0.04; 0.0 skips the reference)
    "num_generations": [2, 4, 8, 16],
    "max_completion_length": [4, 8, 16, 32, 64, 128, 256, 512, 1024],
}
# Dropdown choices for free-text fields with a few usual values (the parameters cell's value is always added).
CHOICES = {"init_lora_weights": ["true", "gaussian", "pissa", "pissa_niter_4", "olora"]}
AUTO = "auto"  # a tri-state widget's stand-in for None ("the kit decides")
PANEL_WIDTH = "400px"  # two panels side by side fit a 1280 px JupyterLab window with the file browser open
DESCRIPTION_WIDTH = "190px"  # fits per_device_train_batch_size


def _label(value) -> str:
    """A stop's label: learning rates in e-notation (2e-03), -1 for max_steps spelled out, other numbers as typed."""
    if isinstance(value, float) and value and abs(value) < 1e-2:
        return f"{value:.0e}" if float(f"{value:.0e}") == value else f"{value:.3g}"
    if value == -1:
        return "-1 (use epochs)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_widget(name: str, value, field_type, help_text: str = "") -> widgets.Widget:
    """One widget for one field, chosen from its type, its Literal choices and STOPS; it starts at ``value`` exactly."""
    common = {"description": name, "description_tooltip": help_text or name, "style": {"description_width": DESCRIPTION_WIDTH},
              "layout": widgets.Layout(width="100%")}
    choices = typing.get_args(field_type) if typing.get_origin(field_type) is typing.Literal else None
    choices = choices or CHOICES.get(name)
    if choices:
        return widgets.Dropdown(options=list(dict.fromkeys([*choices, value])), value=value, **common)
    if _optional_of(field_type) is bool:  # None means "the kit decides": a three-way choice, not a text box
        # ipywidgets shows a None value as no selection, so "auto" stands for it in the widget (see ConfigPanel.current)
        return widgets.Dropdown(options=[("auto", AUTO), ("True", True), ("False", False)], value=AUTO if value is None else value, **common)
    if isinstance(value, bool):
        return widgets.Checkbox(value=value, indent=True, **common)
    if name in STOPS and isinstance(value, (int, float)):
        stops = sorted(set(STOPS[name]) | {value})
        return widgets.SelectionSlider(options=[(_label(stop), stop) for stop in stops], value=value, continuous_update=False, **common)
    common["layout"] = widgets.Layout(width="96%")  # a text box's border would otherwise overflow the panel's edge
    return widgets.Text(value="" if value is None else str(value), continuous_update=False, **common)


def _optional_of(field_type):
    """``int`` for ``int | None`` (``Optional[int]``), else None."""
    arguments = [argument for argument in typing.get_args(field_type) if argument is not type(None)]
    return arguments[0] if len(arguments) == 1 and len(typing.get_args(field_type)) == 2 else None


def _convert(text: str, example, field_type=None):
    """A Text widget's string as the field's type (or the parameters cell value's type); empty is None for optional fields."""
    if example is None:
        inner = _optional_of(field_type)
        return (inner(text.strip()) if inner in (int, float) else text) if text.strip() else None
    if isinstance(example, bool):
        return text.strip().lower() in ("1", "true", "yes")
    return type(example)(text)


def describe_precision(requested: dict, config) -> str:
    """'fp16 requested -> fp32 on this CPU': the precision asked for and the one training will use here (the kit's one policy)."""
    from ..run.precision import decide_precision

    precision = decide_precision(bool(requested.get("fp16")), bool(requested.get("bf16")), use_cpu=getattr(config, "use_cpu", False),
                                 missing_bf16="fp16")
    where = "CPU" if precision.device != "cuda" else "GPU"
    if precision.requested == precision.effective:
        return f"precision: {precision.effective}" + (" (CPU)" if where == "CPU" else "")
    return f"precision: {precision.requested} requested → {precision.effective} on this {where}"


def describe_effective(requested: dict, config) -> str:
    """What a built config will actually run with, where that can differ from what was asked (precision, steps)."""
    parts = []
    if hasattr(config, "fp16") and hasattr(config, "bf16"):
        parts.append(describe_precision(requested, config))
    max_steps = getattr(config, "max_steps", None)
    if max_steps is not None and max_steps > 0:
        parts.append(f"stops after max_steps={max_steps} optimiser steps (num_train_epochs is not used)")
    elif hasattr(config, "num_train_epochs"):
        parts.append(f"{config.num_train_epochs:g} passes over the data (max_steps=-1)")
    return "; ".join(parts)


class ConfigPanel:
    """Widgets for some fields of a config dataclass; ``value()`` returns a freshly validated config from them."""

    def __init__(self, config_class, values: dict, names: list[str], title: str | None = None):
        self.config_class = config_class
        self.requested = dict(values)  # what the parameters cell asked for (never rewritten by validation)
        fields = {field.name: field for field in dataclasses.fields(config_class) if field.init}
        self.hints = hints = typing.get_type_hints(config_class)
        unknown = [name for name in names if name not in fields]
        if unknown:
            raise ValueError(f"config_panel: {config_class.__name__} has no field {', '.join(unknown)}; check the names list.")
        built = config_class(**self.requested)  # validate the parameters cell's values before any widget shows
        self.widgets = {}
        for name in names:
            value = self.requested.get(name, getattr(built, name))
            self.requested.setdefault(name, value)
            self.widgets[name] = field_widget(name, value, hints.get(name, type(value)), fields[name].metadata.get("help", ""))
        self.effective = widgets.HTML(layout=widgets.Layout(width="100%"))
        header = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.box = widgets.VBox(
            header + list(self.widgets.values()) + [self.effective],
            layout=widgets.Layout(width=PANEL_WIDTH, max_width="100%", margin="0 16px 8px 0", overflow="hidden"),
        )
        for widget in self.widgets.values():
            widget.observe(lambda change: self.refresh(), names="value")
        self.refresh()

    def current(self) -> dict:
        """The keyword arguments the next ``value()`` will use: the parameters cell's, with every widget's value on top."""
        values = dict(self.requested)
        for name, widget in self.widgets.items():
            value = widget.value
            if isinstance(widget, widgets.Text):
                value = _convert(value, self.requested[name], self.hints.get(name))
            elif isinstance(widget, widgets.Dropdown) and value == AUTO and _optional_of(self.hints.get(name)) is bool:
                value = None
            values[name] = value
        return values

    def value(self):
        """A new config built from the widgets' current values; its own validation runs, so bad values fail here."""
        return self.config_class(**self.current())

    build = value

    def refresh(self) -> None:
        """Rewrite the 'will run' line from a fresh build, or show why the current values are rejected."""
        try:
            line = describe_effective(self.current(), self.value())
            self.effective.value = f"<small>will run: {html.escape(line)}</small>" if line else ""
        except (ValueError, TypeError) as error:
            self.effective.value = f"<small style='color:#b00'>not valid: {html.escape(str(error))}</small>"

    def set(self, **values) -> None:
        """Move widgets from code (what a learner does by hand); a value must be one of a slider's stops."""
        for name, value in values.items():
            self.widgets[name].value = AUTO if value is None and isinstance(self.widgets[name], widgets.Dropdown) else value

    def _ipython_display_(self):
        show_panels(self)


def config_panel(config, names: list[str] | None = None, title: str | None = None, **values) -> ConfigPanel:
    """A panel for ``names`` of a config: pass the dataclass and the parameters cell's values, or an instance."""
    if isinstance(config, type):
        config_class = config
    else:  # an instance: its init fields are the request (fine for the kit's plain dataclasses)
        config_class = type(config)
        values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config) if field.init} | values
    names = names or [field.name for field in dataclasses.fields(config_class) if field.init]
    return ConfigPanel(config_class, values, names, title)


def panel_row(*panels) -> widgets.Box:
    """Panels in a row that wraps onto the next line when the window is narrow (never a horizontal scrollbar)."""
    children = [panel.box if isinstance(panel, ConfigPanel) else panel for panel in panels]
    return widgets.Box(children, layout=widgets.Layout(display="flex", flex_flow="row wrap", align_items="flex-start", width="100%"))


def show_panels(*panels) -> None:
    """Display panels side by side (wrapping) when a notebook front end is attached; do nothing otherwise."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(panel_row(*panels))

"""ipywidgets panels generated from the config dataclasses: a slider or box per field, bound to the config.

    panel = config_panel(lora_args, ["lora_r", "lora_alpha", "lora_dropout", "target_modules"])
    display(panel)   # moving a slider sets lora_args.lora_r, which the next cells read

Without a display (CI, a plain Python run) nothing is shown and the config keeps the parameters cell's values.
"""

from __future__ import annotations

import dataclasses
import typing

import ipywidgets as widgets

# Sensible ranges for numeric fields; anything not listed gets a text box.
RANGES = {
    "lora_r": ("int", [1, 2, 4, 8, 16, 32, 64]),
    "lora_alpha": ("int", [4, 8, 16, 32, 64, 128]),
    "lora_dropout": ("float", (0.0, 0.3, 0.01)),
    "learning_rate": ("log", (-5, -1)),
    "num_train_epochs": ("float", (1, 10, 1)),
    "per_device_train_batch_size": ("int", [1, 2, 4, 8, 16, 32]),
    "num_virtual_tokens": ("int", [1, 5, 10, 20, 50, 100]),
    "max_length": ("int", [128, 256, 512, 1024, 2048]),
    "max_steps": ("int", (-1, 500, 1)),
    "seq_len": ("int", [128, 256, 512, 1024, 2048]),
    "batch_size": ("int", [1, 2, 4, 8, 16]),
}


def _help(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def field_widget(config, field: dataclasses.Field) -> widgets.Widget:
    """One widget for one dataclass field, chosen from its type, its Literal choices and RANGES."""
    value = getattr(config, field.name)
    description = field.name
    style = {"description_width": "200px"}
    layout = widgets.Layout(width="480px")
    kind = RANGES.get(field.name)
    field_type = typing.get_type_hints(type(config)).get(field.name, type(value))
    choices = typing.get_args(field_type) if typing.get_origin(field_type) is typing.Literal else None
    if choices:
        return widgets.Dropdown(options=list(choices), value=value, description=description, style=style, layout=layout, tooltip=_help(field))
    if isinstance(value, bool):
        return widgets.Checkbox(value=value, description=description, style=style, layout=layout)
    if kind and kind[0] == "log":
        return widgets.FloatLogSlider(value=value, base=10, min=kind[1][0], max=kind[1][1], description=description, style=style, layout=layout, readout_format=".1e")
    if kind and isinstance(kind[1], list):
        options = sorted(set(kind[1]) | {value})
        return widgets.SelectionSlider(options=options, value=value, description=description, style=style, layout=layout)
    if kind and kind[0] == "float":
        low, high, step = kind[1]
        return widgets.FloatSlider(value=value, min=low, max=max(high, value), step=step, description=description, style=style, layout=layout)
    if kind and kind[0] == "int":
        low, high, step = kind[1]
        return widgets.IntSlider(value=value, min=low, max=max(high, value), step=step, description=description, style=style, layout=layout)
    return widgets.Text(value="" if value is None else str(value), description=description, style=style, layout=layout)


def config_panel(config, names: list[str] | None = None, title: str | None = None) -> widgets.VBox:
    """A panel of widgets for ``names`` (default: every field), each writing back into ``config`` on change."""
    fields = {field.name: field for field in dataclasses.fields(config) if field.init}
    children = [widgets.HTML(f"<b>{title}</b>")] if title else []
    for name in names or list(fields):
        widget = field_widget(config, fields[name])
        original = getattr(config, name)

        def update(change, name=name, original=original):
            value = change["new"]
            if isinstance(original, (int, float)) and not isinstance(original, bool) and isinstance(value, str):
                value = type(original)(value)
            setattr(config, name, value)

        widget.observe(update, names="value")
        children.append(widget)
    return widgets.VBox(children)


def show_panels(*panels) -> None:
    """Display panels side by side when a notebook front end is attached; do nothing otherwise."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(widgets.HBox(list(panels)))

"""A parameter form generated from a method's Config (``FusionMethod.params()``).

One magicgui widget per :class:`raterseg.ParamInfo`: bool → check box, ``choices``
→ combo box, int / float → spin boxes bounded by ``low``/``high``, tuples and
strings → line edits (the core parses ``"32, 64"`` into a tuple), floats too small
for a spin box (``1e-5``) → a line edit. The help text becomes the tooltip.
Values are handed to the core unchanged; it checks them and raises
``RaterSegError`` naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any

_BIG = 10**9


def _float_step(default: float) -> float:
    if not default:
        return 0.01
    return 10.0 ** (math.floor(math.log10(abs(default))) - 1)


def make_param_widget(info: Any):
    """The magicgui widget for one ParamInfo (name, type, default, help, choices, low, high)."""
    from magicgui import widgets as w

    common = {"name": info.name, "label": info.name.replace("_", " "), "tooltip": info.help}
    default = info.default
    if info.choices:
        value = default if default in info.choices else info.choices[0]
        return w.ComboBox(choices=list(info.choices), value=value, **common)
    if info.type is bool:
        return w.CheckBox(value=bool(default), **common)
    if info.type is int and default is not None:
        lo = int(info.low) if info.low is not None else -_BIG
        hi = int(info.high) if info.high is not None else _BIG
        return w.SpinBox(value=int(default), min=lo, max=hi, **common)
    if info.type is float and default is not None and (default == 0 or abs(default) >= 1e-3):
        lo = float(info.low) if info.low is not None else -float(_BIG)
        hi = float(info.high) if info.high is not None else float(_BIG)
        return w.FloatSpinBox(value=float(default), min=lo, max=hi,
                              step=_float_step(float(default)), **common)
    if isinstance(default, tuple):
        text = ", ".join(str(v) for v in default)
    else:
        text = "" if default is None else str(default)
    widget = w.LineEdit(value=text, **common)
    if default is None:
        widget.native.setPlaceholderText("default")
    return widget


class ParamForm:
    """A magicgui Container holding one widget per parameter of a method.

    Attributes:
        container: the magicgui Container (``.native`` is the QWidget).
        infos: the ParamInfo list the form was built from.
    """

    def __init__(self, infos: list[Any]) -> None:
        from magicgui.widgets import Container

        self.infos = list(infos)
        self.container = Container(widgets=[make_param_widget(i) for i in self.infos],
                                   labels=True)

    @property
    def native(self):
        return self.container.native

    def __getitem__(self, name: str):
        return self.container[name]

    def values(self) -> dict[str, Any]:
        """Parameter values for ``raterseg.fuse(**params)``; empty optional fields are left out."""
        out = {}
        for info in self.infos:
            value = self.container[info.name].value
            if isinstance(value, str) and info.type is not str:
                value = value.strip()
                if value == "" and info.default is None:
                    continue
            out[info.name] = value
        return out

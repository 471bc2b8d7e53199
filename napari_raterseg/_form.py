"""A parameter form generated from a method's Config (``FusionMethod.params()``).

One magicgui widget per :class:`raterseg.ParamInfo`: bool → check box, ``choices``
→ combo box, int → spin box bounded by ``low``/``high``, float → a line edit that keeps
the number exactly as typed (``0.0001``, ``5e-5``; a spin box would round it to its
decimals, so a small tolerance or learning rate would silently become 0), tuples and
strings → line edits (the core parses ``"32, 64"`` into a tuple). The help text, with
the allowed range, becomes the tooltip. :meth:`ParamForm.values` turns float fields into
floats and refuses text that is not a finite number or lies outside ``low``/``high``
with a ``RaterSegError`` naming the parameter (a field holding such text is also marked
while typing); other values go to the core, which checks them the same way.
"""

from __future__ import annotations

from typing import Any

_BIG = 10**9
_INVALID_STYLE = "color: #ff6b6b;"


def _is_float_field(info: Any) -> bool:
    return info.type is float and not info.choices


def _num(x: float) -> str:
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _range_text(info: Any) -> str:
    if info.low is not None and info.high is not None:
        return f"from {_num(info.low)} to {_num(info.high)}"
    if info.low is not None:
        return f">= {_num(info.low)}"
    if info.high is not None:
        return f"<= {_num(info.high)}"
    return ""


def _tooltip(info: Any) -> str:
    allowed = _range_text(info)
    return f"{info.help} (allowed: {allowed})" if allowed and info.help else info.help or allowed


def float_text(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``0.001``, ``1e-05``)."""
    return repr(float(value))


def parse_float(info: Any, text: str, method: str | None = None) -> float | None:
    """The float a float field's ``text`` stands for; None for an empty optional field.

    Raises:
        RaterSegError: not a finite number, or outside the parameter's ``low``/``high``
            (the core's check, :func:`raterseg.methods._base.coerce_param`); the message
            names the parameter (and ``method`` when given).
    """
    from raterseg import RaterSegError
    from raterseg.methods._base import coerce_param

    text = str(text).strip()
    if not text:
        if info.default is None:
            return None
        where = f"{info.name} (parameter of {method!r})" if method else info.name
        raise RaterSegError(f"{where}: expected a number (default {float_text(info.default)}), "
                            "got an empty field")
    return coerce_param(info, text, method)


def make_param_widget(info: Any):
    """The magicgui widget for one ParamInfo (name, type, default, help, choices, low, high)."""
    from magicgui import widgets as w

    common = {"name": info.name, "label": info.name.replace("_", " "), "tooltip": _tooltip(info)}
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
    if isinstance(default, tuple):
        text = ", ".join(str(v) for v in default)
    elif _is_float_field(info) and default is not None:
        text = float_text(default)
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
        method: the method's name, used in messages (optional).
    """

    def __init__(self, infos: list[Any], method: str | None = None) -> None:
        from magicgui.widgets import Container

        self.infos = list(infos)
        self.method = method
        self.container = Container(widgets=[make_param_widget(i) for i in self.infos],
                                   labels=True)
        for info in self.infos:
            if _is_float_field(info):
                widget = self.container[info.name]
                widget.changed.connect(lambda _v, i=info: self._mark(i))

    @property
    def native(self):
        return self.container.native

    def __getitem__(self, name: str):
        return self.container[name]

    def _mark(self, info: Any) -> None:
        """Show a float field's text in red, with the reason as tooltip, while it is refused."""
        from raterseg import RaterSegError

        widget = self.container[info.name]
        try:
            parse_float(info, widget.value, self.method)
        except RaterSegError as exc:
            widget.native.setStyleSheet(_INVALID_STYLE)
            widget.native.setToolTip(str(exc))
        else:
            widget.native.setStyleSheet("")
            widget.native.setToolTip(_tooltip(info))

    def values(self) -> dict[str, Any]:
        """Parameter values for ``raterseg.fuse(**params)``; empty optional fields are left out.

        Raises:
            RaterSegError: a float field that is not a number or is out of range.
        """
        out = {}
        for info in self.infos:
            value = self.container[info.name].value
            if _is_float_field(info):
                value = parse_float(info, value, self.method)
                if value is None:
                    continue
            elif isinstance(value, str) and info.type is not str:
                value = value.strip()
                if value == "" and info.default is None:
                    continue
            out[info.name] = value
        return out

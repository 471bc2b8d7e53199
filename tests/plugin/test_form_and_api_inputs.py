"""What the user types reaches the method: float parameters in the dock's form (walk4 f4)
and a single rater given to the console API (walk4 f8)."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs
from qtpy.QtTest import QTest

from napari_raterseg._form import ParamForm
from napari_raterseg._widget import FuseRatersWidget
from napari_raterseg.api import fuse_layers


def _type(field, text: str) -> None:
    """Select the field's text and type ``text`` over it, as a user does."""
    native = field.native
    (native.lineEdit() if hasattr(native, "lineEdit") else native).selectAll()
    QTest.keyClicks(native, text)


def _float_params():
    return [(m, p) for m in rs.available_methods() for p in rs.get_method(m).params()
            if p.type is float and not p.choices]


def _truth_layers(viewer, method: str) -> list:
    """The fused-truth Labels layers of ``method`` (found by metadata, not by name)."""
    return [lyr for lyr in viewer.layers if lyr._type_string == "labels"
            and (lyr.metadata or {}).get("method") == method]


def _disk(r: int, shape=(32, 32)) -> np.ndarray:
    g = np.indices(shape)
    return (((g[0] - shape[0] // 2) ** 2 + (g[1] - shape[1] // 2) ** 2) <= r * r).astype(np.uint8)


def test_every_float_parameter_receives_the_value_typed(qtbot):
    params = _float_params()
    assert {("staple", "tolerance"), ("cm", "lr")} <= {(m, p.name) for m, p in params}
    for method, info in params:
        form = ParamForm(rs.get_method(method).params())
        qtbot.addWidget(form.native)
        # Five significant digits below the 4th decimal: a spin box would round it away.
        value = (info.low or 0.0) + 1.2345e-5
        _type(form[info.name], repr(value))
        assert form.values()[info.name] == value, (method, info.name)
        assert rs.create(method, **form.values()).params_dict[info.name] == value
        # Scientific notation is read too.
        _type(form[info.name], "5e-5" if not info.low else f"{info.low!r}")
        assert form.values()[info.name] == (5e-5 if not info.low else info.low)


def test_float_parameters_out_of_range_or_not_numbers_are_refused(qtbot):
    for method, info in _float_params():
        form = ParamForm(rs.get_method(method).params())
        qtbot.addWidget(form.native)
        bad = ["abc", "nan"]
        if info.low is not None:
            bad.append(repr(info.low - 1e-6))
        if info.high is not None:
            bad.append(repr(info.high + 1e-6))
        for text in bad:
            _type(form[info.name], text)
            with pytest.raises(rs.RaterSegError, match=rf"^{info.name}\b"):
                form.values()
            # The field shows it is refused while the text is there.
            assert form[info.name].native.styleSheet(), (method, info.name, text)
        _type(form[info.name], repr(info.default))
        assert form.values()[info.name] == info.default
        assert not form[info.name].native.styleSheet()


def test_dock_runs_staple_with_the_small_tolerance_typed(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    for r in (5, 6, 7):
        viewer.add_labels(_disk(r), name=f"rater r{r}")
    widget = FuseRatersWidget(viewer)
    qtbot.addWidget(widget)
    widget.method.value = "staple"
    _type(widget.form["tolerance"], "0.0001")
    with qtbot.waitSignal(widget.controls.done, timeout=60_000) as blocker:
        widget.controls.run_button.click()
    assert blocker.args[0].error is None
    (truth,) = _truth_layers(viewer, "staple")
    assert truth.metadata["params"]["tolerance"] == 1e-4

    # cm: the job carries lr = 5e-5 (not 0.0, which would train a network that never moves).
    widget.method.value = "cm"
    _type(widget.form["lr"], "0.00005")
    job, _ = widget.make_job()
    assert job.params["lr"] == 5e-5

    # Out of range: not started, the message names the parameter, nothing added.
    widget.method.value = "staple"
    _type(widget.form["tolerance"], "-0.001")
    n_layers = len(viewer.layers)
    widget.controls.run_button.click()
    assert not widget.controls.busy
    status = widget.controls.status.text()
    assert status.startswith("Not started") and "tolerance" in status and ">= 0" in status
    assert len(viewer.layers) == n_layers


def test_fuse_layers_takes_one_rater_name_or_layer_as_one_rater(make_napari_viewer):
    viewer = make_napari_viewer()
    data = _disk(6)
    layer = viewer.add_labels(data, name="A rater 0")
    viewer.add_labels(_disk(3), name="B rater 1")
    res = fuse_layers(viewer, None, "A rater 0", "majority_vote")
    np.testing.assert_array_equal(res.truth, data)  # the vote of one rater is that rater
    (truth,) = _truth_layers(viewer, "majority_vote")
    np.testing.assert_array_equal(truth.data, data)
    res = fuse_layers(viewer, None, layer, "majority_vote")
    np.testing.assert_array_equal(res.truth, data)
    assert res.rater_confusion.shape[0] == 1

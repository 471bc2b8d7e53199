"""The "Fuse raters" widget end to end, headless (pytest-xvfb)."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs

from napari_raterseg._widget import FuseRatersWidget

RATERS = ["rater 1 (good)", "rater 2 (over)", "rater 3 (under)", "rater 4 (wrong)"]
SHAPE = (64, 128, 128)
WAIT_MS = 60_000


def _needs(method: str) -> None:
    assert method in rs.available_methods(), f"method {method!r} is not registered"


def _run(qtbot, widget: FuseRatersWidget):
    """Press Run and wait for the job to end; returns its outcome."""
    with qtbot.waitSignal(widget.controls.done, timeout=WAIT_MS) as blocker:
        widget.controls.run_button.click()
    return blocker.args[0]


def test_widget_defaults_pick_image_and_all_rater_layers(sample_3d_viewer):
    widget = FuseRatersWidget(sample_3d_viewer)
    assert widget.image.value is sample_3d_viewer.layers["phantom 3d"]
    assert [lyr.name for lyr in widget.raters.value] == RATERS
    assert set(widget.method.choices) == set(rs.available_methods())
    # A Labels layer added later is offered and selected as a rater by default.
    extra = sample_3d_viewer.add_labels(np.zeros(SHAPE, np.int8), name="rater 5")
    assert widget.raters.value[-1] is extra


def test_staple_end_to_end_on_3d_sample(sample_3d_viewer, qtbot, layer_snapshot):
    _needs("staple")
    viewer = sample_3d_viewer
    before = layer_snapshot(viewer)
    widget = FuseRatersWidget(viewer)
    widget.method.value = "staple"
    outcome = _run(qtbot, widget)
    assert outcome.error is None and not outcome.cancelled

    truth = viewer.layers["phantom 3d truth [staple]"]
    prob = viewer.layers["phantom 3d probability [staple]"]
    unc = viewer.layers["phantom 3d uncertainty [staple]"]
    assert truth._type_string == "labels" and truth.data.shape == SHAPE
    assert prob._type_string == "image" and prob.data.shape == SHAPE
    assert unc._type_string == "image" and unc.data.shape == SHAPE
    assert unc.colormap.name == "magma"
    # STAPLE models raters by confusion matrices only: no spatial rater maps layer.
    assert "phantom 3d rater maps [staple]" not in viewer.layers
    # The fused truth lies between the under- and over-segmenting raters.
    vol = {n: int((viewer.layers[n].data > 0).sum()) for n in RATERS}
    fused = int((truth.data > 0).sum())
    assert vol["rater 3 (under)"] < fused <= vol["rater 2 (over)"]
    # Probability and uncertainty agree: uncertainty = binary entropy of p / log 2, in [0, 1];
    # it is 0 where all raters agree and highest where they do not.
    p = np.clip(prob.data.astype(np.float64), 1e-12, 1 - 1e-12)
    entropy = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
    np.testing.assert_allclose(unc.data, entropy, atol=1e-3)
    data = np.stack([viewer.layers[n].data for n in RATERS])
    agree = (data == data[:1]).all(0)
    assert unc.data[agree].max() < 0.05 < unc.data[~agree].max()
    # The dock shows one row per rater, matching raterseg.metrics against the fused truth,
    # and a 2x2 confusion matrix per rater (columns sum to 1).
    from raterseg.metrics import rater_table

    table = widget.results.rater_table
    assert table.rowCount() == 4
    assert [table.verticalHeaderItem(r).text() for r in range(4)] == RATERS
    for r, row in enumerate(rater_table(data, truth.data)):
        for c, key in enumerate(("sensitivity", "specificity", "dice")):
            assert float(table.item(r, c).text()) == pytest.approx(row[key], abs=6e-4)
    cm_table = widget.results.confusion_table
    assert (cm_table.rowCount(), cm_table.columnCount()) == (4 * 2, 2)
    cm = np.array([[float(cm_table.item(i, j).text()) for j in range(2)] for i in range(8)])
    np.testing.assert_allclose(cm.reshape(4, 2, 2).sum(1), 1.0, atol=2e-3)
    # Input layers are untouched.
    for name, data_before in before.items():
        np.testing.assert_array_equal(viewer.layers[name].data, data_before)


def test_rerun_replaces_layers_instead_of_adding(sample_3d_viewer, qtbot):
    viewer = sample_3d_viewer
    widget = FuseRatersWidget(viewer)
    widget.method.value = "majority_vote"
    _run(qtbot, widget)
    names = [lyr.name for lyr in viewer.layers]
    truth_layer = viewer.layers["phantom 3d truth [majority_vote]"]
    first = np.array(truth_layer.data)
    # Second run with fewer raters: same layers, new data.
    widget.raters.value = [viewer.layers[RATERS[1]]]
    _run(qtbot, widget)
    assert [lyr.name for lyr in viewer.layers] == names
    assert viewer.layers["phantom 3d truth [majority_vote]"] is truth_layer
    np.testing.assert_array_equal(truth_layer.data, viewer.layers[RATERS[1]].data)
    assert not np.array_equal(first, truth_layer.data)
    # The fusion results are not offered as raters or image.
    assert all("[" not in lyr.name for lyr in widget.raters.value)
    assert all("[" not in name for name, _ in widget._image_choices())


def test_rerun_without_image_keeps_no_image_and_replaces_layers(sample_3d_viewer, qtbot):
    # "No image" (classical methods need none) was replaced by the first image layer as soon
    # as the result layers arrived, so Run again added a second set named after the image.
    viewer = sample_3d_viewer
    widget = FuseRatersWidget(viewer)
    widget.method.value = "majority_vote"
    widget.image.value = None
    _run(qtbot, widget)
    assert widget.image.value is None
    names = [lyr.name for lyr in viewer.layers]
    assert "rater 1 (good) +3 truth [majority_vote]" in names
    _run(qtbot, widget)
    assert [lyr.name for lyr in viewer.layers] == names
    # another rater set fused without an image gets its own layers; the first set's stay
    widget.raters.value = [viewer.layers[n] for n in RATERS[2:]]
    _run(qtbot, widget)
    assert "rater 3 (under) +1 truth [majority_vote]" in viewer.layers
    first = viewer.layers["rater 1 (good) +3 truth [majority_vote]"].data
    every = np.stack([viewer.layers[n].data for n in RATERS])
    np.testing.assert_array_equal(first, rs.fuse(every, method="majority_vote").truth)
    # An image opened later is still picked up.
    new = viewer.add_image(np.zeros(SHAPE, np.float32), name="second scan")
    assert widget.image.value is new


def test_bad_selection_is_a_notification_not_an_exception(sample_3d_viewer, notifications,
                                                          qtbot):
    viewer = sample_3d_viewer
    odd = viewer.add_labels(np.zeros((32, 64, 64), np.int8), name="odd rater")
    widget = FuseRatersWidget(viewer)
    widget.raters.value = [viewer.layers[RATERS[0]], odd]
    n_layers = len(viewer.layers)
    widget.controls.run_button.click()  # must not raise
    qtbot.wait(50)
    assert not widget.controls.busy
    assert len(viewer.layers) == n_layers
    errors = [n for n in notifications if n.severity == "error"]
    assert errors and "odd rater" in str(errors[-1].message)
    assert "same shape" in str(errors[-1].message)


def test_instance_ids_as_rater_labels_are_refused_up_front(sample_3d_viewer, notifications,
                                                          qtbot):
    # Label 70000 (an instance id) made the core infer 70001 classes: STAPLE asked for 78 GB
    # and the notification was torch's allocator error; a smaller id would fill the memory.
    viewer = sample_3d_viewer
    cells = np.array(viewer.layers[RATERS[0]].data, dtype=np.int32)
    cells[cells > 0] = 70000
    bad = viewer.add_labels(cells, name="cell ids")
    widget = FuseRatersWidget(viewer)
    widget.raters.value = [viewer.layers[RATERS[1]], bad]
    n_layers = len(viewer.layers)
    widget.controls.run_button.click()  # must not raise
    qtbot.wait(50)
    assert not widget.controls.busy and len(viewer.layers) == n_layers
    errors = [str(n.message) for n in notifications if n.severity == "error"]
    assert errors and "cell ids" in errors[-1] and "70000" in errors[-1]
    assert "cell ids" in widget.controls.status.text()
    np.testing.assert_array_equal(bad.data, cells)


def test_error_inside_the_core_is_a_notification(sample_3d_viewer, notifications, qtbot):
    viewer = sample_3d_viewer
    widget = FuseRatersWidget(viewer)
    widget.method.value = "majority_vote"
    widget.image.value = None
    # A rater layer holding a label below -1 is refused by the core (in the worker thread).
    bad = viewer.add_labels(np.full(SHAPE, -3, np.int8), name="broken rater")
    widget.raters.value = [viewer.layers[RATERS[0]], bad]
    n_layers = len(viewer.layers)
    outcome = _run(qtbot, widget)
    assert outcome.error is not None
    assert len(viewer.layers) == n_layers
    assert any("raters" in str(n.message) for n in notifications if n.severity == "error")


def test_param_form_follows_method_and_reaches_the_core(sample_3d_viewer, qtbot):
    viewer = sample_3d_viewer
    widget = FuseRatersWidget(viewer)
    for method in rs.available_methods():
        widget.method.value = method
        names = [p.name for p in rs.get_method(method).params()]
        assert [w.name for w in widget.form.container] == names
        assert widget.form.values().keys() <= set(names)
        # The form's defaults are valid parameters for the core (tuples, floats, choices).
        assert rs.create(method, **widget.form.values()).params_dict == \
            rs.create(method).params_dict
    widget.method.value = "staple"
    assert widget.form["max_iterations"].min == 1  # bounds come from the Config
    widget.method.value = "majority_vote"
    widget.form["tie"].value = "undecided"
    widget.raters.value = [viewer.layers[n] for n in RATERS[:2]]
    job, _ = widget.make_job()
    assert job.params == {"tie": "undecided"}
    _run(qtbot, widget)
    assert viewer.layers["phantom 3d truth [majority_vote]"].metadata["params"]["tie"] == \
        "undecided"
    # Two raters disagreeing leaves undecided (-1) voxels.
    assert (viewer.layers["phantom 3d truth [majority_vote]"].data == -1).any()


def test_cancel_during_learned_method_adds_nothing(make_napari_viewer, qtbot, layer_snapshot):
    learned = ["cm"]
    from raterseg.synth import sample_case

    # A small case keeps the test short; 500 epochs make sure Cancel comes mid-training.
    image, raters, _ = sample_case(dims=2, num_raters=2, seed=0, shape=(32, 32))
    viewer = make_napari_viewer()
    viewer.add_image(image, name="small")
    for r in range(2):
        viewer.add_labels(raters[r], name=f"rater {r}")
    before = layer_snapshot(viewer)
    widget = FuseRatersWidget(viewer)
    widget.method.value = learned[0]
    names = [p.name for p in rs.get_method(learned[0]).params()]
    if "epochs" in names:
        widget.form["epochs"].value = 500
    if "features" in names:
        widget.form["features"].value = "4, 8, 16, 32, 64"
    with qtbot.waitSignal(widget.controls.done, timeout=WAIT_MS) as blocker:
        widget.controls.run_button.click()
        # Cancel once the method has reported progress (it is then inside training).
        qtbot.waitUntil(lambda: widget.controls.progress.maximum() > 0, timeout=WAIT_MS)
        assert "epoch" in widget.controls.status.text()
        widget.controls.cancel_button.click()
    assert blocker.args[0].cancelled
    assert [lyr.name for lyr in viewer.layers] == list(before)
    assert widget.last_result is None
    assert "Cancelled" in widget.controls.status.text()
    assert widget.controls.run_button.isEnabled()


def test_closing_the_widget_mid_run_adds_nothing(sample_3d_viewer, qtbot):
    from qtpy.QtCore import QThreadPool

    viewer = sample_3d_viewer
    names = [lyr.name for lyr in viewer.layers]
    widget = FuseRatersWidget(viewer)
    widget.method.value = "majority_vote"
    widget.controls.run_button.click()
    job = widget.controls.job
    widget.deleteLater()
    qtbot.waitUntil(lambda: job.cancelled, timeout=WAIT_MS)
    QThreadPool.globalInstance().waitForDone(WAIT_MS)
    qtbot.wait(100)  # let queued signals arrive
    assert [lyr.name for lyr in viewer.layers] == names


def test_closing_the_dock_mid_run_cancels_the_job(make_napari_viewer, qtbot):
    # napari's dock close button takes the widget out of the dock without deleting it (the
    # running job keeps it alive): the training went on and its layers appeared later.
    _needs("cm")
    from napari_raterseg._sample_data import make_sample_2d

    viewer = make_napari_viewer()
    for data, kwargs, ltype in make_sample_2d():
        getattr(viewer, f"add_{ltype}")(np.array(data, copy=True), **kwargs)
    names = [lyr.name for lyr in viewer.layers]
    dock, widget = viewer.window.add_plugin_dock_widget("napari-raterseg", "Fuse raters")
    widget.method.value = "cm"
    widget.form["epochs"].value = 200
    widget.form["features"].value = "4, 4, 8, 8, 16"
    with qtbot.waitSignal(widget.controls.done, timeout=WAIT_MS) as blocker:
        widget.controls.run_button.click()
        qtbot.wait(300)
        dock.destroyOnClose()  # what the dock's "x" button does
    assert blocker.args[0].cancelled
    assert [lyr.name for lyr in viewer.layers] == names


def test_renaming_the_chosen_image_keeps_it_chosen_in_both_docks(make_napari_viewer, qtbot):
    """napari refreshes docked widgets' lists when a layer is renamed; matching by text,
    the Fuse dock fell back to no image (its next run was named 'raters …' and refused
    learned methods) and the Apply dock to another image (Predict on the wrong image)."""
    from napari_raterseg._apply_widget import ApplyModelWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((16, 16), np.float32), name="other image")
    img = viewer.add_image(np.random.default_rng(0).random((16, 16), np.float32), name="img")
    for r in range(2):
        lab = np.zeros((16, 16), np.uint8)
        lab[4:12, 4 + r:12] = 1
        viewer.add_labels(lab, name=f"rater {r}")
    fuse, apply_ = FuseRatersWidget(viewer), ApplyModelWidget(viewer)
    viewer.window.add_dock_widget(fuse)
    viewer.window.add_dock_widget(apply_)
    fuse.image.value = img
    apply_.image.value = img
    img.name = "patient 7"
    assert fuse.image.value is img and apply_.image.value is img
    assert fuse.image.native.currentText() == "patient 7"
    fuse.method.value = "majority_vote"
    assert _run(qtbot, fuse).error is None
    assert "patient 7 truth [majority_vote]" in viewer.layers
    # a chosen "no image" stays so too
    fuse.image.value = None
    viewer.layers["rater 0"].name = "rater zero"
    assert fuse.image.value is None


def _not_started(widget, notifications) -> str:
    """Press Run on a selection that is refused; the message the user sees."""
    widget.controls.run_button.click()
    assert not widget.controls.busy
    errors = [n for n in notifications if n.severity == "error"]
    assert errors and widget.controls.status.text().startswith("Not started")
    return str(errors[-1].message)


def test_refused_selections_say_what_to_do(make_napari_viewer, notifications):
    viewer = make_napari_viewer()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    # masks opened by napari's own PNG/TIFF reader are Image layers: the raters list is empty
    viewer.add_image(np.random.default_rng(0).random((16, 16)), name="slice")
    viewer.add_image(mask, name="mask a")
    viewer.add_image(np.roll(mask, 1, 0), name="mask b")
    widget = FuseRatersWidget(viewer)
    assert widget.raters.value == []
    msg = _not_started(widget, notifications)
    assert "'mask a', 'mask b'" in msg and "Convert to Labels" in msg and "slice" not in msg
    # a volume with raters drawn on one 2D slice: its slices are not fused as channels
    vol = viewer.add_image(np.zeros((8, 16, 16), np.float32), name="ct")
    rater = viewer.add_labels((mask > 0).astype(np.uint8), name="slice rater")
    widget.image.value, widget.raters.value = vol, [rater]
    msg = _not_started(widget, notifications)
    assert "'ct' is a volume (8, 16, 16)" in msg and "3D Labels layers" in msg
    # an image that fits in no way: the shapes a user would recognise
    rater3d = viewer.add_labels(np.zeros((4, 16, 16), np.uint8), name="rater 3d")
    widget.image.value = viewer.layers["slice"]
    widget.raters.value = [rater3d]
    msg = _not_started(widget, notifications)
    assert "(4, 16, 16) (the rater layers' shape) or (C, 4, 16, 16)" in msg
    assert not any("truth" in lyr.name for lyr in viewer.layers)


def test_rater_table_shows_how_much_each_rater_annotated(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    full = np.zeros((16, 16), np.int16)
    full[4:12, 4:12] = 1
    partial = full.copy()
    partial[:, 12:] = -1  # the right quarter not annotated; the rest agrees with the truth
    for name, lab in (("full", full), ("partial", partial), ("third", full)):
        viewer.add_labels(lab, name=name)
    widget = FuseRatersWidget(viewer)
    widget.method.value = "majority_vote"
    assert _run(qtbot, widget).error is None
    table = widget.results.rater_table
    heads = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert heads == ["sensitivity", "specificity", "Dice", "annotated"]
    rows = {table.verticalHeaderItem(r).text(): [table.item(r, c).text()
                                                 for c in range(table.columnCount())]
            for r in range(table.rowCount())}
    assert rows["full"] == ["1.000", "1.000", "1.000", "1.000"]
    assert rows["partial"] == ["1.000", "1.000", "1.000", "0.750"]
    assert "on the voxels it annotated" in widget.results.title.text()
    assert "-1" in table.horizontalHeaderItem(3).toolTip()

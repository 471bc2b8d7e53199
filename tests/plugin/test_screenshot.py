"""A shown viewer after fusing the 3D sample with STAPLE: the screenshot used in the README.

``RATERSEG_SCREENSHOTS=1 pytest tests/plugin/test_screenshot.py`` also writes it to
``docs/images/fuse_3d_staple.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_raterseg._widget import FuseRatersWidget

DOCS_IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"


def test_screenshot_after_fusion_shows_truth_and_uncertainty(make_napari_viewer,
                                                             sample_3d_layers, qtbot, tmp_path):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1600, 1150)
    for data, kwargs, ltype in sample_3d_layers:
        getattr(viewer, f"add_{ltype}")(np.array(data, copy=True), **kwargs)
    widget = FuseRatersWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fuse raters", area="right")
    widget.method.value = "staple"
    with qtbot.waitSignal(widget.controls.done, timeout=60_000):
        widget.controls.run_button.click()
    truth = viewer.layers["phantom 3d truth [staple]"]
    unc = viewer.layers["phantom 3d uncertainty [staple]"]
    # The view of the README: the raters' outlines, the fused truth filled, the uncertainty
    # glowing on top (additive), on the middle slice.
    for lyr in viewer.layers:
        if lyr.name.startswith("rater "):
            lyr.visible, lyr.contour, lyr.opacity = True, 1, 1.0
    truth.opacity = 0.45
    viewer.layers.selection.active = truth
    viewer.dims.set_point(0, 32)
    viewer.reset_view()
    qtbot.wait(300)

    def changed_by(layer) -> float:
        """Share of canvas pixels that change when ``layer`` is hidden."""
        shown = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        layer.visible = False
        hidden = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
        layer.visible = True
        return float((np.abs(shown - hidden).sum(-1) > 30).mean())

    # Both the truth and the uncertainty are drawn where a user can see them.
    truth_share = changed_by(truth)
    unc_share = changed_by(unc)
    fg_share = float((truth.data[32] > 0).mean())
    assert 0.3 * fg_share < truth_share < 1.0
    assert unc_share > 0
    path = tmp_path / "window.png"
    window = viewer.screenshot(str(path), canvas_only=False, flash=False)
    assert path.stat().st_size > 10_000
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert window.shape[1] > canvas.shape[1]  # the dock with the tables is in it
    if os.environ.get("RATERSEG_SCREENSHOTS"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(str(DOCS_IMAGES / "fuse_3d_staple.png"), canvas_only=False,
                          flash=False)

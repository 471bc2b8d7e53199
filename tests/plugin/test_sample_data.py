"""Sample data: 2D and 3D multi-rater phantoms, opened through the plugin."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from napari_raterseg._sample_data import make_sample_2d

KINDS = ["good", "over", "under", "wrong"]


def test_2d_sample_opens_with_distinct_raters(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-raterseg", "phantom_2d")
    assert [lyr._type_string for lyr in layers] == ["image"] + ["labels"] * 4
    assert [lyr.name for lyr in layers] == ["phantom 2d"] + [
        f"rater {i + 1} ({k})" for i, k in enumerate(KINDS)]
    image = layers[0].data
    assert image.shape == (128, 128) and image.dtype == np.float32
    raters = np.stack([lyr.data for lyr in layers[1:]])
    area = {k: int((r > 0).sum()) for k, r in zip(KINDS, raters)}
    # Behaviours a user can see: over-segmenting > good > under-segmenting, all different.
    assert area["over"] > area["good"] > area["under"] > 0
    assert len({r.tobytes() for r in raters}) == 4
    # The image shows the object: brighter inside the good rater's mask than outside.
    assert image[raters[0] > 0].mean() > image[raters[0] == 0].mean() + 0.2


def test_3d_sample_shapes(sample_3d_layers):
    assert [kind for *_, kind in sample_3d_layers] == ["image"] + ["labels"] * 4
    for data, _, _ in sample_3d_layers:
        assert data.shape == (64, 128, 128)


def test_sample_data_never_imports_torch_or_qt():
    code = ("import sys; from napari_raterseg._sample_data import make_sample_2d; "
            "make_sample_2d(); import napari_raterseg._reader, napari_raterseg._writer; "
            "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'magicgui', 'monai') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_same_sample_every_time():
    a, b = make_sample_2d(), make_sample_2d()
    for (da, ka, _), (db, kb, _) in zip(a, b):
        assert ka["name"] == kb["name"]
        np.testing.assert_array_equal(da, db)

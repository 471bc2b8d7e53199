"""Writer round trips: Labels and Image layers to NIfTI and TIFF, read back by the readers."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from napari_raterseg._reader import read_files
from napari_raterseg._writer import write_image, write_labels


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".tif", ".tiff"])
def test_labels_round_trip(make_napari_viewer, tmp_path, suffix):
    labels = np.zeros((5, 16, 20), np.int16)
    labels[1:4, 3:12, 5:15] = 1
    labels[2, 6:8, 8:10] = 2
    viewer = make_napari_viewer()
    layer = viewer.add_labels(labels, name="seg", scale=(3.0, 0.5, 0.25))
    path = tmp_path / f"seg{suffix}"
    written = layer.save(str(path), plugin="napari-raterseg")
    assert [os.path.basename(p) for p in written] == [path.name]
    ((data, kw, kind),) = read_files(str(path))
    assert kind == "labels" and data.dtype.kind in "iu"
    np.testing.assert_array_equal(data, labels)
    assert kw["scale"] == pytest.approx((3.0, 0.5, 0.25))  # TIFF too (it came back 1, 1, 1)
    # Written atomically: nothing but the target is left in the folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    np.testing.assert_array_equal(layer.data, labels)  # the layer is untouched


def test_image_round_trip_keeps_source_geometry(make_napari_viewer, tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(7, 8, 9)).astype(np.float32)
    affine = np.array([[0.0, 0.0, -0.9, 10.0], [0.0, 0.9, 0.0, -5.0],
                       [2.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "src.nii.gz")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "src.nii.gz"), plugin="napari-raterseg")
    out = tmp_path / "out" / "copy.nii.gz"
    assert layer.save(str(out), plugin="napari-raterseg") == [str(out)]
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine)  # the source file's orientation survives
    np.testing.assert_array_equal(np.asarray(back.dataobj), vol)


def test_image_tiff_and_refused_ending(tmp_path):
    img = np.linspace(0, 1, 60, dtype=np.float32).reshape(6, 10)
    assert write_image(str(tmp_path / "img.tif"), img, {"scale": (1.0, 1.0)}) == [
        str(tmp_path / "img.tif")]
    ((data, _, kind),) = read_files(str(tmp_path / "img.tif"))
    assert kind == "image"
    np.testing.assert_array_equal(data, img)
    assert write_labels(str(tmp_path / "x.png"), img.astype(np.uint8), {}) == []
    assert not (tmp_path / "x.png").exists()


def test_rgb_image_keeps_its_pixel_size_on_the_right_axes(tmp_path):
    # An RGB layer's scale covers (H, W); the colour axis is last. Written as (16, 20, 3) its
    # pixel size went to the wrong axes: read back with scale (1, 0.5, 0.25).
    rgb = np.random.default_rng(0).random((16, 20, 3)).astype(np.float32)
    write_image(str(tmp_path / "photo.nii.gz"), rgb, {"scale": (0.5, 0.25), "rgb": True})
    ((data, kw, _),) = read_files(str(tmp_path / "photo.nii.gz"))
    np.testing.assert_array_equal(data, rgb)
    assert kw["scale"] == pytest.approx((0.5, 0.25, 1.0))


def test_rgb_image_layer_saved_as_tiff_stays_a_colour_image(tmp_path):
    # written as a colour TIFF (other software sees one RGB page, not 16 slices of 20x3)
    # and opened again as an RGB layer with its pixel size
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 256, (16, 20, 3)).astype(np.uint8)
    write_image(str(tmp_path / "photo.tif"), rgb, {"scale": (0.5, 0.25), "rgb": True})
    with tifffile.TiffFile(tmp_path / "photo.tif") as tif:
        assert len(tif.pages) == 1 and tif.pages[0].photometric == 2
    ((data, kw, kind),) = read_files(str(tmp_path / "photo.tif"))
    assert kind == "image" and kw["rgb"] is True
    np.testing.assert_array_equal(data, rgb)
    assert kw["scale"] == pytest.approx((0.5, 0.25))

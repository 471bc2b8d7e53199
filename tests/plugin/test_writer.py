"""Writer round trips: Labels and Image layers to NIfTI and TIFF, read back by the readers;
several layers at once to a folder of NIfTI files."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from napari_raterseg._reader import read_files
from napari_raterseg._writer import write_image, write_labels, write_layers


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


def test_several_result_layers_save_as_one_nifti_each(make_napari_viewer, tmp_path):
    # File > Save Selected Layers with a truth (Labels) and an uncertainty (Image) offered
    # no NIfTI and 'results.nii.gz' saved nothing; now a folder of NIfTI files, each on the
    # source image's grid, that the CLI and the reader open again.
    from napari.plugins._npe2 import file_extensions_string_for_layers
    from raterseg.cli import main

    from napari_raterseg.api import fuse_layers

    vol = np.random.default_rng(0).normal(size=(9, 10, 4)).astype(np.float32)  # (x, y, z)
    affine = np.array([[0.8, 0.0, 0.0, -20.0], [0.0, 0.8, 0.0, 7.0],
                       [0.0, 0.0, 3.0, 40.0], [0.0, 0.0, 0.0, 1.0]])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "ct.nii.gz")
    viewer = make_napari_viewer()
    (image,) = viewer.open(str(tmp_path / "ct.nii.gz"), plugin="napari-raterseg")
    truth = np.zeros((4, 10, 9), np.int16)
    truth[1:3, 2:8, 2:7] = 1
    for r, shift in enumerate((0, 1, -1)):
        viewer.add_labels(np.roll(truth, shift, axis=2), name=f"r{r}", scale=image.scale)
    fuse_layers(viewer, "ct", None, "staple")
    chosen = [viewer.layers["ct truth [staple]"], viewer.layers["ct uncertainty [staple]"]]
    ext_str, _ = file_extensions_string_for_layers(chosen)
    assert "raterseg layers" in ext_str and "*.nii.gz" in ext_str  # in the Save dialog
    viewer.layers.selection = set(chosen)
    saved = viewer.layers.save(str(tmp_path / "results.nii.gz"), selected=True)
    out = tmp_path / "results"
    assert saved == [str(out / "ct truth [staple].nii.gz"),
                     str(out / "ct uncertainty [staple].nii.gz")]
    assert sorted(p.name for p in out.iterdir()) == sorted(os.path.basename(p) for p in saved)
    for path, layer in zip(saved, chosen):
        back = nib.load(path)
        np.testing.assert_allclose(back.affine, affine)  # on the CT's grid
        np.testing.assert_allclose(np.asarray(back.dataobj).T, layer.data, atol=1e-6)
    layers = read_files(saved)
    assert [k for *_, k in layers] == ["labels", "image"]
    assert layers[0][1]["scale"] == pytest.approx((3.0, 0.8, 0.8))
    np.testing.assert_array_equal(layers[0][0], chosen[0].data)
    # the saved truth is a rater file for the CLI
    assert main(["fuse", saved[0], str(out / "ct truth [staple].nii.gz"), "-m",
                 "majority_vote", "-o", str(tmp_path / "cli"), "-q"]) == 0
    assert (tmp_path / "cli" / "truth.nii.gz").exists()


def test_several_layers_refused_before_anything_is_written(tmp_path):
    from raterseg import RaterSegError

    lab = np.zeros((4, 5), np.uint8)
    img = np.ones((4, 5), np.float32)
    layers = [(lab, {"name": "case a/b", "scale": (1.0, 1.0)}, "labels"),
              (img, {"name": "case a:b", "scale": (1.0, 1.0)}, "image")]
    with pytest.raises(RaterSegError, match=r"layers: 'case a/b' and 'case a:b' would both "
                                            r"be saved as 'case a_b.nii.gz'"):
        write_layers(str(tmp_path / "out"), layers)
    (tmp_path / "taken").write_text("a file")
    layers[1][1]["name"] = "odd ?*<name>. "
    with pytest.raises(RaterSegError, match="path: expected a folder, got the file"):
        write_layers(str(tmp_path / "taken"), layers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written
    assert write_layers(str(tmp_path / "out"), layers) == [
        str(tmp_path / "out" / "case a_b.nii.gz"), str(tmp_path / "out" / "odd ___name_.nii.gz")]

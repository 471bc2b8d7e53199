"""Readers on real files: the LIDC-IDRI-slices folder, NIfTI written by nibabel, TIFF, PNG,
NPY/NPZ and a case folder; each returns None for paths it does not handle."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_raterseg import _reader as rd


def _blob(shape, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(100, 30, shape).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(s // 4, 3 * s // 4) for s in shape)] = 1
    return img, lab


def _layers_by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


# -- LIDC-IDRI-slices ------------------------------------------------------------------


def test_lidc_nodule_folder_gives_volume_and_four_raters(lidc_slices):
    nodule = lidc_slices / "LIDC-IDRI-0003" / "nodule-1"
    n_slices = len(list((nodule / "images").glob("slice-*.png")))
    reader = rd.get_lidc_reader(str(nodule))
    assert reader is not None
    layers = reader(str(nodule))
    assert [kind for *_, kind in layers] == ["image"] + ["labels"] * 4
    image, kw, _ = layers[0]
    assert image.shape == (n_slices, 128, 128) and kw["name"] == "LIDC-IDRI-0003/nodule-1"
    assert [kw["name"] for _, kw, _ in layers[1:]] == ["mask-0", "mask-1", "mask-2", "mask-3"]
    for data, kw, _ in layers[1:]:
        assert data.shape == image.shape
        assert set(np.unique(data)) <= {-1, 0, 1}  # 0/255 PNG masks became labels 0/1
        assert kw["scale"] == (1.0, 1.0, 1.0)
    # The radiologists marked a nodule, and not all in the same place.
    masks = np.stack([d for d, _, _ in layers[1:]])
    assert (masks == 1).any(axis=(1, 2, 3)).sum() >= 2
    assert not (masks == masks[:1]).all()
    # The image is the CT crop, not a mask.
    assert np.unique(image).size > 50


def test_lidc_reader_declines_other_folders(lidc_slices, tmp_path):
    assert rd.get_lidc_reader(str(lidc_slices)) is None  # the collection, not a nodule
    assert rd.get_lidc_reader(str(lidc_slices / "LIDC-IDRI-0003")) is None  # 4 nodules
    assert rd.get_lidc_reader(str(lidc_slices / "LIDC-IDRI-0001")) is not None  # one nodule
    assert rd.get_lidc_reader(str(tmp_path)) is None
    png = next((lidc_slices / "LIDC-IDRI-0001").rglob("slice-0.png"))
    assert rd.get_lidc_reader(str(png)) is None


def test_viewer_opens_lidc_folder_through_the_plugin(lidc_slices, make_napari_viewer):
    # lidc_slices first: it skips before a viewer exists (napari's fixture errors at
    # teardown when the test skipped after creating it).
    viewer = make_napari_viewer()
    layers = viewer.open(str(lidc_slices / "LIDC-IDRI-0005" / "nodule-0"),
                         plugin="napari-raterseg")
    assert [lyr._type_string for lyr in layers] == ["image"] + ["labels"] * 4
    assert [lyr.name for lyr in layers[1:]] == ["mask-0", "mask-1", "mask-2", "mask-3"]


# -- NIfTI -----------------------------------------------------------------------------


def test_nifti_image_and_labels_with_scale_from_header(tmp_path):
    img, lab = _blob((10, 12, 14))  # numpy (x, y, z) as nibabel stores it
    affine = np.diag([0.7, 0.5, 2.5, 1.0])
    nib.save(nib.Nifti1Image(img, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "mask.nii")
    for name in ("ct.nii.gz", "mask.nii"):
        assert rd.get_nifti_reader(str(tmp_path / name)) is not None
    assert rd.get_nifti_reader(str(tmp_path / "ct.tif")) is None
    assert rd.get_nifti_reader(str(tmp_path)) is None
    layers = _layers_by_name(rd.get_nifti_reader([str(tmp_path / "ct.nii.gz")])(
        [str(tmp_path / "ct.nii.gz")]) + rd.read_files(str(tmp_path / "mask.nii")))
    data, kw, kind = layers["ct"]
    assert kind == "image"
    # Axes reversed to (D, H, W) = (z, y, x); the header's voxel size becomes the scale.
    np.testing.assert_array_equal(data, img.T)
    assert kw["scale"] == pytest.approx((2.5, 0.5, 0.7))
    data, kw, kind = layers["mask"]
    assert kind == "labels" and data.dtype.kind in "iu"
    np.testing.assert_array_equal(data, lab.T)
    assert kw["scale"] == pytest.approx((2.5, 0.5, 0.7))


def test_viewer_opens_nifti_through_the_plugin(make_napari_viewer, tmp_path):
    img, _ = _blob((8, 9, 10))
    nib.save(nib.Nifti1Image(img, np.diag([1.0, 1.0, 3.0, 1.0])), tmp_path / "vol.nii.gz")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(tmp_path / "vol.nii.gz"), plugin="napari-raterseg")
    assert layer._type_string == "image" and layer.data.shape == (10, 9, 8)
    np.testing.assert_allclose(layer.scale, (3.0, 1.0, 1.0))


# -- TIFF ------------------------------------------------------------------------------


def test_tiff_image_and_labels(tmp_path):
    img, lab = _blob((6, 20, 24))
    tifffile.imwrite(tmp_path / "stack.tif", (img * 10).astype(np.uint16), imagej=True,
                     metadata={"spacing": 4.0, "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "seg.tiff", lab)
    assert rd.get_tiff_reader(str(tmp_path / "stack.nii")) is None
    layers = _layers_by_name(rd.get_tiff_reader(str(tmp_path / "stack.tif"))(
        str(tmp_path / "stack.tif")) + rd.read_files(str(tmp_path / "seg.tiff")))
    data, kw, kind = layers["stack"]
    assert kind == "image" and data.shape == (6, 20, 24)
    assert kw["scale"] == pytest.approx((4.0, 1.0, 1.0))
    data, kw, kind = layers["seg"]
    assert kind == "labels"
    np.testing.assert_array_equal(data, lab)


# -- PNG -------------------------------------------------------------------------------


def test_png_masks_open_as_labels_and_photos_as_images(make_napari_viewer, tmp_path):
    # Masks saved by image tools (0/255 grey, 1-bit, 0/1) opened as Image layers (napari's
    # own reader) could not be picked as raters; the CLI reads them as 0/1 labels.
    from PIL import Image

    from napari_raterseg.api import fuse_layers

    img, lab = _blob((40, 50))
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(lab * np.uint8(255)).save(tmp_path / "a.png")
    Image.fromarray(np.roll(lab, 2, 0).astype(bool)).save(tmp_path / "b.png")  # 1-bit
    Image.fromarray(np.roll(lab, -2, 1)).save(tmp_path / "c.png")  # 0/1
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(tmp_path / "slice.png")
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=200).save(
        tmp_path / "indexed.png")  # a quantised photo: a palette of colours
    viewer = make_napari_viewer()
    layers = {}
    for name in ("a", "b", "c", "slice", "photo", "indexed"):
        (layer,) = viewer.open(str(tmp_path / f"{name}.png"), plugin="napari-raterseg")
        layers[name] = layer
    for name, expected in (("a", lab), ("b", np.roll(lab, 2, 0)), ("c", np.roll(lab, -2, 1))):
        assert layers[name]._type_string == "labels", name
        np.testing.assert_array_equal(layers[name].data, expected)  # 0/1, not 0/255
    assert layers["slice"]._type_string == "image" and not layers["slice"].rgb
    assert layers["photo"]._type_string == "image" and layers["photo"].rgb
    np.testing.assert_array_equal(layers["photo"].data, photo)
    indexed = layers["indexed"]  # shown in its colours, not as grey palette indices
    assert indexed._type_string == "image" and indexed.rgb and indexed.data.shape == (40, 50, 3)
    assert np.abs(indexed.data.astype(int) - photo).mean() < 40
    # the masks are raters: a binary fusion, on the slice
    res = fuse_layers(viewer, "slice", ["a", "b", "c"], "majority_vote")
    assert res.probabilities.shape == (2, 40, 50)


def test_png_reader_declines_what_it_cannot_read(tmp_path):
    from PIL import Image

    _, lab = _blob((8, 8))
    Image.fromarray(lab * np.uint8(255)).save(tmp_path / "mask.png")
    Image.fromarray(lab * np.uint8(255)).save(tmp_path / "really_a.png", format="JPEG")
    (tmp_path / "folder.png").mkdir()
    assert rd.get_png_reader(str(tmp_path / "mask.png")) is not None
    assert rd.get_png_reader([str(tmp_path / "mask.png")] * 2) is not None
    assert rd.get_png_reader(str(tmp_path / "really_a.png")) is None  # a JPEG named .png
    assert rd.get_png_reader(str(tmp_path / "folder.png")) is None
    assert rd.get_png_reader(str(tmp_path / "missing.png")) is None
    assert rd.get_png_reader(str(tmp_path / "mask.jpg")) is None
    assert rd.get_png_reader([str(tmp_path / "mask.png"), str(tmp_path / "really_a.png")]) is None


# -- NPY / NPZ -------------------------------------------------------------------------


def test_npy_and_multi_rater_npz(tmp_path):
    img, lab = _blob((16, 16))
    raters = np.stack([lab, np.roll(lab, 1, 0), np.roll(lab, -1, 1)]).astype(np.int16)
    np.save(tmp_path / "picture.npy", img)
    np.savez(tmp_path / "case.npz", image=img, raters=raters)
    assert rd.get_numpy_reader(str(tmp_path / "picture.tif")) is None
    ((data, kw, kind),) = rd.get_numpy_reader(str(tmp_path / "picture.npy"))(
        str(tmp_path / "picture.npy"))
    assert kind == "image" and kw["name"] == "picture"
    np.testing.assert_array_equal(data, img)
    layers = rd.read_files(str(tmp_path / "case.npz"))
    assert [k for *_, k in layers] == ["image", "labels", "labels", "labels"]
    assert [kw["name"] for _, kw, _ in layers] == ["case image"] + [
        f"case rater {r}" for r in range(3)]
    for r in range(3):
        np.testing.assert_array_equal(layers[1 + r][0], raters[r])


def test_npz_dataset_with_raters_second_becomes_one_layer_per_rater(tmp_path):
    # The layout of lidc_dev.npz: images (N, H, W), masks bool (N, R, H, W).
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 8, 8), dtype=np.uint8)
    masks = rng.random((5, 4, 8, 8)) > 0.5
    np.savez(tmp_path / "lidc_like.npz", images=images, masks=masks,
             ids=np.array([f"case-{i}" for i in range(5)]))
    layers = rd.read_files(str(tmp_path / "lidc_like.npz"))
    assert [k for *_, k in layers] == ["image"] + ["labels"] * 4
    for r in range(4):
        np.testing.assert_array_equal(layers[1 + r][0], masks[:, r])


# -- case folders ----------------------------------------------------------------------


def test_case_folder_gives_image_and_one_layer_per_rater(tmp_path):
    img, lab = _blob((6, 10, 12))
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    case = tmp_path / "patient7"
    case.mkdir()
    nib.save(nib.Nifti1Image(img.T, affine), case / "image.nii.gz")
    names = ["rater_alice", "rater_bob", "rater_carol"]
    for i, n in enumerate(names):
        nib.save(nib.Nifti1Image(np.roll(lab, i, 2).T, affine), case / f"{n}.nii.gz")
    (case / "notes.txt").write_text("not a rater")
    reader = rd.get_case_reader(str(case))
    assert reader is not None
    layers = reader(str(case))
    assert [kw["name"] for _, kw, _ in layers] == ["patient7"] + names
    assert [k for *_, k in layers] == ["image", "labels", "labels", "labels"]
    np.testing.assert_allclose(layers[0][0], img)
    for i, (data, kw, _) in enumerate(layers[1:]):
        np.testing.assert_array_equal(data, np.roll(lab, i, 2))
        assert kw["scale"] == pytest.approx((3.0, 0.8, 0.8))


def test_unannotated_voxels_show_grey_in_the_viewer(make_napari_viewer, tmp_path):
    """A rater file marks what the rater left out as -1; napari's default colormap would
    paint it like a label (pink), so the region would look drawn."""
    _, lab = _blob((6, 10, 12))
    partial = lab.astype(np.int16) * 2  # classes 0 and 2 ...
    partial[:, :, 6:] = -1  # ... and the right half not annotated
    case = tmp_path / "case"
    case.mkdir()
    nib.save(nib.Nifti1Image(partial.T, np.eye(4)), case / "rater_ann.nii.gz")
    nib.save(nib.Nifti1Image(lab.T, np.eye(4)), case / "rater_ben.nii.gz")
    viewer = make_napari_viewer()
    ann, ben = viewer.open(str(case), plugin="napari-raterseg")
    np.testing.assert_array_equal(ann.data, partial)  # the data are unchanged
    colours = ann.colormap.map(np.array([-1, 0, 2]))
    assert colours[1, 3] == 0  # background: transparent
    grey = colours[0]  # not annotated: a faint grey, neither a label colour nor background
    assert grey[0] == grey[1] == grey[2] and 0 < grey[3] < 0.5
    # the drawn labels keep the colour any Labels layer gives them
    plain = viewer.add_labels(np.array([[0, 1, 2]], np.int16))
    np.testing.assert_allclose(colours[2], plain.colormap.map(np.array([2]))[0])
    np.testing.assert_allclose(ben.colormap.map(np.array([1])),
                               plain.colormap.map(np.array([1])))
    # the same for a single labels file opened on its own
    (layer,) = viewer.open(str(case / "rater_ann.nii.gz"), plugin="napari-raterseg")
    np.testing.assert_allclose(layer.colormap.map(np.array([-1]))[0], grey)


def test_case_reader_declines_files_and_plain_folders(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "image.npy").write_bytes(b"")
    assert rd.get_case_reader(str(tmp_path / "plain")) is None
    assert rd.get_case_reader(str(tmp_path / "plain" / "image.npy")) is None
    assert rd.get_case_reader(["a", "b"]) is None


def test_corrupt_file_raises_a_clear_error(tmp_path):
    from raterseg import RaterSegError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not nifti")
    with pytest.raises(RaterSegError, match="broken.nii.gz"):
        rd.get_nifti_reader(str(bad))(str(bad))


def test_labels_heuristic():
    def labels(arr, name=""):
        return rd.labels_or_none(arr, name) is not None

    assert labels(np.zeros((4, 4), bool))
    assert labels(np.arange(16).reshape(4, 4) % 3)
    assert not labels(np.arange(4096).reshape(64, 64).astype(np.int16))
    assert not labels(np.zeros((4, 4), np.float32))
    # a float file holding only 0/1 or 0/255 is a binary mask whatever its name (ITK tools)
    binary = (np.arange(16).reshape(4, 4) % 2).astype(np.float32)
    assert labels(binary, "float1") and labels(binary * 255, "f")
    assert not labels(binary * 2, "f") and not labels(binary + 1, "f")
    many = (np.arange(4096).reshape(64, 64) % 200).astype(np.uint8)
    assert not labels(many, "ct")
    assert labels(many, "liver_mask")
    # what comes back is the label map: 0/255 as 0/1, round-off floats as whole numbers
    np.testing.assert_array_equal(rd.labels_or_none(binary * 255, "f"), binary)
    got = rd.labels_or_none(binary * np.float32(0.99999994), "seg")
    assert got.dtype.kind == "i"
    np.testing.assert_array_equal(got, binary)


def test_rater_files_saved_as_float_or_0_255_open_as_binary_labels(make_napari_viewer, tmp_path):
    # ITK tools save masks as float32 0/1, image tools as uint8 0/255; the CLI (read_labels)
    # reads both as 0/1 labels, so opening them one by one in napari must too: a float mask
    # opened as an Image layer cannot be picked as a rater, and 0/255 fused into 256 classes.
    _, lab = _blob((6, 10, 12))
    nib.save(nib.Nifti1Image(lab.astype(np.float32), np.eye(4)), tmp_path / "rater_a.nii.gz")
    nib.save(nib.Nifti1Image(lab * np.uint8(255), np.eye(4)), tmp_path / "rater_b.nii.gz")
    tifffile.imwrite(tmp_path / "rater_c_mask.tif", lab[3] * np.uint8(255))
    for name, expected in (("rater_a.nii.gz", lab), ("rater_b.nii.gz", lab),
                           ("rater_c_mask.tif", lab[3])):
        ((data, _, kind),) = rd.read_files(str(tmp_path / name))
        assert kind == "labels", name
        assert data.dtype.kind in "iu", name
        assert np.unique(data).tolist() == [0, 1] and data.sum() == expected.sum(), name
    # A float file that is no label map stays an image, whatever its name.
    frac = lab.astype(np.float32) * 0.5
    nib.save(nib.Nifti1Image(frac, np.eye(4)), tmp_path / "seg_prob.nii.gz")
    assert rd.read_files(str(tmp_path / "seg_prob.nii.gz"))[0][2] == "image"
    # Fused in the viewer, the two rater files give a binary result.
    from napari_raterseg.api import fuse_layers

    viewer = make_napari_viewer()
    layers = viewer.open([str(tmp_path / "rater_a.nii.gz"), str(tmp_path / "rater_b.nii.gz")],
                         plugin="napari-raterseg")
    res = fuse_layers(viewer, None, [lyr.name for lyr in layers], "majority_vote")
    assert res.probabilities.shape[0] == 2


def test_npz_raters_saved_as_0_255_or_float_are_binary_labels(tmp_path):
    img, lab = _blob((16, 16))
    np.savez(tmp_path / "a.npz", image=img, raters=np.stack([lab, lab]) * np.uint8(255))
    np.savez(tmp_path / "b.npz", image=img, raters=np.stack([lab, lab]).astype(np.float64))
    for name in ("a.npz", "b.npz"):
        layers = rd.read_files(str(tmp_path / name))
        assert [k for *_, k in layers] == ["image", "labels", "labels"]
        for data, _, _ in layers[1:]:
            assert data.dtype.kind in "iu"
            np.testing.assert_array_equal(data, lab)


def test_float_round_off_masks_open_as_the_labels_the_cli_reads(tmp_path):
    # float32 0.99999994 (a mask resampled or saved through float arithmetic) is label 1 for
    # the CLI (read_labels rounds values within 1e-3 of a whole number); a plain astype made
    # it 0, an empty mask, and the strict check opened it as an image
    from raterseg import RaterSegError
    from raterseg.datasets import read_labels

    img, lab = _blob((6, 10, 12))
    off = (lab * np.float32(0.99999994)).astype(np.float32)
    assert (off[lab == 1] < 1).all()
    nib.save(nib.Nifti1Image(off, np.eye(4)), tmp_path / "rater_a.nii.gz")
    ((data, _, kind),) = rd.read_files(str(tmp_path / "rater_a.nii.gz"))
    assert kind == "labels" and data.dtype.kind in "iu"
    np.testing.assert_array_equal(data, read_labels(tmp_path / "rater_a.nii.gz")[0])
    assert data.sum() == lab.sum()
    np.testing.assert_array_equal(rd.as_labels(off[3] + np.float32(1.0000001)), lab[3] + 1)
    # .npz raters too; fractions are still refused there, naming the array
    np.savez(tmp_path / "c.npz", image=img[3], raters=np.stack([off[3], off[3]]))
    layers = rd.read_files(str(tmp_path / "c.npz"))
    assert [k for *_, k in layers] == ["image", "labels", "labels"]
    np.testing.assert_array_equal(layers[1][0], lab[3])
    np.savez(tmp_path / "d.npz", image=img[3], raters=np.stack([lab[3] * 0.5] * 2))
    with pytest.raises(RaterSegError, match=r"raters \('.*d.npz'\): expected integer class labels"):
        rd.read_files(str(tmp_path / "d.npz"))


def test_rgb_tiff_opens_as_an_rgb_image_layer(tmp_path):
    colour = np.random.default_rng(0).integers(0, 256, (10, 12, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "he.tif", colour, photometric="rgb", resolution=(40.0, 20.0),
                     resolutionunit="CENTIMETER", metadata=None)  # as a scanner writes it
    ((data, kw, kind),) = rd.read_files(str(tmp_path / "he.tif"))
    assert kind == "image" and kw["rgb"] is True
    np.testing.assert_array_equal(data, colour)  # channels last, as napari shows colour
    assert kw["scale"] == pytest.approx((0.5, 0.25))

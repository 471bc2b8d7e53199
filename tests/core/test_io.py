"""raterseg.io and raterseg.datasets: formats, axis order, atomic writes, layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import raterseg as rs
import skimage.io
from raterseg import datasets as ds
from raterseg import io as rio
from raterseg.types import RaterSegError


def _nifti(path: Path, data: np.ndarray, zooms=(0.7, 0.8, 2.5)) -> None:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms + (1.0,) * (data.ndim - 3))
    nib.save(img, str(path))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- read_array / write_array ----------------------------------------------------------


def test_nifti_axes_are_reversed_and_geometry_is_kept(tmp_path, rng):
    data = rng.random((4, 5, 6)).astype(np.float32)  # NIfTI (x, y, z)
    _nifti(tmp_path / "a.nii.gz", data)
    arr, meta = rio.read_array(tmp_path / "a.nii.gz")
    assert arr.shape == (6, 5, 4)  # (D, H, W) = (z, y, x)
    assert arr[2, 3, 1] == data[1, 3, 2]
    assert meta["spacing"] == pytest.approx((2.5, 0.8, 0.7))
    assert meta["affine"][:3, 3] == pytest.approx((-10.0, 5.0, 3.0))


def test_nifti_round_trip_is_exact_and_labels_stay_integer(tmp_path, rng):
    image = (rng.random((4, 5, 6)) * 100).astype(np.float32)
    _nifti(tmp_path / "image.nii.gz", image)
    arr, meta = rio.read_array(tmp_path / "image.nii.gz")
    rio.write_array(tmp_path / "copy.nii", arr, meta)
    back, meta2 = rio.read_array(tmp_path / "copy.nii")
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_array_equal(meta2["affine"], meta["affine"])
    assert meta2["spacing"] == meta["spacing"]
    # labels written with the float image's header stay integer labels
    labels = (arr > 50).astype(np.int16) - (arr < 5)
    rio.write_array(tmp_path / "labels.nii.gz", labels, meta)
    lab, lmeta = rio.read_array(tmp_path / "labels.nii.gz")
    assert lab.dtype.kind == "i" and lab.dtype.itemsize <= 2
    np.testing.assert_array_equal(lab, labels)
    np.testing.assert_array_equal(lmeta["affine"], meta["affine"])
    assert nib.load(str(tmp_path / "labels.nii.gz")).get_data_dtype().kind == "i"


def test_nifti_4d_round_trip_channels_first(tmp_path, rng):
    prob = rng.random((3, 4, 5, 6)).astype(np.float32)  # (L, D, H, W)
    rio.write_array(tmp_path / "p.nii.gz", prob, {"spacing": (1.0, 2.0, 3.0, 4.0)})
    assert nib.load(str(tmp_path / "p.nii.gz")).shape == (6, 5, 4, 3)
    back, meta = rio.read_array(tmp_path / "p.nii.gz")
    np.testing.assert_array_equal(back, prob)
    assert meta["spacing"][1:] == pytest.approx((2.0, 3.0, 4.0))


@pytest.mark.parametrize("name", ["a.tif", "a.tiff", "a.npy", "a.npz"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_round_trip_other_formats(tmp_path, rng, name, dtype):
    arr = (rng.random((3, 7, 9)) * 50).astype(dtype)
    rio.write_array(tmp_path / name, arr)
    back, meta = rio.read_array(tmp_path / name)
    assert back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)
    assert meta["format"] == rio.file_format(name)
    assert _leftovers(tmp_path) == []


def test_bool_and_int64_are_stored_as_small_integers(tmp_path):
    mask = np.zeros((2, 4, 4), bool)
    mask[0, 1:3, 1:3] = True
    rio.write_array(tmp_path / "m.nii.gz", mask)
    back, _ = rio.read_array(tmp_path / "m.nii.gz")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    labels = np.array([[[-1, 0], [2, 300]]], dtype=np.int64)
    rio.write_array(tmp_path / "l.nii.gz", labels)
    back, _ = rio.read_array(tmp_path / "l.nii.gz")
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, labels)


def test_npz_key_selection(tmp_path, rng):
    a, b, c = rng.random((2, 3)), rng.integers(0, 2, (2, 3)), rng.random((4,))
    np.savez(tmp_path / "r.npz", zeta=c, raters=b, images=a)
    arr, meta = rio.read_array(tmp_path / "r.npz")
    np.testing.assert_array_equal(arr, a)  # "images" before "raters"
    assert meta["key"] == "images" and set(meta["keys"]) == {"zeta", "raters", "images"}
    np.testing.assert_array_equal(rio.read_array(tmp_path / "r.npz", key="raters")[0], b)
    np.savez(tmp_path / "s.npz", zeta=c, alpha=a)
    # the first array that can be an image (2D or more): zeta (4,) is a side array
    np.testing.assert_array_equal(rio.read_array(tmp_path / "s.npz")[0], a)
    np.savez(tmp_path / "t.npz", zeta=c, beta=c[::-1])
    assert rio.read_array(tmp_path / "t.npz")[1]["key"] == "zeta"  # else the first
    # a 4x4 affine beside a volume is side data too
    vol = rng.random((6, 20, 20))
    np.savez(tmp_path / "aff.npz", affine=np.eye(4), data=vol)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "aff.npz")[0], vol)
    np.savez(tmp_path / "seg_aff.npz", seg=rng.integers(0, 2, (20, 20)), affine=np.eye(4))
    assert rio.read_array(tmp_path / "seg_aff.npz")[1]["key"] == "seg"
    with pytest.raises(RaterSegError, match=r"key: .*did you mean 'raters'"):
        rio.read_array(tmp_path / "r.npz", key="rater")


def test_npz_labels_prefer_rater_keys_over_the_image(tmp_path, rng):
    """An .npz holding a case (its image and its raters) is read as the image, and as the
    raters when labels are asked for; without a rater key, labels are the first array
    that is not an image."""
    image, raters = rng.random((4, 5)), rng.integers(0, 2, (3, 4, 5))
    np.savez(tmp_path / "case.npz", image=image, raters=raters)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "case.npz")[0], image)
    arr, meta = rio.read_array(tmp_path / "case.npz", labels=True)
    np.testing.assert_array_equal(arr, raters)
    assert meta["key"] == "raters"
    assert rio.npz_key(["images", "masks"], labels=True) == "masks"
    assert rio.npz_key(["img", "seg"], labels=True) == "seg"
    assert rio.npz_key(["image", "alice", "bob"], labels=True) == "alice"
    assert rio.npz_key(["image", "alice"]) == "image"
    assert rio.npz_key(["zeta", "alpha"], labels=True) == "zeta"
    # an image under a name of its own is not mistaken for the masks beside it (read as
    # the image, masks of shape (3, H, W) would pass for a 3-channel scan)
    assert rio.npz_key(["masks", "vol"]) == "vol"
    assert rio.npz_key(["seg", "data"]) == "data"
    assert rio.npz_key(["mask", "data"], labels=True) == "mask"
    # side arrays (rater names, a spacing) are passed over
    np.savez(tmp_path / "side.npz", raters=raters, rater_names=np.array(["a", "b", "c"]))
    np.testing.assert_array_equal(rio.read_array(tmp_path / "side.npz")[0], raters)
    np.savez(tmp_path / "side2.npz", masks=raters, spacing=np.array([1.0, 0.5]))
    np.testing.assert_array_equal(rio.read_array(tmp_path / "side2.npz")[0], raters)


def test_png_gray_rgb_and_colour(tmp_path, rng):
    gray = rng.integers(0, 256, (6, 8)).astype(np.uint8)
    skimage.io.imsave(tmp_path / "g.png", gray, check_contrast=False)
    skimage.io.imsave(tmp_path / "rgb_gray.png", np.stack([gray] * 3, -1), check_contrast=False)
    colour = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
    skimage.io.imsave(tmp_path / "c.png", colour, check_contrast=False)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "g.png")[0], gray)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "rgb_gray.png")[0], gray)
    back, _ = rio.read_array(tmp_path / "c.png")
    np.testing.assert_array_equal(back, np.moveaxis(colour, -1, 0))  # channels first
    rio.write_array(tmp_path / "c2.png", back)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "c2.png")[0], back)


def test_pickled_npy_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    np.save(tmp_path / "evil.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "evil.npz", images=np.array([Evil()], dtype=object))
    for name in ("evil.npy", "evil.npz"):
        with pytest.raises(RaterSegError, match="pickle"):
            rio.read_array(tmp_path / name)
    assert not marker.exists()


def test_write_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "truth.nii.gz"
    rio.write_array(target, np.ones((2, 3, 4), np.int16))
    before = target.read_bytes()

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(RaterSegError, match=r"path: could not write .*truth.nii.gz.*disk full"):
        rio.write_array(target, np.zeros((2, 3, 4), np.int16))
    assert target.read_bytes() == before  # the old file is intact
    assert _leftovers(tmp_path) == []  # and no temporary file is left behind


def test_write_array_rejects_unknown_ending_and_bad_png(tmp_path):
    with pytest.raises(RaterSegError, match=r"path: expected a file ending in .*\.nii\.gz.*a\.mha"):
        rio.write_array(tmp_path / "a.mha", np.zeros((2, 2)))
    with pytest.raises(RaterSegError, match="array: a png file holds"):
        rio.write_array(tmp_path / "a.png", np.zeros((2, 3, 4, 5), np.uint8))
    assert not any(tmp_path.iterdir())


def test_write_result_files_geometry_and_summary(tmp_path, rng):
    raters = np.zeros((3, 4, 6, 8), np.int16)
    raters[:, 1:3, 2:5, 2:6] = 1
    raters[2, 0, 0, 0] = 1
    _nifti(tmp_path / "rater1.nii.gz", raters[0].T)
    _, meta = rio.read_array(tmp_path / "rater1.nii.gz")
    res = rs.fuse(raters, method="majority_vote")
    written = rio.write_result(tmp_path / "out", res, meta, prefix="case1_",
                               rater_names=["a", "b", "c"])
    assert {p.name for p in written.values()} == {
        "case1_truth.nii.gz", "case1_probabilities.nii.gz", "case1_uncertainty.nii.gz",
        "case1_disagreement.nii.gz", "case1_rater_confusion.csv", "case1_summary.json"}
    truth, tmeta = rio.read_array(written["truth"])
    np.testing.assert_array_equal(truth, res.truth)
    np.testing.assert_array_equal(tmeta["affine"], meta["affine"])
    prob, _ = rio.read_array(written["probabilities"])
    np.testing.assert_array_equal(prob, res.probabilities)
    summary = json.loads(written["summary"].read_text())
    assert summary["method"] == "majority_vote" and summary["rater_names"] == ["a", "b", "c"]
    np.testing.assert_allclose(summary["rater_confusion"], res.rater_confusion, rtol=1e-6)
    assert summary["class_voxels"] == {"0": int((res.truth == 0).sum()),
                                       "1": int((res.truth == 1).sum())}
    # a class the fusion never chose is listed with 0 voxels (it was left out: a KeyError
    # for a script reading each case's class volumes)
    three = rs.fuse(res.truth[None], method="majority_vote", num_classes=3)
    counts = json.loads(rio.write_result(tmp_path / "three", three)["summary"].read_text())
    counts = counts["class_voxels"]
    assert counts == {"0": int((res.truth == 0).sum()), "1": int((res.truth == 1).sum()), "2": 0}
    lines = written["rater_confusion"].read_text().splitlines()
    assert lines[0] == "rater,said,true,probability" and len(lines) == 1 + 3 * 2 * 2
    assert _leftovers(tmp_path / "out") == []


def _fused_with_rater_maps():
    from raterseg.types import FusionResult

    raters = np.zeros((3, 4, 6, 8), np.int16)
    raters[:, 1:3, 2:5, 2:6] = 1
    res = rs.fuse(raters, method="majority_vote")
    maps = np.stack([(r == 1).astype(np.float32) for r in raters])
    return res, FusionResult(truth=res.truth, probabilities=res.probabilities,
                             uncertainty=res.uncertainty, disagreement=res.disagreement,
                             rater_confusion=res.rater_confusion, rater_maps=maps,
                             method="with_maps", params={})


def test_write_result_wrong_number_of_rater_names_writes_nothing(tmp_path):
    res, _ = _fused_with_rater_maps()
    with pytest.raises(RaterSegError, match=r"rater_names: expected 3 names .*got 2: "
                                            r"\['alice', 'bob'\]"):
        rio.write_result(tmp_path / "out", res, rater_names=["alice", "bob"])
    assert not (tmp_path / "out").exists()


def test_write_result_replaces_an_earlier_result_in_the_folder(tmp_path):
    """A folder reused for another method holds only the new result: the earlier one's
    rater_maps (which this method does not make) go, other files and prefixes stay."""
    plain, with_maps = _fused_with_rater_maps()
    out = tmp_path / "out"
    first = rio.write_result(out, with_maps)
    assert "rater_maps" in first
    rio.write_result(out, with_maps, prefix="other_")
    (out / "notes.txt").write_text("mine")
    written = rio.write_result(out, plain)
    assert "rater_maps" not in written and not (out / "rater_maps.nii.gz").exists()
    assert json.loads((out / "summary.json").read_text())["method"] == "majority_vote"
    assert (out / "other_rater_maps.nii.gz").exists() and (out / "notes.txt").exists()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("other_")) == sorted(
        [*(p.name for p in written.values()), "notes.txt"])


def test_write_result_refuses_arrays_in_nibabel_order(tmp_path):
    """A result fused from nibabel's (x, y, z) arrays, written with the file's meta, would be
    transposed against its affine (no longer overlaying the image): refused, nothing written."""
    data = np.zeros((8, 6, 4), np.uint8)  # (x, y, z)
    data[2:6, 1:4, 1:3] = 1
    _nifti(tmp_path / "r.nii.gz", data)
    _, meta = rio.read_array(tmp_path / "r.nii.gz")
    res = rs.fuse(np.stack([data, data]), method="majority_vote")
    with pytest.raises(RaterSegError, match=r"expected arrays of shape \(4, 6, 8\).*\.T"):
        rio.write_result(tmp_path / "out", res, meta)
    assert not (tmp_path / "out").exists()
    ok = rs.fuse(np.stack([data.T, data.T]), method="majority_vote")
    rio.write_result(tmp_path / "out", ok, meta)
    back = nib.load(tmp_path / "out" / "truth.nii.gz")
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)


# -- case folders ----------------------------------------------------------------------


def _labels(shape, seed):
    return np.random.default_rng(seed).integers(0, 3, shape).astype(np.int16)


def test_read_case_files_in_natural_order_with_image(tmp_path, rng):
    shape = (3, 5, 7)
    raters = {name: _labels(shape, i) for i, name in enumerate(["rater10", "rater2", "rater_1"])}
    for name, lab in raters.items():
        rio.write_array(tmp_path / f"{name}.nii.gz", lab)
    image = rng.random(shape).astype(np.float32)
    rio.write_array(tmp_path / "image.nii.gz", image)
    (tmp_path / "notes.txt").write_text("not a rater")
    case = rio.read_case(tmp_path)
    assert case.rater_names == ["rater_1", "rater2", "rater10"]
    np.testing.assert_array_equal(case.raters, np.stack([raters[n] for n in case.rater_names]))
    assert case.raters.dtype == np.int16
    np.testing.assert_array_equal(case.image, image)
    assert case.meta["format"] == "nifti" and len(case.meta["rater_paths"]) == 3


def test_read_case_rater_folders_of_png_slices_and_float_labels(tmp_path):
    truth = np.zeros((12, 6, 6), np.uint8)
    truth[:, 2:4, 1:5] = 1
    truth[3] = 0  # slice 3 differs, so a wrong slice order would show
    for r in range(2):
        d = tmp_path / f"rater{r + 1}"
        d.mkdir()
        for k in range(12):  # 0/255 masks named slice-0 .. slice-11
            skimage.io.imsave(d / f"slice-{k}.png", truth[k] * 255, check_contrast=False)
    d = tmp_path / "rater3"
    d.mkdir()
    rio.write_array(d / "labels.nii.gz", truth.astype(np.float32))  # float but whole numbers
    case = rio.read_case(tmp_path)
    assert case.image is None and case.rater_names == ["rater1", "rater2", "rater3"]
    np.testing.assert_array_equal(case.raters, np.stack([truth] * 3))


def test_read_case_2d_image_with_one_slice_deep_nifti_labels(tmp_path, rng):
    image = rng.integers(0, 255, (6, 8)).astype(np.uint8)
    rio.write_array(tmp_path / "image.png", image)
    labels = (image > 128).astype(np.int16)
    rio.write_array(tmp_path / "rater1.nii.gz", labels[None])  # NIfTI (x, y, 1)
    rio.write_array(tmp_path / "rater2.nii.gz", labels[None])
    case = rio.read_case(tmp_path)
    assert case.raters.shape == (2, 6, 8)
    np.testing.assert_array_equal(case.image, image)


@pytest.mark.parametrize("problem, match", [
    ("shapes", r"raters: expected every rater .* same shape, got rater1 \(4, 5\), rater2 \(4, 6\)"),
    ("image", r"image \('.*image.npy'\): expected shape \(4, 5\)"),
    ("none", r"folder: expected rater files"),
    ("two_images", r"folder: expected at most one image"),
    ("jpeg", r"raters \('.*rater2.jpg'\): expected a lossless label file"),
    ("fraction", r"raters \('.*rater2.npy'\): expected integer class labels, got the value 0.5"),
])
def test_read_case_errors(tmp_path, problem, match):
    rio.write_array(tmp_path / "rater1.npy", np.zeros((4, 5), np.int16))
    if problem == "shapes":
        rio.write_array(tmp_path / "rater2.npy", np.zeros((4, 6), np.int16))
    elif problem == "image":
        rio.write_array(tmp_path / "image.npy", np.zeros((4, 6), np.float32))
    elif problem == "none":
        (tmp_path / "rater1.npy").rename(tmp_path / "labels.npy")
    elif problem == "two_images":
        rio.write_array(tmp_path / "image.npy", np.zeros((4, 5)))
        rio.write_array(tmp_path / "image.tif", np.zeros((4, 5)))
    elif problem == "jpeg":
        skimage.io.imsave(tmp_path / "rater2.jpg", np.zeros((4, 5), np.uint8), check_contrast=False)
    elif problem == "fraction":
        rio.write_array(tmp_path / "rater2.npy", np.full((4, 5), 0.5))
    with pytest.raises(RaterSegError, match=match):
        rio.read_case(tmp_path)


# -- LIDC layout -----------------------------------------------------------------------


def _fake_lidc_nodule(folder: Path, k: int, missing: tuple[int, int] | None = None) -> np.ndarray:
    vol = (np.arange(k)[:, None, None] * 10 + np.zeros((k, 5, 5))).astype(np.uint8)
    (folder / "images").mkdir(parents=True)
    for s in range(k):
        skimage.io.imsave(folder / "images" / f"slice-{s}.png", vol[s], check_contrast=False)
    for r in range(4):
        (folder / f"mask-{r}").mkdir()
        for s in range(k):
            if missing != (r, s):
                m = np.zeros((5, 5), np.uint8)
                m[: s % 5 + 1, r] = 255
                skimage.io.imsave(folder / f"mask-{r}" / f"slice-{s}.png", m, check_contrast=False)
    return vol


def test_lidc_layout_numeric_slice_order_and_missing_mask(tmp_path):
    nodule = tmp_path / "LIDC-IDRI-0042" / "nodule-0"
    vol = _fake_lidc_nodule(nodule, 12, missing=(2, 11))
    case = rio.read_lidc_nodule(tmp_path / "LIDC-IDRI-0042")  # a patient with one nodule
    assert case.name == "LIDC-IDRI-0042/nodule-0"
    assert case.image.dtype == np.float32 and case.image.shape == (12, 5, 5)
    np.testing.assert_array_equal(case.image, vol)  # slice-10 after slice-9
    assert case.raters.shape == (4, 12, 5, 5) and case.rater_names == [f"mask-{r}" for r in range(4)]
    assert (case.raters[2, 11] == -1).all()  # that rater has no mask for slice 11
    assert case.raters[1, 10, :1, 1].all() and case.raters[1, 10].sum() == 1
    _fake_lidc_nodule(tmp_path / "LIDC-IDRI-0042" / "nodule-1", 2)
    with pytest.raises(RaterSegError, match="folder: expected an LIDC nodule folder .* 2 nodules"):
        rio.read_lidc_nodule(tmp_path / "LIDC-IDRI-0042")


def test_lidc_slices_match_the_npz_dataset(shared_dir):
    lidc = shared_dir / "data" / "lidc"
    case = rio.read_lidc_nodule(lidc / "LIDC-IDRI-slices" / "LIDC-IDRI-0003" / "nodule-1")
    assert case.image.shape[0] == case.raters.shape[1] == 10
    assert set(np.unique(case.raters)) <= {0, 1}
    data = ds.load_npz_dataset(lidc / "lidc_dev.npz")
    assert data.images.dtype == np.uint8 and data.raters.shape[1:] == (4, 128, 128)
    index = {str(i): n for n, i in enumerate(data.ids)}
    rows = [index[f"LIDC-IDRI-0003/nodule-1/slice-{k}.png"] for k in range(10)]
    np.testing.assert_array_equal(case.image, data.images[rows])
    np.testing.assert_array_equal(case.raters, data.raters[rows].transpose(1, 0, 2, 3))
    cohort = ds.load_cohort(lidc / "LIDC-IDRI-slices")
    assert [c.name for c in cohort][:2] == ["LIDC-IDRI-0001/nodule-0", "LIDC-IDRI-0003/nodule-0"]
    assert len(cohort) == 8


# -- datasets --------------------------------------------------------------------------


def test_load_npz_dataset_raters_and_lidc_masks(tmp_path, rng):
    images = rng.random((5, 2, 6, 6)).astype(np.float32)
    raters = rng.integers(-1, 3, (5, 3, 6, 6)).astype(np.int16)
    np.savez(tmp_path / "d.npz", images=images, raters=raters)
    d = ds.load_npz_dataset(tmp_path / "d.npz")
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.raters, raters)
    assert d.ids is None
    masks = rng.random((5, 4, 6, 6)) > 0.5
    ids = np.array([f"LIDC-IDRI-000{i}/nodule-0/slice-0.png" for i in range(5)])
    np.savez_compressed(tmp_path / "lidc.npz", images=(images[:, 0] * 255).astype(np.uint8),
                        masks=masks, ids=ids)
    _, raters2, ids2 = ds.load_npz_dataset(tmp_path / "lidc.npz")
    assert raters2.dtype.kind == "i"
    np.testing.assert_array_equal(raters2, masks)
    np.testing.assert_array_equal(ids2, ids)
    np.savez(tmp_path / "bad.npz", images=images[:4], raters=raters)
    with pytest.raises(RaterSegError, match=r"path: expected 'images' of shape \(5, C\?"):
        ds.load_npz_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "nokey.npz", images=images)
    with pytest.raises(RaterSegError, match="path: expected arrays 'images' and 'raters'"):
        ds.load_npz_dataset(tmp_path / "nokey.npz")


def test_split_by_patient_keeps_patients_whole():
    ids = [f"LIDC-IDRI-{p:04d}/nodule-{n}/slice-{k}.png"
           for p in range(1, 21) for n in range(p % 3 + 1) for k in range(p % 4 + 1)]
    parts = ds.split_by_patient(ids, (0.7, 0.1, 0.2), seed=3)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))
    patients = [{ids[i].split("/")[0] for i in part} for part in parts]
    assert [len(p) for p in patients] == [14, 2, 4]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    again = ds.split_by_patient(ids, (0.7, 0.1, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = ds.split_by_patient(ids, (0.7, 0.1, 0.2), seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    tiny = ds.split_by_patient(["a/1", "b/1", "c/1"], (0.9, 0.05, 0.05))
    assert [len(t) for t in tiny] == [1, 1, 1]
    with pytest.raises(RaterSegError, match="fractions: expected non-negative numbers summing to 1"):
        ds.split_by_patient(ids, (0.5, 0.2))


def test_cohort_of_case_folders_and_lidc_patients(tmp_path):
    for name in ("case10", "case2"):
        for r in range(2):
            rio.write_array(tmp_path / name / f"rater{r}.npy", _labels((4, 4), r))
    _fake_lidc_nodule(tmp_path / "LIDC-IDRI-0007" / "nodule-3", 2)
    (tmp_path / "outputs").mkdir()  # not a case: ignored
    cases = ds.load_cohort(tmp_path)
    assert [c.name for c in cases] == ["case2", "case10", "LIDC-IDRI-0007/nodule-3"]
    assert cases[0].raters.shape == (2, 4, 4) and cases[2].raters.shape == (4, 2, 5, 5)
    with pytest.raises(RaterSegError, match="folder: expected a cohort"):
        ds.load_cohort(tmp_path / "outputs")


def test_io_does_not_import_torch():
    import subprocess

    code = ("import sys, raterseg.io, raterseg.datasets, raterseg.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """Outputs are readable by whoever the umask allows (a colleague, a web viewer), like
    any file the user writes; mkstemp's private 0600 must not leak through the rename.
    Rewriting an existing file keeps that file's mode, as opening it for writing would."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        res = rs.fuse(np.array([[[0, 1], [1, 1]], [[0, 1], [0, 1]]], np.int16), method="mean")
        written = rio.write_result(tmp_path / "out", res)
        for path in [*written.values(), rio.write_array(tmp_path / "a.npy", np.zeros(3))]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        os.chmod(tmp_path / "a.npy", 0o640)
        rio.write_array(tmp_path / "a.npy", np.ones(3))
        assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_failed_text_write_is_one_raterseg_error_naming_the_file(tmp_path, monkeypatch):
    """summary.json / rater_confusion.csv (and fuse-dir's summary.csv) failing to write, e.g. in
    a read-only folder, is a RaterSegError naming the file, not a bare PermissionError."""
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    res = rs.fuse(np.array([[[0, 1], [1, 1]], [[0, 1], [0, 1]]], np.int16), method="mean")
    monkeypatch.setattr(rio, "write_array", lambda path, *a, **k: path)  # arrays "written"
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(RaterSegError, match=r"outdir: could not write '.*rater_confusion\.csv'.*"
                                            r"Permission denied"):
        rio.write_result(tmp_path / "out", res)
    with pytest.raises(RaterSegError, match=r"could not write '.*summary\.csv'"):
        rio._write_text(tmp_path / "summary.csv", "case\n")


def test_pickled_or_empty_files_are_reported_under_the_callers_argument_name(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(RaterSegError, match=r"^IMG: '.*obj\.npy' holds Python objects"):
        rio.read_array(tmp_path / "obj.npy", argname="IMG")
    with pytest.raises(RaterSegError, match=r"^RATER: expected at least one array in"):
        rio.read_array(tmp_path / "empty.npz", argname="RATER")


def test_tiff_keeps_the_voxel_spacing(tmp_path):
    import tifffile

    arr = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    rio.write_array(tmp_path / "v.tif", arr, {"spacing": (3.0, 0.5, 0.25)})
    back, meta = rio.read_array(tmp_path / "v.tif")
    np.testing.assert_array_equal(back, arr)
    assert meta["spacing"] == pytest.approx((3.0, 0.5, 0.25))
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:  # what other software reads
        x, y = (tif.pages[0].tags[k].value for k in ("XResolution", "YResolution"))
    assert x[0] / x[1] == pytest.approx(4.0) and y[0] / y[1] == pytest.approx(2.0)
    rio.write_array(tmp_path / "plain.tif", arr)  # no spacing given: unit spacing
    assert rio.read_array(tmp_path / "plain.tif")[1]["spacing"] == (1.0, 1.0, 1.0)
    with tifffile.TiffFile(tmp_path / "v.tif") as tif:  # pixels per unit "none": no inch
        assert int(tif.pages[0].tags["ResolutionUnit"].value) == 1


def test_rgb_tiff_reads_as_png_colour_does(tmp_path, rng):
    import tifffile

    mask = np.zeros((10, 12), np.uint8)
    mask[2:7, 3:9] = 255
    # colour TIFFs as scanners, Fiji and image editors write them (no tifffile description)
    tifffile.imwrite(tmp_path / "grey.tif", np.stack([mask] * 3, -1), photometric="rgb",
                     metadata=None)
    back, meta = rio.read_array(tmp_path / "grey.tif")
    np.testing.assert_array_equal(back, mask)  # grey in RGB: one channel
    assert meta["spacing"] == (1.0, 1.0)
    lab, _ = ds.read_labels(tmp_path / "grey.tif")
    assert lab.shape == (10, 12) and set(np.unique(lab)) == {0, 1}
    colour = rng.integers(0, 256, (10, 12, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "he.tif", colour, photometric="rgb", metadata=None)
    back, meta = rio.read_array(tmp_path / "he.tif")
    np.testing.assert_array_equal(back, np.moveaxis(colour, -1, 0))  # channels first
    assert meta["channels_moved_first"] and meta["spacing"] == (1.0, 1.0, 1.0)
    with pytest.raises(RaterSegError, match=r"he.tif.*colour image \(3 channels\)"):
        ds.read_labels(tmp_path / "he.tif")
    # RGBA with an opaque alpha and grey colour is grey; a colour stack is (C, D, H, W)
    rgba = np.stack([mask] * 3 + [np.full_like(mask, 255)], -1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb",
                     extrasamples=["unassalpha"], metadata=None)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "rgba.tif")[0], mask)
    stack = rng.integers(0, 256, (4, 10, 12, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="rgb", metadata=None)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "stack.tif")[0],
                                  np.moveaxis(stack, -1, 0))
    # arrays with 3 columns written by raterseg are no colour image, whatever tifffile guesses
    thin = rng.integers(0, 5, (6, 10, 3)).astype(np.uint8)
    rio.write_array(tmp_path / "thin.tif", thin)
    np.testing.assert_array_equal(rio.read_array(tmp_path / "thin.tif")[0], thin)
    np.testing.assert_array_equal(ds.read_labels(tmp_path / "thin.tif")[0], thin)
    # tifffile stores any (..., 3) array as RGB by default: such a file from a script (or
    # raterseg before) is a mask or volume with 3 columns, read as stored, not as colour
    tifffile.imwrite(tmp_path / "default.tif", thin)
    np.testing.assert_array_equal(ds.read_labels(tmp_path / "default.tif")[0], thin)
    blank = np.zeros((5, 6, 3), np.int16)
    tifffile.imwrite(tmp_path / "blank.tif", blank)
    assert ds.read_labels(tmp_path / "blank.tif")[0].shape == (5, 6, 3)
    # an RGB photo written with tifffile (as stored: photometric RGB and a shape, exactly as
    # a (H, W, 3) mask would be): colour when read as an image, as stored as labels
    tifffile.imwrite(tmp_path / "photo_tf.tif", colour, photometric="rgb")
    np.testing.assert_array_equal(ds.read_image(tmp_path / "photo_tf.tif")[0],
                                  np.moveaxis(colour, -1, 0))
    lab3 = rng.integers(0, 3, (10, 12, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "lab3.tif", lab3)
    np.testing.assert_array_equal(ds.read_labels(tmp_path / "lab3.tif")[0], lab3)
    # an RGB image written by raterseg (napari's RGB layer) is colour, its spacing on (y, x)
    rio.write_array(tmp_path / "photo.tif", colour, {"rgb": True, "spacing": (0.5, 0.25)})
    with tifffile.TiffFile(tmp_path / "photo.tif") as tif:
        assert tif.pages[0].photometric == 2
    back, meta = rio.read_array(tmp_path / "photo.tif")
    np.testing.assert_array_equal(back, np.moveaxis(colour, -1, 0))
    assert meta["spacing"] == (1.0, 0.5, 0.25)


def test_tiff_resolution_tags_give_the_in_plane_spacing(tmp_path):
    import tifffile

    vol = np.zeros((6, 8, 10), np.uint8)
    # ImageJ: 0.5 um pixels, 2 um slices; spacing (z, y, x) in ImageJ's unit
    tifffile.imwrite(tmp_path / "ij.tif", vol, imagej=True, resolution=(2.0, 4.0),
                     metadata={"spacing": 2.0, "unit": "um", "axes": "ZYX"})
    assert rio.read_array(tmp_path / "ij.tif")[1]["spacing"] == pytest.approx((2.0, 0.25, 0.5))
    # plain TIFF: centimetre resolutions in mm, "none" as given; dots per inch are a print
    # setting (72 dpi from an image editor), not a pixel size: no spacing
    for unit, res, want in [("CENTIMETER", (40.0, 20.0), (0.5, 0.25)),
                            ("NONE", (4.0, 2.0), (0.5, 0.25))]:
        tifffile.imwrite(tmp_path / "p.tif", vol[0], resolution=res, resolutionunit=unit)
        assert rio.read_array(tmp_path / "p.tif")[1]["spacing"] == pytest.approx(want), unit
    tifffile.imwrite(tmp_path / "p.tif", vol[0], resolution=(72.0, 72.0), resolutionunit="INCH")
    assert rio.read_array(tmp_path / "p.tif")[1]["spacing"] == (1.0, 1.0)
    # a colour image: the channel axis has no spacing
    tifffile.imwrite(tmp_path / "c.tif", np.random.default_rng(0).integers(
        0, 255, (8, 10, 3), dtype=np.uint8), photometric="rgb", resolution=(40.0, 20.0),
        resolutionunit="CENTIMETER", metadata=None)
    assert rio.read_array(tmp_path / "c.tif")[1]["spacing"] == pytest.approx((1.0, 0.5, 0.25))
    # an int16 (8, 10, 3) written with tifffile's default (photometric RGB; read as stored,
    # no photo): the tags still describe y and x, the first two axes
    tifffile.imwrite(tmp_path / "c3.tif", np.zeros((8, 10, 3), np.int16), resolution=(40.0, 20.0),
                     resolutionunit="CENTIMETER")
    assert rio.read_array(tmp_path / "c3.tif")[1]["spacing"] == pytest.approx((0.5, 0.25, 1.0))
    # through a case folder into the NIfTI outputs
    (tmp_path / "case").mkdir()
    for r in (1, 2):
        tifffile.imwrite(tmp_path / "case" / f"rater{r}.tif", vol, imagej=True,
                         resolution=(2.0, 2.0), metadata={"spacing": 2.0, "unit": "um",
                                                          "axes": "ZYX"})
    case = ds.read_case(tmp_path / "case")
    res = rs.fuse(case.raters, method="majority_vote")
    rio.write_result(tmp_path / "out", res, case.meta)
    assert nib.load(tmp_path / "out" / "truth.nii.gz").header.get_zooms() == \
        pytest.approx((0.5, 0.5, 2.0))


def test_label_and_image_readers_are_in_raterseg_io(tmp_path):
    # what the CLI reads files with, for scripts: labels as int16 (0/255 masks as 0/1,
    # whole-number floats rounded), images as float32
    nib = pytest.importorskip("nibabel")
    lab = np.zeros((4, 5, 6), np.float32)
    lab[1:3, 1:4, 2:5] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "r.nii.gz")
    arr, _ = rio.read_labels(tmp_path / "r.nii.gz")
    assert arr.dtype == np.int16 and arr.shape == (6, 5, 4) and set(np.unique(arr)) == {0, 1}
    img, _ = rio.read_image(tmp_path / "r.nii.gz")
    assert img.dtype == np.float32
    with pytest.raises(RaterSegError):
        nib.save(nib.Nifti1Image(lab * 0.5, np.eye(4)), tmp_path / "half.nii.gz")
        rio.read_labels(tmp_path / "half.nii.gz")

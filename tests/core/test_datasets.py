"""Label conversions of raterseg.datasets: what a user's mask files become, and which
ones are refused with a message naming the argument."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import skimage.io
from raterseg import RaterSegError
from raterseg.datasets import load_npz_dataset, read_labels


def test_colour_png_mask_is_refused_not_read_as_three_slices(tmp_path):
    mask = np.zeros((12, 16, 3), np.uint8)
    mask[3:8, 4:10, 0] = 255  # a red nodule on black
    skimage.io.imsave(tmp_path / "rater1.png", mask, check_contrast=False)
    with pytest.raises(RaterSegError, match=r"rater1.*colour image \(3 channels\)"):
        read_labels(tmp_path / "rater1.png", argname="rater1")
    # the same mask in gray is one 2D label map
    skimage.io.imsave(tmp_path / "gray.png", mask[..., 0], check_contrast=False)
    lab, _ = read_labels(tmp_path / "gray.png")
    assert lab.shape == (12, 16) and set(np.unique(lab)) == {0, 1}


@pytest.mark.parametrize("suffix, dtype", [(".nii.gz", np.uint8), (".npy", np.uint8),
                                           (".png", np.uint8), (".nii.gz", np.int16),
                                           (".nii.gz", np.float32), (".npy", np.int32)])
def test_0_255_mask_becomes_0_1_in_every_format_and_dtype(tmp_path, suffix, dtype):
    # Slicer saves int16 masks, ITK tools float32: 0/255 is a binary mask whatever the dtype
    mask = np.zeros((10, 12), dtype)
    mask[2:6, 3:9] = 255
    path = tmp_path / f"m{suffix}"
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(mask[..., None], np.eye(4)), path)
    elif suffix == ".npy":
        np.save(path, mask)
    else:
        skimage.io.imsave(path, mask, check_contrast=False)
    lab, _ = read_labels(path)
    assert set(np.unique(lab)) == {0, 1}
    assert int(lab.sum()) == 24
    if np.dtype(dtype).kind != "u":  # -1 (not annotated) stays -1
        part = mask.copy()
        part[8:] = -1
        np.save(tmp_path / "part.npy", part)
        lab, _ = read_labels(tmp_path / "part.npy")
        assert set(np.unique(lab)) == {-1, 0, 1} and int(lab.sum()) == 24 - 2 * 12
    # a map with other labels keeps them
    multi = mask.copy()
    multi[0, 0] = 2
    np.save(tmp_path / "multi.npy", multi)
    assert set(np.unique(read_labels(tmp_path / "multi.npy")[0])) == {0, 2, 255}


def test_npz_dataset_raters_convert_like_label_files(tmp_path):
    images = np.zeros((3, 8, 8), np.float32)
    raters = np.zeros((3, 2, 8, 8), np.float32)
    raters[:, 0, 2:5, 2:5] = 1.0
    raters[0, 1] = -1.0  # rater 1 missing on case 0
    np.savez(tmp_path / "f.npz", images=images, raters=raters)
    ds = load_npz_dataset(tmp_path / "f.npz")
    assert ds.raters.dtype.kind == "i"
    assert np.array_equal(ds.raters, raters.astype(int))
    np.savez(tmp_path / "m.npz", images=images, raters=(raters.clip(0) * 255).astype(np.uint8))
    assert set(np.unique(load_npz_dataset(tmp_path / "m.npz").raters)) == {0, 1}
    raters[1, 0, 0, 0] = 0.5
    np.savez(tmp_path / "bad.npz", images=images, raters=raters)
    with pytest.raises(RaterSegError, match=r"path: 'raters'.*integer class labels.*0\.5"):
        load_npz_dataset(tmp_path / "bad.npz")


def test_case_folder_with_a_rater_on_another_grid_is_refused(tmp_path):
    from raterseg.datasets import read_case

    lab = np.zeros((8, 9, 4), np.uint8)
    lab[2:5, 3:7, 1:3] = 1
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # the same array, x mirrored in the world
    flipped[0, 3] = 7.0
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "rater1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "rater2.nii.gz")
    assert read_case(tmp_path).raters.shape[0] == 2  # same grid: fine
    nib.save(nib.Nifti1Image(lab, flipped), tmp_path / "rater3.nii.gz")
    with pytest.raises(RaterSegError, match=r"raters: '.*rater3.nii.gz' lies on another voxel "
                                            r"grid.*; resample the labels onto one grid"):
        read_case(tmp_path)
    # an image on another grid: either the image or the labels can be resampled
    (tmp_path / "rater3.nii.gz").unlink()
    nib.save(nib.Nifti1Image(lab.astype(np.float32), flipped), tmp_path / "image.nii.gz")
    with pytest.raises(RaterSegError, match=r"image: '.*image.nii.gz' lies on another voxel "
                                            r"grid.*; resample the image or the labels onto"):
        read_case(tmp_path)


def test_npz_dataset_messages_name_the_argument_given(tmp_path):
    from raterseg.cohort import load_training_set

    np.savez(tmp_path / "nokey.npz", pictures=np.zeros((2, 4, 4)))
    with pytest.raises(RaterSegError, match=r"^DATA: expected arrays 'images' and 'raters'"):
        load_npz_dataset(tmp_path / "nokey.npz", argname="DATA")
    # raterseg train's DATA: the training set loader names it so
    with pytest.raises(RaterSegError, match=r"^DATA: expected arrays 'images' and 'raters'"):
        load_training_set(tmp_path / "nokey.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(RaterSegError, match=r"^DATA: .*broken.npz' is not a readable npz"):
        load_training_set(tmp_path / "broken.npz")
    with pytest.raises(RaterSegError, match=r"^path: expected arrays"):  # the default
        load_npz_dataset(tmp_path / "nokey.npz")


def test_rater_npz_holding_the_image_too_reads_its_raters(tmp_path):
    from raterseg.datasets import read_case

    lab = np.zeros((6, 7), np.int16)
    lab[1:4, 2:6] = 1
    image = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    for r in (1, 2):  # each rater's file carries the image it was drawn on
        np.savez(tmp_path / f"rater{r}.npz", image=image, raters=lab * r)
    got, meta = read_labels(tmp_path / "rater2.npz")
    assert meta["key"] == "raters" and np.array_equal(got, 2 * lab)
    case = read_case(tmp_path)
    assert case.rater_names == ["rater1", "rater2"]
    np.testing.assert_array_equal(case.raters, np.stack([lab, 2 * lab]))
    # a rater folder holding such a file alone reads the same
    (tmp_path / "rater3").mkdir()
    (tmp_path / "rater2.npz").rename(tmp_path / "rater3" / "labels.npz")
    assert np.array_equal(read_labels(tmp_path / "rater3")[0], 2 * lab)


def test_rater_saved_from_nibabel_without_transpose_gets_the_axes_hint(tmp_path):
    from raterseg.datasets import read_case

    lab = np.zeros((8, 9, 4), np.uint8)  # NIfTI (x, y, z): the array (4, 9, 8)
    lab[2:5, 3:7, 1:3] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "rater1.nii.gz")
    np.save(tmp_path / "rater2.npy", lab)  # get_fdata() saved as it is: (8, 9, 4)
    with pytest.raises(RaterSegError, match=r"rater1 \(4, 9, 8\), rater2 \(8, 9, 4\) \(axes "
                                            r"reversed\? .*save \.npy from nibabel with \.T\)"):
        read_case(tmp_path)
    np.save(tmp_path / "rater2.npy", lab[:5])  # another shape, not reversed: no hint
    with pytest.raises(RaterSegError, match=r"rater2 \(5, 9, 4\)$"):
        read_case(tmp_path)
    np.save(tmp_path / "rater2.npy", lab.T)  # as raterseg reads NIfTI: fine
    assert read_case(tmp_path).raters.shape == (2, 4, 9, 8)


def test_scaled_and_float32_labels_are_rounded_fractions_refused(tmp_path):
    lab = np.zeros((8, 9, 4), np.uint8)
    lab[2:5, 3:7, 1:3] = 1
    # a 0/255 mask with scl_slope 1/255 (float32 in the header): 1.0000000591 when read
    img = nib.Nifti1Image((lab * 255).astype(np.uint8), np.eye(4))
    img.header.set_slope_inter(1 / 255, 0)
    nib.save(img, tmp_path / "slope.nii.gz")
    assert np.asanyarray(nib.load(tmp_path / "slope.nii.gz").dataobj).max() != 1.0
    # float32 round-off below and above whole numbers
    off = lab.astype(np.float32) * np.float32(0.99999994)
    off[0, 0, 0] = np.float32(2.0000002)
    nib.save(nib.Nifti1Image(off, np.eye(4)), tmp_path / "off.nii.gz")
    want = lab.T.astype(np.int16)
    got, _ = read_labels(tmp_path / "slope.nii.gz")
    assert got.dtype.kind == "i" and np.array_equal(got, want)
    got, _ = read_labels(tmp_path / "off.nii.gz")
    want[0, 0, 0] = 2
    assert np.array_equal(got, want)  # 0.99999994 is 1, not 0 as a cast would make it
    for bad, shown in ((0.5, "0.5"), (0.3, "0.3"), (1.01, r"1\.0099"), (np.nan, "nan")):
        frac = lab.astype(np.float32)
        frac[1, 1, 1] = bad
        np.save(tmp_path / "frac.npy", frac)
        with pytest.raises(RaterSegError, match=rf"integer class labels, got the value {shown}"):
            read_labels(tmp_path / "frac.npy")


def test_a_4d_nifti_rater_with_one_volume_reads_as_3d(tmp_path):
    from raterseg.datasets import read_case

    lab = np.zeros((8, 9, 4), np.uint8)
    lab[2:5, 3:7, 1:3] = 1
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "rater1.nii.gz")
    nib.save(nib.Nifti1Image(lab[..., None], affine), tmp_path / "rater2.nii.gz")  # (x, y, z, 1)
    got, meta = read_labels(tmp_path / "rater2.nii.gz")
    assert got.shape == (4, 9, 8) and np.array_equal(got, lab.T)
    assert meta["spacing"] == pytest.approx((2.5, 0.8, 0.8))
    case = read_case(tmp_path)
    assert case.raters.shape == (2, 4, 9, 8)
    # two volumes are not one label map: still refused as a shape mismatch
    nib.save(nib.Nifti1Image(np.stack([lab, lab], -1), affine), tmp_path / "rater3.nii.gz")
    with pytest.raises(RaterSegError, match=r"rater3 \(2, 4, 9, 8\)"):
        read_case(tmp_path)


def test_image_without_geometry_keeps_the_nifti_raters_affine(tmp_path):
    import tifffile
    from raterseg.datasets import read_case
    from raterseg.io import write_array

    lab = np.zeros((8, 9, 4), np.uint8)
    lab[2:5, 3:7, 1:3] = 1
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-3.0, 4.0, 5.0)
    for r in (1, 2):
        nib.save(nib.Nifti1Image(lab, affine), tmp_path / f"rater{r}.nii.gz")
    for name in ("image.tif", "image.npy"):
        image = np.ones(lab.T.shape, np.float32)
        (tifffile.imwrite if name.endswith(".tif") else np.save)(tmp_path / name, image)
        case = read_case(tmp_path)
        np.testing.assert_allclose(case.meta["affine"], affine)
        assert case.meta["image_path"].endswith(name)
        write_array(tmp_path / "out" / "truth.nii.gz", case.raters[0], case.meta)
        written = nib.load(tmp_path / "out" / "truth.nii.gz")
        np.testing.assert_allclose(written.affine, affine)
        assert np.array_equal(np.asarray(written.dataobj), lab)
        (tmp_path / name).unlink()
    # an image with its own geometry gives it (checked to be the raters' grid)
    nib.save(nib.Nifti1Image(lab.astype(np.float32), affine), tmp_path / "image.nii.gz")
    assert read_case(tmp_path).meta["path"].endswith("image.nii.gz")


def test_only_rater_label_files_make_a_folder_a_case(tmp_path):
    from raterseg.datasets import find_cases, scan_cohort

    lab = np.zeros((8, 9, 4), np.uint8)
    for c in ("c1", "c2"):
        (tmp_path / c).mkdir()
        for r in (1, 2):
            nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / c / f"rater{r}.nii.gz")
    (tmp_path / "raters.csv").write_text("rater,name\nrater1,alice\n")
    (tmp_path / "rater_notes.txt").write_text("late\n")
    (tmp_path / "raters_docs").mkdir()  # a rater*/ folder of label files would make a case
    (tmp_path / "raters_docs" / "protocol.pdf").write_bytes(b"%PDF")
    assert find_cases(tmp_path) == [tmp_path / "c1", tmp_path / "c2"]
    (tmp_path / "c3").mkdir()
    (tmp_path / "c3" / "rater1.mha").write_bytes(b"")  # no supported ending
    cases, ignored = scan_cohort(tmp_path)
    assert cases == [tmp_path / "c1", tmp_path / "c2"]
    why = "no rater* label files or rater*/ folders (found {})"
    assert ignored == [(tmp_path / "c3", why.format("rater1.mha")),
                       (tmp_path / "raters_docs", why.format("protocol.pdf"))]
    assert find_cases(tmp_path / "c1") == [tmp_path / "c1"]

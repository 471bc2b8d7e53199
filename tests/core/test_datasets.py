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
    with pytest.raises(RaterSegError, match=r"raters: '.*rater3.nii.gz' lies on another voxel grid"):
        read_case(tmp_path)

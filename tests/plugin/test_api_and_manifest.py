"""The console API and the npe2 manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import raterseg as rs

from napari_raterseg.api import fuse_layers

REPO = Path(__file__).resolve().parents[2]


def test_manifest_is_valid_and_every_command_imports():
    import npe2

    manifest = npe2.PluginManifest.from_file(REPO / "napari.yaml")
    assert manifest.name == "napari-raterseg"
    manifest.validate_imports()  # raises if any python_name does not resolve
    contrib = manifest.contributions
    patterns = {p for r in contrib.readers for p in r.filename_patterns}
    assert {"*.nii.gz", "*.tif", "*.tiff", "*.npy", "*.npz", "*.png"} <= patterns
    # one writer for a Labels layer, one for an Image layer, one for several of them
    assert sorted(tuple(w.layer_types) for w in contrib.writers) == [
        ("image",), ("image*", "labels*"), ("labels",)]
    assert {s.key for s in contrib.sample_data} == {"phantom_2d", "phantom_3d"}
    assert {w.display_name for w in contrib.widgets} == {"Fuse raters", "Apply model"}
    # The package resource napari finds is the same file (a relative symlink).
    link = REPO / "napari_raterseg" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (REPO / "napari.yaml").resolve()


def test_fuse_layers_matches_the_core_and_adds_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-raterseg", "phantom_2d")
    raters = [lyr.name for lyr in viewer.layers if lyr._type_string == "labels"]
    res = fuse_layers(viewer, "phantom 2d", raters, "majority_vote", tie="undecided")
    expect = rs.fuse(np.stack([viewer.layers[n].data for n in raters]),
                     method="majority_vote", tie="undecided")
    np.testing.assert_array_equal(res.truth, expect.truth)
    np.testing.assert_array_equal(viewer.layers["phantom 2d truth [majority_vote]"].data,
                                  expect.truth)
    assert viewer.layers["phantom 2d uncertainty [majority_vote]"].colormap.name == "magma"
    # Raters default to every Labels layer that is not a result; a re-run replaces.
    n = len(viewer.layers)
    fuse_layers(viewer, "phantom 2d", method="majority_vote")
    assert len(viewer.layers) == n
    with pytest.raises(rs.RaterSegError, match="no layer named 'nope'"):
        fuse_layers(viewer, "nope", raters, "majority_vote")


def test_fuse_layers_rater_maps_have_rater_axis_first(make_napari_viewer):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    truth = np.zeros((24, 24), np.int16)
    truth[6:18, 6:18] = 1
    for r in range(3):
        noisy = np.where(rng.random(truth.shape) < 0.05, 1 - truth, truth)
        viewer.add_labels(noisy.astype(np.int16), name=f"r{r}", scale=(2.0, 2.0))
    fuse_layers(viewer, None, None, "spatial_staple", window=5)
    maps = viewer.layers["r0 +2 rater maps [spatial_staple]"]
    assert maps.data.shape == (3, 24, 24)
    np.testing.assert_allclose(maps.scale, (1.0, 2.0, 2.0))
    np.testing.assert_allclose(viewer.layers["r0 +2 truth [spatial_staple]"].scale, (2.0, 2.0))
    # the slider of the rater axis is named as such (napari's default would be "-3")
    assert viewer.dims.axis_labels[0] == "rater"


def test_multiclass_probability_has_class_axis_first(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = np.zeros((20, 30), np.int16)
    labels[4:16, 5:15] = 1
    labels[4:16, 15:25] = 2
    viewer.add_image(np.random.default_rng(0).random((20, 30)), name="img", scale=(2.0, 1.0))
    for r, shift in enumerate((0, 1, -1)):
        viewer.add_labels(np.roll(labels, shift, axis=1), name=f"r{r}")
    res = fuse_layers(viewer, "img", None, "majority_vote")
    prob = viewer.layers["img probability [majority_vote]"]
    assert prob.data.shape == (3, 20, 30)
    np.testing.assert_allclose(prob.scale, (1.0, 2.0, 1.0))
    assert viewer.dims.axis_labels[0] == "class"
    np.testing.assert_array_equal(viewer.layers["img truth [majority_vote]"].data, res.truth)
    assert set(np.unique(res.truth)) == {0, 1, 2}


def test_console_example_works_after_a_plain_import():
    # DESIGN/README: ``napari_raterseg.api.fuse_layers(viewer, ...)`` from napari's console.
    # After ``import napari_raterseg`` that was AttributeError (no attribute 'api'); the
    # import itself must stay light (no torch, napari or Qt) for plugin discovery.
    import subprocess
    import sys

    code = ("import sys, napari_raterseg\n"
            "heavy = [m for m in ('torch', 'napari', 'qtpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(napari_raterseg.api.fuse_layers)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_nifti_raters_on_different_voxel_grids_are_refused(make_napari_viewer, tmp_path):
    # A rater file mirrored left-right against the others (same array shape) was fused voxel
    # by voxel without a word; the command line refuses it (datasets.check_same_grid).
    import nibabel as nib

    lab = np.zeros((6, 10, 12), np.uint8)
    lab[1:4, 2:6, 3:9] = 1
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    mirrored = affine.copy()
    mirrored[0, 0], mirrored[0, 3] = -0.8, 0.8 * 5
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "rater_a.nii.gz")
    nib.save(nib.Nifti1Image(lab, affine), tmp_path / "rater_b.nii.gz")
    nib.save(nib.Nifti1Image(lab, mirrored), tmp_path / "rater_c.nii.gz")
    viewer = make_napari_viewer()
    viewer.open([str(tmp_path / f"rater_{c}.nii.gz") for c in "abc"], plugin="napari-raterseg")
    fuse_layers(viewer, None, ["rater_a", "rater_b"], "majority_vote")  # same grid: fine
    with pytest.raises(rs.RaterSegError, match="rater_c.*grid"):
        fuse_layers(viewer, None, ["rater_a", "rater_c"], "majority_vote")


def test_rater_layers_holding_0_and_255_fuse_as_binary_masks(make_napari_viewer):
    # An image mask converted to Labels holds 0/255: fused as classes 0..255 it gave 256
    # probability maps (a multi-class result) for a binary task. Files are read so already.
    viewer = make_napari_viewer()
    a = np.zeros((24, 24), np.uint8)
    a[4:14, 4:14] = 255
    b = np.roll(a, 2, axis=0)
    viewer.add_labels(a, name="mask a")
    viewer.add_labels(b // 255, name="mask b")
    res = fuse_layers(viewer, None, ["mask a", "mask b"], "majority_vote")
    assert res.probabilities.shape == (2, 24, 24)
    assert set(np.unique(res.truth)) <= {0, 1}
    assert viewer.layers["mask a"].data.max() == 255  # the layer itself is untouched


def test_an_image_layer_picked_as_rater_says_how_to_convert_it(make_napari_viewer):
    viewer = make_napari_viewer()
    a = np.zeros((24, 24), np.uint8)
    a[4:14, 4:14] = 1
    viewer.add_labels(a, name="mask a")
    viewer.add_image(np.roll(a, 2, axis=0).astype(np.float32) * 0.5, name="soft b")
    with pytest.raises(rs.RaterSegError, match="image layer 'soft b'.*Convert to Labels"):
        fuse_layers(viewer, None, ["mask a", "soft b"], "majority_vote")

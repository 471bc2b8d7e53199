"""``raterseg train`` and ``raterseg predict``: a tiny model trained from an .npz and from a
cohort folder, saved safely, and applied to NIfTI images (2D, and a volume slice by slice)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import raterseg as rs
import skimage.io
from raterseg import io as rio
from raterseg import synth
from raterseg.cli import main

TINY = ["--set", "features=4,8,8,8,8", "--set", "epochs=1", "--set", "batch_size=4",
        "--device", "cpu", "-q"]


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raterseg: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """Five 32×32 cases with three raters (uint8 images like LIDC, 'masks' key too)."""
    folder = tmp_path_factory.mktemp("npz")
    cases = [synth.sample_case(dims=2, num_raters=3, seed=i, shape=(32, 32)) for i in range(5)]
    images = np.stack([np.clip(c[0] * 200, 0, 255).astype(np.uint8) for c in cases])
    raters = np.stack([c[1] for c in cases])
    np.savez(folder / "data.npz", images=images, raters=raters)
    np.savez(folder / "lidc.npz", images=images, masks=raters > 0)
    return folder, images, raters


@pytest.fixture(scope="module")
def unet_model(npz, tmp_path_factory):
    folder, _, _ = npz
    model = tmp_path_factory.mktemp("model") / "sub" / "unet.safetensors"
    code = main(["train", str(folder / "data.npz"), "--method", "unet", "--set", "target=mean",
                 "--seed", "3", *TINY, "-o", str(model)])
    assert code == 0
    return model


def test_train_npz_saves_a_loadable_model(unet_model):
    m = rs.load(unet_model)
    assert m.name == "unet" and m.config.target == "mean" and m.seed == 3
    assert m.config.features == (4, 8, 8, 8, 8) and len(m.history_) == 1
    assert (m.num_classes, m.num_raters, m.in_channels_, m.data_ndim_) == (2, 3, 1, 2)


def test_predict_nifti_2d_and_a_volume_slice_by_slice(unet_model, npz, tmp_path, capsys):
    _, images, _ = npz
    img2d = images[0].astype(np.float32)
    rio.write_array(tmp_path / "slice.nii.gz", img2d, {"spacing": (0.7, 0.8)})
    vol = np.stack([images[i] for i in (1, 2, 3)]).astype(np.float32)
    rio.write_array(tmp_path / "vol.nii.gz", vol, {"spacing": (2.5, 0.7, 0.8)})
    code, out, err = _run(["predict", unet_model, tmp_path / "slice.nii.gz",
                           tmp_path / "vol.nii.gz", "--device", "cpu", "-o", tmp_path / "pred"],
                          capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["slice", "vol"]
    m = rs.load(unet_model)
    want2d = m.predict(img2d[None])
    truth, meta = rio.read_array(tmp_path / "pred" / "slice" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, want2d.truth[0])
    prob, _ = rio.read_array(tmp_path / "pred" / "slice" / "probabilities.nii.gz")
    assert prob.shape == (2, 32, 32)
    np.testing.assert_allclose(prob, want2d.probabilities[0], atol=1e-6)
    _, src = rio.read_array(tmp_path / "slice.nii.gz")
    np.testing.assert_array_equal(meta["affine"], src["affine"])  # the image's geometry
    # the volume: each slice predicted like a 2D image, slice axis in front of (H, W)
    wantv = m.predict(vol)
    truth, meta = rio.read_array(tmp_path / "pred" / "vol" / "truth.nii.gz")
    assert truth.shape == (3, 32, 32) and meta["spacing"] == pytest.approx((2.5, 0.7, 0.8))
    np.testing.assert_array_equal(truth, wantv.truth)
    prob, _ = rio.read_array(tmp_path / "pred" / "vol" / "probabilities.nii.gz")
    assert prob.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(prob, np.moveaxis(wantv.probabilities, 0, 1), atol=1e-6)
    unc, _ = rio.read_array(tmp_path / "pred" / "vol" / "uncertainty.nii.gz")
    assert unc.shape == (3, 32, 32) and 0 <= unc.min() and unc.max() <= 1
    summary = json.loads((tmp_path / "pred" / "vol" / "summary.json").read_text())
    assert summary["method"] == "unet" and summary["spatial_shape"] == [3, 32, 32]
    assert summary["source"].endswith("vol.nii.gz")  # which image this result belongs to
    assert "vol    3x32x32" in out


def test_train_cohort_folder_with_cm_and_predict_rater_maps(tmp_path, capsys):
    for i in range(3):
        image, raters, _ = synth.sample_case(dims=2, num_raters=2 + (i > 0), seed=i,
                                             shape=(32, 32))
        for r in range(raters.shape[0]):
            name = ("alice", "bob", "carol")[r]
            rio.write_array(tmp_path / "c" / f"case{i}" / f"rater_{name}.nii.gz", raters[r])
        rio.write_array(tmp_path / "c" / f"case{i}" / "image.nii.gz", image)
    code, _, err = _run(["train", tmp_path / "c", "-m", "cm", *TINY, "-o",
                           tmp_path / "cm.safetensors"], capsys)
    assert code == 0, err
    m = rs.load(tmp_path / "cm.safetensors")
    assert m.name == "cm" and m.num_raters == 3  # rater3 missing from case0 is allowed
    code, _, err = _run(["predict", tmp_path / "cm.safetensors",
                         tmp_path / "c" / "case0" / "image.nii.gz", "-o", tmp_path / "p", "-q"],
                        capsys)
    assert code == 0, err
    maps, _ = rio.read_array(tmp_path / "p" / "image" / "rater_maps.nii.gz")
    assert maps.shape == (3, 32, 32) and 0 <= maps.min() and maps.max() <= 1
    table = (tmp_path / "p" / "image" / "rater_confusion.csv").read_text()
    assert table.count("\n") == 1 + 3 * 4
    # the raters keep the names train matched them by (they were rater1..3)
    assert [ln.split(",")[0] for ln in table.splitlines()[1::4]] == [
        "rater_alice", "rater_bob", "rater_carol"]
    summary = json.loads((tmp_path / "p" / "image" / "summary.json").read_text())
    assert summary["rater_names"] == ["rater_alice", "rater_bob", "rater_carol"]
    assert m.rater_names_ == ["rater_alice", "rater_bob", "rater_carol"]


def test_train_lidc_masks_key_with_progress(npz, tmp_path, capsys):
    folder, _, _ = npz
    code, out, err = _run(["train", folder / "lidc.npz", "-m", "unet", *TINY[:-1], "-o",
                           tmp_path / "m.safetensors"], capsys)
    assert code == 0, err
    m = rs.load(tmp_path / "m.safetensors")
    assert m.num_raters == 3 and m.num_classes == 2
    assert "unet: trained on 5 cases (3 raters, 2 classes) for 1 epoch in " in out
    assert "; kept epoch 1: loss=" in out
    assert "raterseg train: 5 cases, 3 raters, shape (32, 32)" in err
    assert "unet [##############################] 1/1" in err  # the epoch progress bar


def test_train_and_predict_bad_input_exit_2(npz, unet_model, tmp_path, capsys):
    folder, _, _ = npz
    for case, (dims, shape) in enumerate([(2, (32, 32)), (2, (24, 32))]):
        image, raters, _ = synth.sample_case(dims=dims, num_raters=2, seed=case, shape=shape)
        rio.write_array(tmp_path / "mixed" / f"case{case}" / "image.nii.gz", image)
        for r in range(2):
            rio.write_array(tmp_path / "mixed" / f"case{case}" / f"rater{r}.nii.gz", raters[r])
    (tmp_path / "notes.txt").write_text("not a model")
    rio.write_array(tmp_path / "rgb.nii.gz", np.zeros((3, 8, 32, 32), np.float32))
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[8:20, 10:22, 0] = 200  # an RGB photo of a slice, not 3 slices of a volume
    skimage.io.imsave(tmp_path / "colour.png", colour, check_contrast=False)
    np.save(tmp_path / "ok.npy", np.zeros((32, 32), np.float32))
    np.save(tmp_path / "nan.npy", np.full((32, 32), np.nan, np.float32))
    m = tmp_path / "m.safetensors"
    for argv, match in [
        (["train", folder / "data.npz", "-m", "staple", "-o", m],
         "--method: train needs a learned method .* got the classical 'staple'"),
        (["train", tmp_path / "mixed", "-m", "unet", "-o", m],
         r"spatial shape \(32, 32\) of 'case0', got \(24, 32\) in 'case1'"),
        (["train", tmp_path / "absent.npz", "-m", "unet", "-o", m], "no such file"),
        (["train", folder / "data.npz", "-m", "unet", "--set", "epoch=1", "-o", m],
         "did you mean 'epochs'"),
        (["train", folder / "data.npz", "-m", "unet", "-o", tmp_path],
         "expected a model file name .*, got the folder"),
        (["train", folder / "data.npz", "-m", "unet", "-o", f"{tmp_path / 'new'}/"],
         "expected a model file name .*, got the folder .*new/"),  # not a file named 'new'
        (["predict", unet_model, tmp_path / "ok.npy", tmp_path / "nan.npy", "-o", tmp_path / "o"],
         r"IMG \('.*nan.npy'\): contains NaN"),
        (["predict", tmp_path / "notes.txt", tmp_path / "rgb.nii.gz", "-o", tmp_path / "o"],
         "is not one"),
        (["predict", unet_model, tmp_path / "rgb.nii.gz", "-o", tmp_path / "o"],
         r"expected a 2D image with 1 channel\(s\).*got shape \(3, 8, 32, 32\)"),
        (["predict", unet_model, tmp_path / "colour.png", "-o", tmp_path / "o"],
         r"IMG .*colour.png.*expected 1 channel\(s\) .* colour image with 3"),
        (["predict", unet_model, tmp_path / "absent.nii.gz", "-o", tmp_path / "o"],
         "IMG: no such file"),
    ]:
        code, out, err = _run(argv, capsys)
        assert re.search(match, _error(code, err)), err
        assert out == ""
        assert not m.exists() and not (tmp_path / "o").exists() and not (tmp_path / "new").exists()


def test_predict_case_and_cohort_folders_and_images_of_one_name(unet_model, npz, tmp_path,
                                                                capsys):
    """A case folder (image.png beside rater*.png, as train and fuse-dir read it) is its
    image alone, named by the folder; a folder of case folders gives one result per case;
    images sharing a file name get their folder's name instead of image, image_2."""
    _, images, raters = npz
    m = rs.load(unet_model)
    for i in range(3):
        case = tmp_path / "cohort" / f"case{i}"
        case.mkdir(parents=True)
        skimage.io.imsave(case / "image.png", images[i], check_contrast=False)
        for r in range(3):
            skimage.io.imsave(case / f"rater{r + 1}.png", (raters[i, r] * 255).astype(np.uint8),
                              check_contrast=False)
    code, out, err = _run(["predict", unet_model, tmp_path / "cohort" / "case0", "-o",
                           tmp_path / "one", "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "case0  32x32" in out  # the image, not image + 3 masks as a 4-slice volume
    truth, _ = rio.read_array(tmp_path / "one" / "case0" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, m.predict(images[:1].astype(np.float32)).truth[0])
    code, _, err = _run(["predict", unet_model, tmp_path / "cohort", "-o", tmp_path / "all",
                         "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["case0", "case1", "case2"]
    truth, _ = rio.read_array(tmp_path / "all" / "case2" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, m.predict(images[2:3].astype(np.float32)).truth[0])
    code, _, err = _run(["predict", unet_model, *(tmp_path / "cohort" / f"case{i}" / "image.png"
                                                  for i in (0, 1)),
                         "-o", tmp_path / "files", "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["case0", "case1"]
    # writing the results into the cohort would put rater_maps.* inside each case folder
    code, _, err = _run(["predict", unet_model, tmp_path / "cohort" / "case1", "-o",
                         tmp_path / "cohort", "--device", "cpu"], capsys)
    assert "in or beside the image's own folder" in _error(code, err)
    # nor into a folder further up (a cohort of sites: cohort/site/case), where the new
    # case1/ with its rater_maps.* would be taken for a case of that folder
    code, _, err = _run(["predict", unet_model, tmp_path / "cohort" / "case1", "-o",
                         tmp_path, "--device", "cpu"], capsys)
    assert "in or beside the image's own folder" in _error(code, err)
    assert not (tmp_path / "case1").exists()
    # the image file given directly, into its case folder or beside it in the cohort
    for out in (tmp_path / "cohort" / "case1", tmp_path / "cohort"):
        code, _, err = _run(["predict", unet_model, tmp_path / "cohort" / "case1" / "image.png",
                             "-o", out, "--device", "cpu"], capsys)
        assert "in or beside the image's own folder" in _error(code, err)
    assert sorted(p.name for p in (tmp_path / "cohort" / "case1").iterdir()) == [
        "image.png", "rater1.png", "rater2.png", "rater3.png"]
    assert sorted(p.name for p in (tmp_path / "cohort").iterdir()) == ["case0", "case1", "case2"]
    (tmp_path / "cohort" / "case0" / "image.png").unlink()
    code, _, err = _run(["predict", unet_model, tmp_path / "cohort" / "case0", "-o",
                         tmp_path / "none", "--device", "cpu"], capsys)
    assert "holds rater files but no image" in _error(code, err)
    # in a cohort the other cases are segmented and the one left out is named (it was not)
    code, _, err = _run(["predict", unet_model, tmp_path / "cohort", "-o", tmp_path / "rest",
                         "-q", "--device", "cpu"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "rest").iterdir()) == ["case1", "case2"]
    assert "case0' left out: it holds rater files but no image" in err


def test_train_npz_mistakes_name_data(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 16, 16), "f4"),
             raters=np.zeros((3, 4, 16, 16), "i1"))
    code, _, err = _run(["train", tmp_path / "bad.npz", "-m", "cm", "-o",
                         tmp_path / "m.safetensors"], capsys)
    line = _error(code, err)
    assert line.startswith("raterseg: error: DATA: ") and "bad.npz" in line, line


def test_train_reports_the_epochs_whose_weights_were_kept():
    # AVAP trains in two runs (steps) with different losses: each keeps its own best epoch,
    # so the report must not pick one minimum over both (it named a step-1 epoch)
    from raterseg.cli import _kept_epochs

    history = [{"epoch": 1, "step": 1, "loss": 1.5, "val_loss": 1.2},
               {"epoch": 2, "step": 1, "loss": 1.4, "val_loss": 1.175},
               {"epoch": 3, "step": 2, "loss": 2.0, "val_loss": 1.861},
               {"epoch": 4, "step": 2, "loss": 1.9, "val_loss": 1.304}]
    assert _kept_epochs(history) == ("; kept epoch 2 (step 1): loss=1.4 val_loss=1.175; "
                                     "epoch 4 (step 2): loss=1.9 val_loss=1.304")
    # one run without validation: the lowest training loss, the first one on ties
    plain = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.4}, {"epoch": 3, "loss": 0.4}]
    assert _kept_epochs(plain) == "; kept epoch 2: loss=0.4"
    assert _kept_epochs([]) == ""

"""Bad input through the public API: RaterSegError naming the argument; inputs untouched."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import raterseg as rs
from raterseg import io as rio
from raterseg.types import RaterSegError

CLASSICAL = rs.available_methods(learned=False)


def _raters(R=3, shape=(8, 8)):
    raters = np.zeros((R, *shape), np.int16)
    raters[:, 2:6, 2:6] = 1
    raters[0, 1, 1] = 1
    return raters


def _expect_error(call, argname: str, *inputs, match: str = "") -> str:
    """``call()`` raises RaterSegError naming ``argname``, leaving ``inputs`` as they were."""
    before = copy.deepcopy(inputs)
    with pytest.raises(RaterSegError) as info:
        call()
    msg = str(info.value)
    assert re.search(rf"(^|\W){re.escape(argname)}(\W|$)", msg), msg
    assert re.search(match, msg), msg
    assert "\n" not in msg
    for now, then in zip(inputs, before):
        if isinstance(now, list):
            assert len(now) == len(then)
            for a, b in zip(now, then):
                np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_array_equal(now, then)
    return msg


def test_error_is_a_value_error():
    assert issubclass(RaterSegError, ValueError)


@pytest.mark.parametrize("method", CLASSICAL)
def test_image_shape_disagrees_with_raters(method):
    raters, image = _raters(), np.zeros((8, 9), np.float32)
    _expect_error(lambda: rs.fuse(raters, image=image, method=method), "image", raters, image,
                  match=r"\(8, 8\).*\(8, 9\)")


@pytest.mark.parametrize("method", CLASSICAL)
def test_raters_of_different_shapes(method):
    raters = [np.zeros((8, 8), np.int16), np.zeros((8, 8), np.int16), np.zeros((8, 7), np.int16)]
    _expect_error(lambda: rs.fuse(raters, method=method), "raters", raters,
                  match=r"same shape.*\(8, 7\)")


@pytest.mark.parametrize("raters", [np.zeros((0, 8, 8), np.int16), []], ids=["array", "list"])
def test_zero_raters(raters):
    _expect_error(lambda: rs.fuse(raters, method="majority_vote"), "raters", raters,
                  match="at least one rater")


@pytest.mark.parametrize("method", CLASSICAL)
def test_float_labels(method):
    raters = _raters().astype(np.float32) * 0.5
    _expect_error(lambda: rs.fuse(raters, method=method), "raters", raters,
                  match="integer class labels.*float32")


@pytest.mark.parametrize("method", CLASSICAL)
def test_labels_not_below_num_classes(method):
    raters = _raters()
    raters[1, 0, 0] = 2
    _expect_error(lambda: rs.fuse(raters, method=method, num_classes=2), "raters", raters,
                  match=r"0\.\.1 \(num_classes=2\).*2")


def test_labels_below_minus_one():
    raters = _raters()
    raters[0, 0, 0] = -3
    _expect_error(lambda: rs.fuse(raters, method="mean"), "raters", raters, match="-3")


@pytest.mark.parametrize("method", CLASSICAL)
def test_every_rater_missing(method):
    raters = np.full((3, 8, 8), -1, np.int16)
    _expect_error(lambda: rs.fuse(raters, method=method), "raters", raters,
                  match="every rater is -1")


@pytest.mark.parametrize("method", CLASSICAL)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_image(method, bad):
    raters, image = _raters(), np.ones((8, 8), np.float32)
    image[3, 3] = bad
    _expect_error(lambda: rs.fuse(raters, image=image, method=method), "image", raters, image,
                  match="NaN or infinite")


def test_unknown_method_suggests_closest():
    raters = _raters()
    msg = _expect_error(lambda: rs.fuse(raters, method="majority-vote"), "method", raters)
    assert "did you mean 'majority_vote'" in msg
    _expect_error(lambda: rs.create("nonsense"), "method", match="expected one of")


def test_unknown_parameter_suggests_closest():
    raters = _raters()
    msg = _expect_error(lambda: rs.fuse(raters, method="majority_vote", ties="lowest"), "ties",
                        raters, match="not a parameter of method 'majority_vote'")
    assert "did you mean 'tie'" in msg
    _expect_error(lambda: rs.create("mean", anything=1), "anything", match="expected one of")
    # names from other tools point to ours (spelling alone suggested 'apm_raters' here)
    msg = _expect_error(lambda: rs.create("avap", learning_rate=1e-3), "learning_rate",
                        match="not a parameter")
    assert msg.endswith("did you mean 'lr'?")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-inf"])
def test_a_float_parameter_must_be_finite(value):
    # NaN fails every comparison, so it passed the range check: staple(tolerance=nan) never
    # stopped early, cm(lr=nan) trained a network of NaNs
    _expect_error(lambda: rs.create("staple", tolerance=value), "tolerance",
                  match="expected a finite number")
    _expect_error(lambda: rs.create("cm", lr=value), "lr", match="expected a finite number")


def test_parameter_value_outside_its_choices():
    raters = _raters()
    msg = _expect_error(lambda: rs.fuse(raters, method="majority_vote", tie="lowset"), "tie",
                        raters, match="expected one of")
    assert "did you mean 'lowest'" in msg


@pytest.mark.parametrize("kwargs, argname", [
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"seed": 0.5}, "seed"),
    ({"seed": None}, "seed"),
    ({"seed": "x"}, "seed"),
    ({"num_classes": "3"}, "num_classes"),
    ({"device": "tpu"}, "device"),
])
def test_bad_common_arguments(kwargs, argname):
    raters = _raters()
    _expect_error(lambda: rs.fuse(raters, method="majority_vote", **kwargs), argname, raters)


def test_unreadable_files(tmp_path):
    _expect_error(lambda: rio.read_array(tmp_path / "absent.nii.gz"), "path", match="no such file")
    (tmp_path / "folder.nii.gz").mkdir()
    _expect_error(lambda: rio.read_array(tmp_path / "folder.nii.gz"), "path", match="folder")
    (tmp_path / "rater.mha").write_bytes(b"\0" * 10)
    _expect_error(lambda: rio.read_array(tmp_path / "rater.mha"), "path",
                  match=r"expected a file ending in .*rater\.mha")
    rio.write_array(tmp_path / "ok.nii.gz", np.zeros((4, 4, 4), np.int16))
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])  # a truncated download
    _expect_error(lambda: rio.read_array(tmp_path / "cut.nii.gz"), "path",
                  match=r"cut\.nii\.gz' is not a readable nifti file")


@pytest.mark.parametrize("name, fmt", [("labels.nii.gz", "nifti"), ("labels.nii", "nifti"),
                                       ("labels.tif", "tiff"), ("labels.npy", "npy"),
                                       ("labels.npz", "npz"), ("labels.png", "png")])
def test_file_that_is_not_what_its_name_says(tmp_path, name, fmt):
    # a JPEG-like / random byte file renamed to something it is not
    path = tmp_path / name
    path.write_bytes(b"GIF89a" + bytes(range(256)) * 4)
    msg = _expect_error(lambda: rio.read_array(path), "path",
                        match=rf"is not a readable {fmt} file as its name says")
    assert str(path) in msg


def test_image_file_renamed_to_a_label_file(tmp_path):
    # a real NIfTI file named .png: the PNG reader refuses it, nothing else is tried
    rio.write_array(tmp_path / "real.nii.gz", np.zeros((3, 4, 5), np.int16))
    (tmp_path / "real.nii.gz").rename(tmp_path / "rater1.png")
    _expect_error(lambda: rio.read_case(tmp_path), "raters", match="not a readable png file")


def test_jpeg_named_png_is_refused(tmp_path):
    rio.write_array(tmp_path / "mask.jpg", np.zeros((8, 8), np.uint8))
    (tmp_path / "mask.jpg").rename(tmp_path / "mask.png")
    _expect_error(lambda: rio.read_array(tmp_path / "mask.png"), "path",
                  match="holds a JPEG image, not PNG")


def test_labels_far_beyond_any_class_count_need_an_explicit_num_classes():
    # object ids (or a sparse atlas) as labels: one probability map per label up to the
    # largest would exhaust memory (label 70000 made STAPLE ask for 78 GB)
    raters = np.zeros((2, 6, 6), np.int32)
    raters[:, 2:4, 2:4] = 299
    before = raters.copy()
    with pytest.raises(rs.RaterSegError, match=r"raters: the largest label is 299.*num_classes=300"):
        rs.fuse(raters, method="majority_vote")
    assert np.array_equal(raters, before)
    res = rs.fuse(raters, method="majority_vote", num_classes=300)  # said explicitly: fine
    assert res.probabilities.shape == (300, 6, 6) and res.truth.max() == 299


def test_grey_levels_are_not_taken_as_hundreds_of_classes():
    # 0/255 masks and anti-aliased edges (0/128/255) from image tools: inferred as classes
    # 0..255 they made 256 probability maps for 2-3 classes
    raters = np.zeros((3, 16, 16), np.int16)
    raters[:, 4:12, 4:12] = 255
    original = raters.copy()
    with pytest.raises(RaterSegError, match=r"raters: .*up to 255 but only 2 values occur "
                                            r"\(0, 255\).*0/255 mask.*num_classes=256"):
        rs.fuse(raters, method="majority_vote")
    raters[0, 4, 4:12] = 128
    with pytest.raises(RaterSegError, match=r"only 3 values occur \(0, 128, 255\).*threshold"):
        rs.fuse(raters, method="majority_vote")
    np.testing.assert_array_equal(raters[1:], original[1:])
    # as 0/1 it fuses; with an explicit num_classes the caller gets what they asked for
    assert rs.fuse(raters // 255, method="majority_vote").num_classes == 2
    assert rs.fuse(raters, method="majority_vote", num_classes=256).num_classes == 256
    # dense labels (every class occurs) are classes, however many; so are sparse class ids
    # that do not end at 255 (a crop of a TotalSegmentator map)
    dense = np.arange(3 * 8 * 15, dtype=np.int16).reshape(3, 8, 15) % 40
    assert rs.fuse(dense, method="majority_vote").num_classes == 40
    ids = np.array([0, 1, 5, 12, 55, 90, 117], np.int16)[dense % 7]
    assert rs.fuse(ids, method="majority_vote").num_classes == 118


@pytest.mark.parametrize("method", ["unet", "cm"])
def test_learned_method_refuses_a_blank_image(method):
    # a constant image (e.g. the wrong layer or an empty file) gives a learned model nothing
    # to segment from; it is refused before any training
    raters, image = _raters(), np.full((8, 8), 3.0, np.float32)
    _expect_error(lambda: rs.fuse(raters, image=image, method=method, epochs=1), "image", raters,
                  image, match="constant")
    images = np.zeros((2, 8, 8), np.float32)
    _expect_error(lambda: rs.create(method, epochs=1).fit(images, np.stack([raters, raters])),
                  "images", images, match="each image is constant")
    # one blank image among others is fine (e.g. padding slices)
    images[1, 2:5, 2:5] = 1.0
    rs.create(method, epochs=1, features=(4, 4, 4, 4, 4), val_fraction=0.0).fit(
        images, np.stack([raters, raters]))

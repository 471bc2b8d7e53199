"""raterseg.synth: simulated raters, missing raters, phantoms, MNIST."""

from __future__ import annotations

import gzip
import subprocess
import sys

import numpy as np
import pytest
from raterseg import RaterSegError, as_rater_stack, synth
from raterseg.metrics import dice
from scipy import ndimage as ndi
from skimage.morphology import ball, disk


@pytest.fixture(scope="module")
def truth2d():
    return synth.phantom_2d((64, 64), seed=0)[1]


@pytest.mark.parametrize("r", [1, 2, 3])
def test_over_under_are_euclidean_dilation_erosion_2d(truth2d, r):
    over = synth.simulate_rater(truth2d, "over", r)
    under = synth.simulate_rater(truth2d, "under", r)
    np.testing.assert_array_equal(over, ndi.binary_dilation(truth2d > 0, disk(r)))
    np.testing.assert_array_equal(under, ndi.binary_erosion(truth2d > 0, disk(r), border_value=1))


def test_over_under_are_euclidean_dilation_erosion_3d():
    _, truth = synth.phantom_3d((24, 32, 32), seed=0)
    assert truth.sum() > 500
    np.testing.assert_array_equal(synth.simulate_rater(truth, "over", 2),
                                  ndi.binary_dilation(truth > 0, ball(2)))
    np.testing.assert_array_equal(synth.simulate_rater(truth, "under", 1),
                                  ndi.binary_erosion(truth > 0, ball(1), border_value=1))


def test_kinds_behave_as_named(truth2d):
    fg = int(truth2d.sum())
    good = synth.simulate_rater(truth2d, "good", 1.0, seed=1)
    wrong = synth.simulate_rater(truth2d, "wrong", 2.0, seed=1)
    over = synth.simulate_rater(truth2d, "over", 2.0)
    flip = synth.simulate_rater(truth2d, "flip", 0.2, seed=1)
    assert dice(good, truth2d) > 0.9 and not np.array_equal(good, truth2d)
    # wrong = thickening with cuts: inside the thickened mask, with some of it erased
    assert np.all(wrong <= over) and 0 < (over - wrong).sum() < 0.2 * over.sum()
    assert synth.simulate_rater(truth2d, "blank").sum() == 0
    assert abs((flip != truth2d).mean() - 0.2) < 0.02
    assert synth.simulate_rater(truth2d, "under", 2).sum() < fg < over.sum()


def test_same_seed_same_output_other_seed_differs(truth2d):
    for kind in ("good", "wrong", "flip"):
        a = synth.simulate_rater(truth2d, kind, seed=5)
        np.testing.assert_array_equal(a, synth.simulate_rater(truth2d, kind, seed=5))
        assert not np.array_equal(a, synth.simulate_rater(truth2d, kind, seed=6))
    img_a, t_a = synth.phantom_2d((32, 32), seed=3)
    img_b, t_b = synth.phantom_2d((32, 32), seed=3)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(t_a, t_b)


def test_multiclass_labels_stay_valid_and_inner_boundaries_stay():
    _, truth = synth.phantom_2d((96, 96), num_classes=4, seed=3)
    assert set(np.unique(truth)) == {0, 1, 2, 3}
    for kind in ("good", "over", "under", "wrong", "flip"):
        r = synth.simulate_rater(truth, kind, seed=2)
        assert r.dtype == np.int16 and r.min() >= 0 and r.max() <= 3
    over = synth.simulate_rater(truth, "over", 2)
    # foreground grows by a radius-2 ball; labels inside the old foreground are kept
    np.testing.assert_array_equal(over > 0, ndi.binary_dilation(truth > 0, disk(2)))
    np.testing.assert_array_equal(over[truth > 0], truth[truth > 0])


def test_simulate_raters_stack_and_strength_list(truth2d):
    raters = synth.simulate_raters(truth2d, seed=0)
    assert raters.shape == (5,) + truth2d.shape
    assert raters[4].sum() == 0  # blank
    stack = as_rater_stack(raters)  # a valid input for every method
    assert stack.num_classes == 2
    two = synth.simulate_raters(truth2d, ("over", "over"), strength=[1, 3])
    assert two[0].sum() < two[1].sum()
    with pytest.raises(RaterSegError, match="strength"):
        synth.simulate_raters(truth2d, ("over", "under"), strength=[1, 2, 3])
    with pytest.raises(RaterSegError, match="kind.*'over'"):
        synth.simulate_rater(truth2d, "ovr")
    with pytest.raises(RaterSegError, match="strength"):
        synth.simulate_rater(truth2d, "flip", 1.5)
    with pytest.raises(RaterSegError, match="truth"):
        synth.simulate_rater(np.zeros((4, 4), np.float32), "good")


def test_drop_raters_one_per_case_and_fraction(rng):
    raters = rng.integers(0, 2, size=(50, 4, 6, 6)).astype(np.int16)
    original = raters.copy()
    one = synth.drop_raters(raters, mode="one_per_case", seed=1, batched=True)
    np.testing.assert_array_equal(raters, original)  # input untouched
    kept = (one >= 0).all(axis=(2, 3))
    missing = (one == -1).all(axis=(2, 3))
    assert np.all(kept.sum(1) == 1) and np.all(kept | missing)
    np.testing.assert_array_equal(one[kept], raters[kept])
    assert len(set(np.flatnonzero(kept) % 4)) > 1  # the kept rater varies between cases
    some = synth.drop_raters(raters, 0.5, seed=1, batched=True)
    n_kept = (some >= 0).all(axis=(2, 3)).sum(1)
    assert n_kept.min() >= 1 and 1.5 < n_kept.mean() < 2.8
    as_rater_stack(some, batched=True)  # every case still has a rater
    single = synth.drop_raters(raters[0], mode="one_per_case")  # (R, H, W), inferred
    assert ((single >= 0).all(axis=(1, 2))).sum() == 1
    with pytest.raises(RaterSegError, match="batched"):
        synth.drop_raters(raters, 0.5)
    with pytest.raises(RaterSegError, match="fraction"):
        synth.drop_raters(raters, 0.5, mode="one_per_case", batched=True)


def test_phantoms_look_like_images():
    img, truth = synth.phantom_2d(num_classes=3, seed=1)
    assert img.shape == truth.shape == (128, 128) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(truth)) == {0, 1, 2}
    means = [img[truth == c].mean() for c in range(3)]
    assert means[0] < means[1] < means[2]  # intensity tells the classes apart
    assert 0.03 < (truth > 0).mean() < 0.5
    img3, truth3 = synth.phantom_3d((32, 48, 48), seed=2)
    assert img3.shape == truth3.shape == (32, 48, 48)
    assert 0.01 < truth3.mean() < 0.5
    with pytest.raises(RaterSegError, match="shape"):
        synth.phantom_2d((64, 64, 64))


def test_sample_case_has_distinct_raters():
    image, raters, truth = synth.sample_case(dims=2, num_raters=4, seed=0)
    assert image.shape == truth.shape == (128, 128) and raters.shape == (4, 128, 128)
    d = [dice(r, truth) for r in raters]
    assert d[0] > 0.9 and min(d) > 0.6 and len({round(x, 3) for x in d}) == 4
    assert raters[1].sum() > truth.sum() > raters[2].sum()  # over, under
    _, r3, t3 = synth.sample_case(dims=3, num_raters=2, seed=0, shape=(16, 32, 32))
    assert r3.shape == (2, 16, 32, 32) and t3.shape == (16, 32, 32)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_load_mnist_parses_idx(tmp_path, rng):
    raw = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", raw)
    images, masks = synth.load_mnist(tmp_path, n=3)
    assert images.shape == masks.shape == (3, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images, raw[:3] / 255.0)
    np.testing.assert_array_equal(masks, raw[:3] > 127)  # > 0.5 after scaling
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"not an idx file at all"))
    with pytest.raises(RaterSegError, match="idx"):
        synth.load_mnist(tmp_path / "bad.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaterSegError, match="no t10k-images"):
        synth.load_mnist(tmp_path / "empty")


def test_load_real_mnist(shared_dir):
    images, masks = synth.load_mnist(shared_dir / "data" / "mnist", n=20)
    assert images.shape == (20, 28, 28) and 0 <= images.min() and images.max() <= 1
    assert 0.05 < masks.mean() < 0.4  # digits are thin strokes


def test_synth_does_not_import_torch():
    code = "import sys, raterseg.synth, raterseg.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_small_sample_cases_still_have_biased_raters():
    # below ~43 voxels the scaled thickening/thinning once rounded to nothing, and the
    # over/under/wrong raters equalled the truth (demo --shape 16,32,32: all Dice 1.000)
    from raterseg import metrics

    for shape in ((16, 32, 32), (32, 32)):
        _img, raters, truth = synth.sample_case(dims=len(shape), shape=shape, seed=0)
        dice = [metrics.dice(r, truth) for r in raters]
        assert all(d < 0.9 for d in dice[1:]), (shape, dice)

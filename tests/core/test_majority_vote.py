"""majority_vote and mean (run on the pattern histogram) against plain per-voxel numpy
definitions and SimpleITK's LabelVotingImageFilter."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs
from raterseg.methods._base import empirical_confusion, normalized_entropy, observed_disagreement


def _dense_votes(raters, L):
    """Per-voxel vote counts, shares (uniform where nobody annotated) and totals."""
    counts = np.stack([(raters == c).sum(0) for c in range(L)])
    total = counts.sum(0)
    frac = counts.astype(np.float32) / np.maximum(total, 1).astype(np.float32)
    frac = np.where(total > 0, frac, np.float32(1 / L)).astype(np.float32)
    return counts, frac, total


def _confusion(raters, truth_prob):
    """The definition: soft counts per rater; no matrix (NaN) for a rater all -1."""
    cm = empirical_confusion(raters, truth_prob)
    cm[(raters.reshape(len(raters), -1) < 0).all(axis=1)] = np.nan
    return cm


def _random_raters(seed):
    rng = np.random.default_rng(seed)
    L = int(rng.integers(2, 6))
    R = int(rng.integers(1, 8))
    shape = [(17, 23), (5, 9, 11)][seed % 2]
    raters = rng.integers(-1 if seed % 3 else 0, L, (R,) + shape)
    raters[:, :2] = -1  # some voxels nobody annotated
    raters.reshape(R, -1)[:, -1] = 0  # at least one annotation
    if seed % 4 == 0 and R > 1:
        raters[0] = -1  # a rater missing on the whole case
    return raters, L


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("tie", ["lowest", "undecided"])
def test_majority_vote_equals_per_voxel_definition(seed, tie):
    raters, L = _random_raters(seed)
    before = raters.copy()
    res = rs.fuse(raters, method="majority_vote", num_classes=L, tie=tie, device="cpu")
    np.testing.assert_array_equal(raters, before)
    counts, frac, total = _dense_votes(raters, L)
    truth = counts.argmax(0)
    if tie == "undecided":
        n_top = (counts == counts.max(0)).sum(0)
        truth = np.where((n_top > 1) | (total == 0), -1, truth)
    np.testing.assert_array_equal(res.truth, truth)
    assert res.truth.dtype == np.int16
    np.testing.assert_array_equal(res.probabilities, frac)
    np.testing.assert_array_equal(res.uncertainty, normalized_entropy(frac))
    np.testing.assert_array_equal(res.disagreement, observed_disagreement(raters, L))
    hard = (truth[None] == np.arange(L).reshape((L,) + (1,) * truth.ndim)).astype(np.float32)
    np.testing.assert_allclose(res.rater_confusion, _confusion(raters, hard), atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_mean_equals_per_voxel_definition(seed):
    raters, L = _random_raters(100 + seed)
    res = rs.fuse(raters, method="mean", num_classes=L, device="cpu")
    _, frac, _ = _dense_votes(raters, L)
    np.testing.assert_array_equal(res.probabilities, frac)
    np.testing.assert_array_equal(res.truth, frac.argmax(0))
    np.testing.assert_array_equal(res.uncertainty, normalized_entropy(frac))
    np.testing.assert_allclose(res.rater_confusion, _confusion(raters, frac), atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_majority_vote_matches_simpleitk_label_voting(seed):
    sitk = pytest.importorskip("SimpleITK")
    rng = np.random.default_rng(seed)
    L = 2 + seed
    raters = rng.integers(0, L, (5, 12, 20, 24)).astype(np.uint8)
    lab = sitk.GetArrayFromImage(sitk.LabelVoting([sitk.GetImageFromArray(r) for r in raters]))
    res = rs.fuse(raters, method="majority_vote", tie="undecided", device="cpu")
    undecided = lab == L  # SimpleITK's max+1
    np.testing.assert_array_equal(res.truth[~undecided], lab[~undecided])
    np.testing.assert_array_equal(res.truth[undecided], -1)


def test_many_raters_use_the_unique_path():
    # 30 raters, 4 classes: 5^30 codes, far more than voxels
    rng = np.random.default_rng(3)
    raters = rng.integers(-1, 4, (30, 16, 18))
    res = rs.fuse(raters, method="majority_vote", num_classes=4, device="cpu")
    counts, frac, _ = _dense_votes(raters, 4)
    np.testing.assert_array_equal(res.probabilities, frac)
    np.testing.assert_array_equal(res.truth, counts.argmax(0))


@pytest.mark.gpu
def test_gpu_equals_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    raters, L = _random_raters(5)
    for method in ("majority_vote", "mean"):
        a = rs.fuse(raters, method=method, num_classes=L, device="cpu")
        b = rs.fuse(raters, method=method, num_classes=L, device="cuda")
        for f in ("truth", "probabilities", "uncertainty", "disagreement"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
        np.testing.assert_allclose(a.rater_confusion, b.rater_confusion, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_large_volume_split_over_threads_equals_per_voxel_definition(dtype):
    """Above ~1M voxels validation, the histogram and the gather run in voxel ranges on
    several threads (raterseg._threads); the ranges must tile the volume exactly,
    including a ragged last one."""
    import torch
    from raterseg._threads import ALIGN
    from raterseg.types import as_rater_stack

    rng = np.random.default_rng(5)
    shape = (9, 301, 613)  # 1.66M voxels: not a multiple of the range alignment
    assert np.prod(shape) > 4 * ALIGN and np.prod(shape) % ALIGN
    L = 3
    raters = rng.integers(0, L, (4,) + shape).astype(dtype)
    if dtype == np.int64:
        raters[1, 3] = -1  # a missing slice
    before = raters.copy()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        stack = as_rater_stack(raters)
        res = rs.fuse(raters, method="majority_vote", device="cpu")
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(raters, before)
    np.testing.assert_array_equal(stack.labels, raters)
    assert stack.labels.dtype == np.int16
    counts, frac, _ = _dense_votes(raters, L)
    np.testing.assert_array_equal(res.truth, counts.argmax(0))
    np.testing.assert_array_equal(res.probabilities, frac)
    np.testing.assert_array_equal(res.disagreement, observed_disagreement(raters, L))


@pytest.mark.parametrize("method", ["majority_vote", "mean", "staple", "spatial_staple"])
def test_a_class_that_never_occurs_has_no_confusion_column(method):
    # A lesion-free case (every rater drew nothing) says nothing of how raters see a
    # lesion: p(says 1 | truth 1) is NaN, not the identity's 1 (a "perfect" sensitivity
    # that would inflate averages over a cohort). The observed column is still right.
    kw = {"window": 5} if method == "spatial_staple" else {}
    empty = np.zeros((3, 12, 12), np.int16)
    cm = rs.fuse(empty, method=method, num_classes=2, **kw).rater_confusion
    assert np.isnan(cm[:, :, 1]).all()
    np.testing.assert_allclose(cm[:, :, 0], [[1, 0]] * 3)
    # labels with a gap ({0, 2}, so 3 classes): class 1 is never the truth
    gap = np.zeros((3, 12, 12), np.int16)
    gap[:, 3:9, 3:9] = 2
    gap[0, 3, 3:9] = 0
    cm = rs.fuse(gap, method=method, **kw).rater_confusion
    assert cm.shape == (3, 3, 3)
    assert np.isnan(cm[:, :, 1]).all()
    assert np.isfinite(cm[:, :, [0, 2]]).all()
    np.testing.assert_allclose(cm[:, :, [0, 2]].sum(axis=1), 1, atol=1e-5)

"""STAPLE against SimpleITK, a plain float64 numpy EM, a hand-worked case, and itself
(pattern histogram vs dense EM, CPU vs GPU)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import raterseg as rs
from raterseg.methods._patterns import pattern_histogram
from raterseg.methods.staple import staple_em
from scipy import ndimage as ndi

sitk = pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")




# ---------------------------------------------------------------- simulated raters
def _truth(rng, shape, L):
    """Smooth random blobs with labels 0..L-1."""
    field = ndi.gaussian_filter(rng.random((L - 1,) + shape), sigma=[0] + [2] * len(shape))
    truth = np.zeros(shape, np.int16)
    for c in range(1, L):
        truth[field[c - 1] > np.quantile(field[c - 1], 0.75)] = c
    return truth


def _raters(seed, shape, L, R):
    """R raters of one blob truth: over- and under-segmenting, noisy, label swaps."""
    rng = np.random.default_rng(seed)
    truth = _truth(rng, shape, L)
    out = []
    for r in range(R):
        x = truth.copy()
        kind = rng.integers(4)
        fg = x > 0
        if kind == 0:  # over-segmenting: grow foreground
            grown = ndi.binary_dilation(fg, iterations=int(rng.integers(1, 3)))
            x[grown & ~fg] = ndi.maximum_filter(x, size=5)[grown & ~fg]
        elif kind == 1:  # under-segmenting
            x[fg & ~ndi.binary_erosion(fg, iterations=int(rng.integers(1, 3)))] = 0
        flip = rng.random(shape) < rng.uniform(0.01, 0.15)  # noise for everyone
        x[flip] = rng.integers(0, L, int(flip.sum()))
        out.append(x)
    return np.stack(out)


def _shape(seed):
    return [(24, 30), (10, 14, 18), (40, 33), (6, 20, 22)][seed % 4]


def _sitk_images(raters):
    return [sitk.GetImageFromArray(x.astype(np.uint8)) for x in raters]


# ---------------------------------------------------------------- plain references
def ref_binary(D, max_iter=10000):
    """SimpleITK-order binary STAPLE in float64 numpy, leaving raters marked -1 out.

    D: int (R, N). Returns W (N,), p (R,), q (R,), iterations."""
    R = len(D)
    ann = D >= 0
    fg = D == 1
    bg = D == 0
    W = fg.sum(0) / np.maximum(ann.sum(0), 1)
    g = W[ann.any(0)].mean()
    last = None
    for it in range(max_iter):
        V = 1 - W
        p = np.array([np.dot(W, fg[r]) / np.dot(W, ann[r]) for r in range(R)])
        q = np.array([np.dot(V, bg[r]) / np.dot(V, ann[r]) for r in range(R)])
        a = np.ones_like(W)
        b = np.ones_like(W)
        for r in range(R):  # factor by label -1 (missing), 0, 1
            a *= np.array([1.0, 1 - p[r], p[r]])[D[r] + 1]
            b *= np.array([1.0, q[r], 1 - q[r]])[D[r] + 1]
        W = g * a / (g * a + (1 - g) * b)
        if last is not None and max(np.max((p - last[0]) ** 2), np.max((q - last[1]) ** 2)) <= 1e-14:
            break
        last = (p, q)
    return W, p, q, it


def ref_multilabel(D, L, tol=1e-5, max_iter=10000):
    """ITK MultiLabelSTAPLE order in float64 numpy, leaving raters marked -1 out.

    Returns W (N, L) normalised, theta (R, L, L)."""
    R, N = D.shape
    votes = np.stack([(D == c).sum(0) for c in range(L)], 1)
    top = votes.max(1)
    decided = ((votes == top[:, None]).sum(1) == 1) & (top > 0)
    voted = votes.argmax(1)
    theta = np.zeros((R, L, L))
    for r in range(R):
        for v in np.flatnonzero(decided & (D[r] >= 0)):
            theta[r, D[r, v], voted[v]] += 1
    rows = theta.sum(2, keepdims=True)
    theta = np.where(rows > 0, theta / np.where(rows > 0, rows, 1), 0)  # ITK: rows at the start
    prior = votes.sum(0) / votes.sum()

    def estep(theta):
        W = np.tile(prior, (N, 1))
        for r in range(R):
            ok = D[r] >= 0
            W[ok] *= theta[r][D[r, ok]]
        s = W.sum(1, keepdims=True)
        return np.where(s > 0, W / np.where(s > 0, s, 1), W)

    for _ in range(max_iter):
        W = estep(theta)
        new = np.zeros_like(theta)
        for r in range(R):
            for i in range(L):
                new[r, i] = W[D[r] == i].sum(0)
        cols = new.sum(1, keepdims=True)
        new = np.where(cols > 0, new / np.where(cols > 0, cols, 1), 0)
        done = np.abs(new - theta).max() < tol
        theta = new
        if done:
            break
    return estep(theta), theta


# ---------------------------------------------------------------- hand-worked case
def test_hand_worked_first_iteration_and_fixed_point():
    # raters on 4 voxels: r0 = [1,1,0,0], r1 = [1,0,0,0], r2 = [1,1,1,0]
    raters = np.array([[[1, 1, 0, 0]], [[1, 0, 0, 0]], [[1, 1, 1, 0]]])
    # W0 = [1, 2/3, 1/3, 0], prior 1/2; M: p = [5/6, 1/2, 1], q = [5/6, 1, 1/2];
    # E: W1 = [1, 5/6, 1/6, 0]; M: p = [11/12, 1/2, 1], q = [11/12, 1, 1/2];
    # E: W2 = [1, 11/12, 1/12, 0].
    res = rs.fuse(raters, method="staple", max_iterations=1, device="cpu")
    np.testing.assert_allclose(res.probabilities[1, 0], [1, 11 / 12, 1 / 12, 0], atol=1e-7)
    np.testing.assert_allclose(res.rater_confusion[:, 1, 1], [11 / 12, 1 / 2, 1], atol=1e-7)
    np.testing.assert_allclose(res.rater_confusion[:, 0, 0], [11 / 12, 1, 1 / 2], atol=1e-7)
    np.testing.assert_allclose(res.probabilities.sum(0), 1, atol=1e-6)
    assert len(res.history) == 1 and not res.history[0]["converged"]
    # The fixed point: rater 0 is right, raters 1 and 2 err once each.
    res = rs.fuse(raters, method="staple", device="cpu")
    assert res.truth.tolist() == [[1, 1, 0, 0]]
    np.testing.assert_allclose(res.rater_confusion[0], np.eye(2), atol=1e-6)
    np.testing.assert_allclose(res.rater_confusion[:, 1, 1], [1, 1 / 2, 1], atol=1e-6)
    assert res.history[-1]["converged"]


# ---------------------------------------------------------------- SimpleITK binary
@pytest.mark.parametrize("seed", range(10))
def test_binary_matches_simpleitk(seed):
    R = 3 + seed % 7
    raters = _raters(seed, _shape(seed), 2, R)
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    W = sitk.GetArrayFromImage(f.Execute(_sitk_images(raters)))
    res = rs.fuse(raters, method="staple", device="cpu")
    np.testing.assert_allclose(res.probabilities[1], W, atol=1e-4)
    np.testing.assert_allclose(res.rater_confusion[:, 1, 1], f.GetSensitivity(), atol=1e-4)
    np.testing.assert_allclose(res.rater_confusion[:, 0, 0], f.GetSpecificity(), atol=1e-4)
    assert len(res.history) == f.GetElapsedIterations()
    clear = np.abs(W - 0.5) > 1e-4
    np.testing.assert_array_equal(res.truth[clear], (W > 0.5)[clear])


# ---------------------------------------------------------------- SimpleITK multi-label
def _check_multilabel(raters, res, L, atol=1e-3):
    f = sitk.MultiLabelSTAPLEImageFilter()
    lab = sitk.GetArrayFromImage(f.Execute(_sitk_images(raters)))
    L_sitk = int(raters.max()) + 1
    assert L_sitk == L
    R = len(raters)
    cms = np.stack([np.array(f.GetConfusionMatrix(r)).reshape(L + 1, L)[:L] for r in range(R)])
    np.testing.assert_allclose(res.rater_confusion, cms, atol=atol)
    decided = lab != L  # SimpleITK marks exact ties L (undecided); we take the lowest label
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(res.truth[decided], lab[decided])


@pytest.mark.parametrize("seed", range(10))
def test_multilabel_matches_simpleitk(seed):
    L = 3 + seed % 3
    R = 3 + (seed * 2) % 7
    raters = _raters(100 + seed, _shape(seed), L, R)
    res = rs.fuse(raters, method="staple", device="cpu")
    assert res.probabilities.shape == (L,) + raters.shape[1:]
    _check_multilabel(raters, res, L)


@pytest.mark.parametrize("seed", range(3))
def test_binary_majority_init_matches_multilabel_simpleitk(seed):
    raters = _raters(200 + seed, _shape(seed), 2, 5)
    res = rs.fuse(raters, method="staple", init="majority_vote", device="cpu")
    _check_multilabel(raters, res, 2)


# ---------------------------------------------------------------- missing raters
def test_whole_missing_rater_equals_simpleitk_without_it():
    raters = _raters(7, (30, 36), 2, 6)
    with_missing = raters.copy()
    with_missing[2] = -1
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    W = sitk.GetArrayFromImage(f.Execute(_sitk_images(np.delete(raters, 2, 0))))
    res = rs.fuse(with_missing, method="staple", device="cpu")
    np.testing.assert_allclose(res.probabilities[1], W, atol=1e-4)
    np.testing.assert_allclose(np.delete(res.rater_confusion[:, 1, 1], 2), f.GetSensitivity(), atol=1e-4)
    assert np.isnan(res.rater_confusion[2]).all()  # nothing known about it: no matrix

    multi = _raters(8, (30, 36), 3, 5)
    multi_missing = multi.copy()
    multi_missing[4] = -1
    res = rs.fuse(multi_missing, method="staple", device="cpu")
    f = sitk.MultiLabelSTAPLEImageFilter()
    lab = sitk.GetArrayFromImage(f.Execute(_sitk_images(multi[:4])))
    cms = np.stack([np.array(f.GetConfusionMatrix(r)).reshape(4, 3)[:3] for r in range(4)])
    np.testing.assert_allclose(res.rater_confusion[:4], cms, atol=1e-3)
    np.testing.assert_array_equal(res.truth[lab != 3], lab[lab != 3])


@pytest.mark.parametrize("seed", range(4))
def test_partly_missing_raters_match_reference_em(seed):
    rng = np.random.default_rng(seed)
    shape = _shape(seed)
    L = 2 + seed % 2
    raters = _raters(300 + seed, shape, L, 5)
    # rater 1 annotated only the left half; rater 3 skipped scattered voxels
    raters[1][..., : shape[-1] // 2] = -1
    raters[3][rng.random(shape) < 0.3] = -1
    D = raters.reshape(5, -1)
    res = rs.fuse(raters, method="staple", device="cpu")
    if L == 2:
        W, p, q, it = ref_binary(D)
        np.testing.assert_allclose(res.probabilities[1].reshape(-1), W, atol=1e-6)
        np.testing.assert_allclose(res.rater_confusion[:, 1, 1], p, atol=1e-6)
        np.testing.assert_allclose(res.rater_confusion[:, 0, 0], q, atol=1e-6)
        assert len(res.history) == it
    else:
        W, theta = ref_multilabel(D, L)
        np.testing.assert_allclose(res.probabilities.reshape(L, -1).T, W, atol=1e-6)
        np.testing.assert_allclose(res.rater_confusion, theta, atol=1e-6)
    np.testing.assert_allclose(res.rater_confusion.sum(1), 1, atol=1e-6)


def test_voxels_nobody_annotated_get_the_prior():
    raters = _raters(9, (20, 20), 2, 4)
    raters[:, :3] = -1
    res = rs.fuse(raters, method="staple", device="cpu")
    ann = raters[:, 3:]
    prior = ((ann == 1).sum(0) / (ann >= 0).sum(0)).mean()  # mean of W0 where annotated
    np.testing.assert_allclose(res.probabilities[1, :3], prior, atol=1e-6)
    assert np.all(res.disagreement[:3] == 0)
    W, *_ = ref_binary(raters.reshape(4, -1))
    np.testing.assert_allclose(res.probabilities[1].reshape(-1), W, atol=1e-6)


# ---------------------------------------------------------------- pattern path == dense path
@pytest.mark.parametrize("L, init", [(2, "mean_vote"), (3, "majority_vote"), (4, "mean_vote")])
def test_pattern_histogram_equals_dense_em(L, init):
    raters = _raters(400 + L, (12, 16, 18), L, 6)
    raters[2, :4] = -1
    lab = torch.as_tensor(raters.reshape(6, -1))
    a = staple_em(lab, L, init=init, patterns=True)
    b = staple_em(lab, L, init=init, patterns=False)
    np.testing.assert_allclose(a.hist.to_voxels(a.table), b.probabilities, atol=1e-6)
    np.testing.assert_allclose(a.rater_confusion, b.rater_confusion, atol=1e-10)
    assert len(a.history) == len(b.history)
    np.testing.assert_allclose([h["log_likelihood"] for h in a.history],
                               [h["log_likelihood"] for h in b.history], rtol=1e-10)


def test_unique_path_and_int64_overflow_equal_bincount_path():
    # 40 binary raters: 3^40 codes exceed int64, so codes are compressed on the way
    rng = np.random.default_rng(5)
    truth = _truth(rng, (30, 40), 2)
    raters = np.stack([np.where(rng.random(truth.shape) < 0.1, 1 - truth, truth) for _ in range(40)])
    raters[::7, :5] = -1
    lab = torch.as_tensor(raters.reshape(40, -1))
    a = staple_em(lab, 2, patterns=True)
    b = staple_em(lab, 2, patterns=False)
    np.testing.assert_allclose(a.hist.to_voxels(a.table), b.probabilities, atol=1e-6)
    np.testing.assert_allclose(a.rater_confusion, b.rater_confusion, atol=1e-10)
    small = lab[:5]
    h1 = pattern_histogram(small, 2)
    h2 = pattern_histogram(small, 2, max_bins=1)  # force torch.unique
    assert h1.slot is not None and h2.slot is None
    key = lambda h: sorted(zip(map(tuple, h.labels.T.tolist()), h.counts.tolist()))
    assert key(h1) == key(h2)
    # every voxel gets its own pattern's entry, on both paths
    for h in (h1, h2):
        got = h.labels.numpy()[:, h.to_voxels(np.arange(h.num_patterns)).astype(int)]
        np.testing.assert_array_equal(got, small.numpy())


# ---------------------------------------------------------------- above 2^24 voxels
def test_exact_above_2_24_voxels_by_tiling():
    # Tiling a case k times scales every pattern count by k; the EM fixed point must not
    # move. At 2^24+ voxels float32 counts or sums would drift; float64 stays exact.
    small = _raters(16, (64, 64), 2, 3)
    small[1, :4] = -1
    big = np.tile(small, (1, 65, 64))  # 4160 x 4096 = 17.0M voxels per rater
    assert big[0].size > 2**24
    a = rs.fuse(small, method="staple", device="cpu")
    b = rs.fuse(big, method="staple", device="cpu")
    np.testing.assert_allclose(b.rater_confusion, a.rater_confusion, rtol=0, atol=1e-7)
    fa = staple_em(torch.as_tensor(small.reshape(3, -1)), 2)
    fb = staple_em(torch.as_tensor(big.reshape(3, -1)), 2)
    np.testing.assert_allclose(fb.rater_confusion, fa.rater_confusion, rtol=0, atol=1e-12)
    assert len(b.history) == len(a.history)
    np.testing.assert_array_equal(b.probabilities[:, :64, :64], a.probabilities)
    np.testing.assert_array_equal(b.probabilities[:, -64:, -64:], a.probabilities)


@pytest.mark.slow
def test_exact_above_2_24_voxels_against_dense_reference():
    # 17.8M voxels; the all-background pattern alone occurs more than 2^24 times.
    shape = (4, 2**22 + 2**18)
    rng = np.random.default_rng(0)
    truth = np.zeros(shape, np.int16)
    truth[:, : 2**17] = 1
    raters = np.stack([truth.copy() for _ in range(3)])
    for r in range(3):
        idx = rng.integers(0, truth.size, 2**16)
        raters[r].reshape(-1)[idx] ^= 1
    D = raters.reshape(3, -1)
    assert D.shape[1] > 2**24 and (D == 0).all(0).sum() > 2**24
    W, p, q, it = ref_binary(D)
    res = rs.fuse(raters, method="staple", device="cpu")
    np.testing.assert_allclose(res.rater_confusion[:, 1, 1], p, atol=1e-7)
    np.testing.assert_allclose(res.rater_confusion[:, 0, 0], q, atol=1e-7)
    fit = staple_em(torch.as_tensor(D), 2)
    # float64 sums of 1.8e7 terms agree to ~1e-12; float32 ones would be off by ~1e-7
    np.testing.assert_allclose(fit.rater_confusion[:, 1, 1], p, rtol=0, atol=1e-10)
    np.testing.assert_allclose(fit.rater_confusion[:, 0, 0], q, rtol=0, atol=1e-10)
    np.testing.assert_allclose(res.probabilities[1].reshape(-1), W, atol=1e-6)
    assert len(res.history) == it


# ---------------------------------------------------------------- API behaviour
def test_fields_match_finish_result_definitions():
    from raterseg.methods._base import normalized_entropy, observed_disagreement

    raters = _raters(11, (16, 20), 3, 5)
    raters[0, :2] = -1
    res = rs.fuse(raters, method="staple", device="cpu")
    assert res.truth.dtype == np.int16 and res.probabilities.dtype == np.float32
    np.testing.assert_array_equal(res.truth, res.probabilities.argmax(0))
    np.testing.assert_array_equal(res.uncertainty, normalized_entropy(res.probabilities))
    np.testing.assert_array_equal(res.disagreement, observed_disagreement(raters.astype(np.int16), 3))
    assert res.rater_confusion.shape == (5, 3, 3) and res.rater_confusion.dtype == np.float32
    assert res.rater_maps is None and res.method == "staple"


def test_inputs_unchanged_progress_and_history():
    raters = _raters(12, (16, 20), 2, 4)
    raters[1, 3] = -1
    before = raters.copy()
    events = []
    res = rs.fuse(raters, method="staple", device="cpu", progress=events.append)
    np.testing.assert_array_equal(raters, before)
    assert len(events) == len(res.history) > 1
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert "max_update" in events[-1].metrics and res.history[-1]["converged"]
    ll = [h["log_likelihood"] for h in res.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(ll))  # EM never decreases it


def test_given_prior_and_tolerance():
    raters = _raters(13, (20, 24), 2, 5)
    D = raters.reshape(5, -1)
    a = rs.fuse(raters, method="staple", prior=0.3, device="cpu")
    b = rs.fuse(raters, method="staple", prior=(0.7, 0.3), device="cpu")
    c = rs.fuse(raters, method="staple", prior="0.7, 0.3", device="cpu")
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    np.testing.assert_array_equal(a.probabilities, c.probabilities)
    assert c.params["prior"] == "0.7, 0.3" and b.params["prior"] == "0.7,0.3"
    d = rs.fuse(raters, method="staple", device="cpu")
    assert np.abs(a.probabilities - d.probabilities).max() > 1e-3  # the prior matters
    loose = rs.fuse(raters, method="staple", tolerance=1e-2, device="cpu")
    assert len(loose.history) < len(d.history)
    assert loose.history[-1]["max_update"] <= 1e-2
    W, *_ = ref_binary(D)
    np.testing.assert_allclose(d.probabilities[1].reshape(-1), W, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"prior": "0.2,0.3,0.5"}, "expected 2 class probabilities"),
    ({"prior": "0.3,0.3"}, r"sum to 1, got '0.3,0.3' \(sum 0.6\)"),
    ({"prior": "0.5,0.4"}, r"sum to 1, got .*\(sum 0.9\)"),
    ({"prior": "abc"}, "prior"),
    ({"prior": -0.5}, "non-negative"),
    ({"prior": 1.0}, r"in \(0, 1\)"),
    ({"init": "mean"}, "init"),
    ({"max_iterations": 0}, "max_iterations"),
    ({"tolerance": -1.0}, "tolerance"),
    ({"device": "tpu"}, "device"),
])
def test_bad_parameters(kwargs, match):
    raters = _raters(14, (8, 8), 2, 3)
    with pytest.raises(rs.RaterSegError, match=match):
        rs.fuse(raters, method="staple", **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_equals_cpu():
    for L, R in [(2, 5), (4, 7)]:
        raters = _raters(15 + L, (20, 40, 44), L, R)
        raters[1, :3] = -1
        a = rs.fuse(raters, method="staple", device="cpu")
        b = rs.fuse(raters, method="staple", device="cuda")
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        np.testing.assert_allclose(a.rater_confusion, b.rater_confusion, atol=1e-6)
        np.testing.assert_array_equal(a.disagreement, b.disagreement)
        assert len(a.history) == len(b.history)
        lab = torch.as_tensor(raters.reshape(R, -1), device="cuda")
        dense = staple_em(lab, L, patterns=False, init="mean_vote")
        pat = staple_em(lab, L, patterns=True, init="mean_vote")
        np.testing.assert_allclose(pat.hist.to_voxels(pat.table), dense.probabilities, atol=1e-6)

"""spatial_staple: windowed rater performance (Asman & Landman 2012)."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs
import torch
from raterseg import RaterSegError, synth
from raterseg.methods.spatial_staple import box_sum
from raterseg.metrics import dice


def half_good_half_bad(seed: int, size: int = 80):
    """Rater 0 is nearly perfect on the left half and over-segments by 6 voxels on the
    right; raters 1-3 are middling everywhere (synth.split_quality_case)."""
    return synth.split_quality_case(seed, size)


@pytest.fixture(scope="module")
def lr_cases():
    return [half_good_half_bad(seed) for seed in (0, 1)]


def test_box_sum_matches_explicit_windows(rng):
    cases = [((7, 9), 3), ((7, 9), 4), ((5, 6, 7), 5), ((4, 3), 1), ((4, 3), 50), ((3, 8), 6),
             ((6, 2, 5), 9)]
    for shape, w in cases:
        x = rng.random((2,) + shape)
        got = box_sum(torch.as_tensor(x), w, len(shape)).numpy()
        lo, hi = (w - 1) // 2, w // 2
        ref = np.zeros_like(x)
        for idx in np.ndindex(shape):
            box = tuple(slice(max(0, i - lo), i + hi + 1) for i in idx)
            ref[(slice(None),) + idx] = x[(slice(None),) + box].reshape(2, -1).sum(1)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("slicewise", [False, True])
def test_box_sum_on_every_axis_and_clip(rng, monkeypatch, slicewise):
    """The CPU builds outer-axis cumulative sums slice by slice when slices are large (forced
    here for small ones) and with torch.cumsum otherwise, as GPUs do on every axis."""
    from raterseg.methods import spatial_staple

    monkeypatch.setattr(spatial_staple, "_SLICEWISE_MIN", 1 if slicewise else 1 << 30)
    for n in (1, 2, 3, 6, 11):
        x = torch.as_tensor(rng.random((2, n, 3, n)))
        for w in range(1, 2 * n + 3):
            for ax in (1, 2, 3):
                m = x.shape[ax]
                a, b = min((w - 1) // 2, m - 1), min(w // 2, m - 1)
                ref = torch.stack([x.narrow(ax, max(0, i - a), min(m, i + b + 1) - max(0, i - a))
                                   .sum(ax) for i in range(m)], ax)
                got = spatial_staple._cumsum_box(x, ax, a, b)
                torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("device", "slicewise"),
                         [("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=pytest.mark.gpu)])
def test_no_prior_weight_falls_back_to_whole_image_performance(monkeypatch, device, slicewise):
    """prior_weight=0 (κ = 0): where a rater's window holds none of its labels, θ_r,i is its
    whole-image θ_r^0, so its reliability map there is Σ_s W_s θ_r^0(s, s). Empty windows
    must sum to exactly 0 for that (a running sum's rounding leftovers broke it)."""
    from raterseg.methods import spatial_staple

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    monkeypatch.setattr(spatial_staple, "_SLICEWISE_MIN", 1 if slicewise else 1 << 30)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.ogrid[:16, :32, :32]
    truth = (((zz - 8) ** 2 / 36 + (yy - 16) ** 2 / 100 + (xx - 16) ** 2 / 100) < 1).astype(np.int16)
    raters = np.stack([np.where(rng.random(truth.shape) < 0.1 + 0.05 * r, 1 - truth, truth)
                       for r in range(4)]).astype(np.int16)
    raters[0, 8:] = -1  # rater 0 annotated slices 0-7 only
    w = 5
    res = rs.fuse(raters, method="spatial_staple", device=device, window=w, prior_weight=0.0,
                  max_iterations=10, tolerance=0.0)
    W = res.probabilities.astype(np.float64)
    said = np.stack([raters[0] == c for c in range(2)]).astype(np.float64)
    flat = np.einsum("ixyz,sxyz->is", said, W)
    theta0 = flat / flat.sum(0, keepdims=True)  # from the final W (rater_maps use it)
    expect = W[0] * theta0[0, 0] + W[1] * theta0[1, 1]
    far = slice(8 + (w - 1) // 2, None)  # windows that hold none of rater 0's labels
    np.testing.assert_allclose(res.rater_maps[0][far], expect[far], atol=1e-4)


def test_beats_global_staple_when_a_rater_changes_across_the_image(lr_cases):
    for raters, truth in lr_cases:
        spatial = rs.fuse(raters, method="spatial_staple", device="cpu")
        staple = rs.fuse(raters, method="staple", device="cpu")
        mv = rs.fuse(raters, method="majority_vote", device="cpu")
        d_sp, d_st, d_mv = (dice(r.truth, truth) for r in (spatial, staple, mv))
        print(f"Dice spatial_staple {d_sp:.4f}  staple {d_st:.4f}  majority_vote {d_mv:.4f}")
        assert d_sp > d_st + 0.03
        assert d_sp > d_mv - 0.01


def test_rater_maps_show_where_a_rater_is_reliable(lr_cases):
    raters, truth = lr_cases[0]
    res = rs.fuse(raters, method="spatial_staple", device="cpu")
    half = truth.shape[1] // 2
    maps = res.rater_maps
    assert maps.shape == raters.shape and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    # where rater 0 over-segments (near objects on the right) its map drops
    band = (synth.simulate_rater(truth, "over", 6) > 0) & (truth == 0)
    left, right = band[:, :half], band[:, half:]
    assert maps[0][:, :half][left].mean() > maps[0][:, half:][right].mean() + 0.1
    # the flipping rater 3 is about equally reliable on both sides
    assert abs(maps[3][:, :half].mean() - maps[3][:, half:].mean()) < 0.03
    # global confusion matrices: columns sum to 1
    np.testing.assert_allclose(res.rater_confusion.sum(1), 1.0, atol=1e-5)


def test_huge_window_is_global_staple_and_matches_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    raters, _ = half_good_half_bad(0, size=48)
    res = rs.fuse(raters, method="spatial_staple", window=1000, tolerance=1e-9, device="cpu")
    f = sitk.STAPLEImageFilter()
    f.SetForegroundValue(1)
    ref = sitk.GetArrayFromImage(f.Execute([sitk.GetImageFromArray(r.astype(np.uint8))
                                            for r in raters]))
    np.testing.assert_allclose(res.probabilities[1], ref, atol=1e-5)
    staple = rs.fuse(raters, method="staple", init="mean_vote", device="cpu")
    np.testing.assert_allclose(res.probabilities, staple.probabilities, atol=1e-5)
    np.testing.assert_allclose(res.rater_confusion, staple.rater_confusion, atol=1e-5)
    # a window wider than the image is the same as any other such window
    wide = rs.fuse(raters, method="spatial_staple", window=97, tolerance=1e-9, device="cpu")
    np.testing.assert_allclose(wide.probabilities, res.probabilities, atol=1e-6)


def test_3d_and_multiclass():
    _, truth = synth.phantom_3d((12, 24, 24), num_classes=3, seed=0)
    raters = synth.simulate_raters(truth, ("good", "over", "under", "flip"), seed=0,
                                   strength=[0.5, 1, 1, 0.05], num_classes=3)
    res = rs.fuse(raters, method="spatial_staple", window=7, device="cpu")
    assert res.probabilities.shape == (3,) + truth.shape
    np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-5)
    assert res.rater_confusion.shape == (4, 3, 3) and res.rater_maps.shape == raters.shape
    assert set(np.unique(res.truth)) <= {0, 1, 2}
    for c in (1, 2):
        assert dice(res.truth, truth, label=c) > 0.85


def test_missing_raters_are_left_out(lr_cases):
    raters, truth = lr_cases[0]
    base = rs.fuse(raters, method="spatial_staple", device="cpu")
    with_missing = np.concatenate([raters, np.full((1,) + truth.shape, -1)])
    res = rs.fuse(with_missing, method="spatial_staple", device="cpu")
    np.testing.assert_allclose(res.probabilities, base.probabilities, atol=1e-6)
    np.testing.assert_allclose(res.rater_maps[4], 0.5)  # no evidence: chance
    # rater 0 annotated only its good left half: the fusion no longer suffers from its right
    part = raters.copy()
    half = truth.shape[1] // 2
    part[0, :, half:] = -1
    d_part = dice(rs.fuse(part, method="spatial_staple", device="cpu").truth, truth)
    assert d_part >= dice(base.truth, truth) - 0.005


def test_squarem_reaches_em_fixed_point_in_fewer_iterations(lr_cases):
    """SQUAREM (the default) only changes how EM gets to its fixed point: run to a tight
    tolerance, both give the same result; it needs far fewer EM updates."""
    _, t3 = synth.phantom_3d((12, 24, 24), num_classes=3, seed=0)
    r3 = synth.simulate_raters(t3, ("good", "over", "under", "flip"), seed=0,
                               strength=[0.5, 1, 1, 0.05], num_classes=3)
    r3_missing = r3.copy()
    r3_missing[1, 6:] = -1  # slow for plain EM: ~110 updates
    iterations = {"none": 0, "squarem": 0}
    for raters, kw in [(lr_cases[0][0], {}), (r3, {"window": 7}), (r3_missing, {"window": 7})]:
        res = {acc: rs.fuse(raters, method="spatial_staple", acceleration=acc, tolerance=1e-6,
                            max_iterations=1000, device="cpu", **kw)
               for acc in iterations}
        for acc, r in res.items():
            assert len(r.history) < 1000  # converged
            iterations[acc] += len(r.history)
        np.testing.assert_allclose(res["squarem"].probabilities, res["none"].probabilities,
                                   atol=1e-5)
        np.testing.assert_array_equal(res["squarem"].truth, res["none"].truth)
        np.testing.assert_allclose(res["squarem"].rater_maps, res["none"].rater_maps, atol=1e-5)
        np.testing.assert_allclose(res["squarem"].rater_confusion, res["none"].rater_confusion,
                                   atol=1e-5)
    assert iterations["squarem"] < 0.5 * iterations["none"], iterations  # measured 60 vs 178


def test_squarem_at_a_tolerance_near_rounding_still_stops():
    """At tolerance 1e-6 the changes reach float32 rounding noise, which SQUAREM's jumps
    only stir: it ran to max_iterations (2000) where plain EM stops after 168 updates. After
    3 cycles without a new smallest change, plain EM takes over."""
    truth = synth.phantom_3d((16, 32, 32), seed=1)[1]
    raters = synth.simulate_raters(truth, ("good", "over", "under", "flip"), seed=1,
                                   strength=[0.5, 1, 1, 0.1])
    kw = {"tolerance": 1e-6, "max_iterations": 2000, "prior_weight": 0.3, "window": 5,
          "device": "cpu"}
    plain = rs.fuse(raters, method="spatial_staple", acceleration="none", **kw)
    fast = rs.fuse(raters, method="spatial_staple", **kw)
    assert len(fast.history) <= len(plain.history) < 2000  # measured 106 vs 168
    np.testing.assert_allclose(fast.probabilities, plain.probabilities, atol=1e-4)


def test_history_progress_and_bad_parameters(lr_cases):
    raters, _ = lr_cases[0]
    for acc in ("squarem", "none"):  # max_iterations counts EM updates either way
        events = []
        res = rs.fuse(raters, method="spatial_staple", max_iterations=3, progress=events.append,
                      device="cpu", acceleration=acc)
        assert len(res.history) == 3 and [e.step for e in events] == [1, 2, 3]
    assert res.history[-1]["change"] < res.history[0]["change"]
    assert res.params["window"] == 15 and res.method == "spatial_staple"
    with pytest.raises(RaterSegError, match="window"):
        rs.fuse(raters, method="spatial_staple", window=0)
    with pytest.raises(RaterSegError, match="prior_weight"):
        rs.fuse(raters, method="spatial_staple", prior_weight=-1)
    with pytest.raises(RaterSegError, match="windw.*window"):
        rs.fuse(raters, method="spatial_staple", windw=5)
    with pytest.raises(RaterSegError, match="acceleration"):
        rs.fuse(raters, method="spatial_staple", acceleration="aitken")
    original = raters.copy()
    rs.fuse(raters, method="spatial_staple", max_iterations=1, device="cpu")
    np.testing.assert_array_equal(raters, original)


def test_local_prior_is_stable(lr_cases):
    raters, truth = lr_cases[0]
    res = rs.fuse(raters, method="spatial_staple", prior="local", prior_weight=0.1, device="cpu")
    staple = rs.fuse(raters, method="staple", device="cpu")
    assert dice(res.truth, truth) >= dice(staple.truth, truth) - 0.01


@pytest.mark.gpu
def test_cuda_matches_cpu(lr_cases):
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    raters, _ = lr_cases[0]
    # and a 3D case whose slices are large enough for the CPU's slice-by-slice sums, with a
    # rater who annotated only part of the volume
    _, raters3, _ = synth.sample_case(dims=3, num_raters=4, seed=2, shape=(24, 64, 64))
    raters3[1, 12:] = -1
    fixed = {"max_iterations": 15, "tolerance": 0.0}  # no stopping rule near a rounding tie
    for r in (raters, raters3):
        cpu = rs.fuse(r, method="spatial_staple", device="cpu", **fixed)
        gpu = rs.fuse(r, method="spatial_staple", device="cuda", **fixed)
        np.testing.assert_allclose(gpu.probabilities, cpu.probabilities, atol=1e-4)
        np.testing.assert_allclose(gpu.rater_maps, cpu.rater_maps, atol=1e-4)

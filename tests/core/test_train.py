"""The training engine through the public API: data handling, repeatability, events,
cancellation, early stopping, errors, and fusing one volume."""

from __future__ import annotations

import numpy as np
import pytest
import raterseg as rs
import torch
from raterseg import synth, train
from raterseg.methods.cm import ConfusionMatrices

TINY = {"features": (4, 8, 8, 8, 8), "batch_size": 4}


def _data(n=6, size=24, seed=0):
    """Squares of varying size on noise; rater 0 exact, rater 1 shifted, rater 2 missing on half."""
    g = np.random.default_rng(seed)
    truth = np.zeros((n, size, size), np.int16)
    for i in range(n):
        a, b = g.integers(3, size // 2, 2)
        truth[i, a:a + size // 3, b:b + size // 3] = 1
    images = truth + 0.3 * g.standard_normal(truth.shape).astype(np.float32)
    raters = np.stack([truth, np.roll(truth, 2, axis=-1), truth], axis=1)
    raters[: n // 2, 2] = -1
    return images, raters, truth


def test_zscore_per_case_and_channel():
    x = np.stack([np.arange(12.0).reshape(1, 3, 4), 5 + 3 * np.ones((1, 3, 4))])
    z = train.zscore(x)
    assert abs(z[0].mean()) < 1e-6 and abs(z[0].std() - 1) < 1e-6
    assert np.all(z[1] == 0)  # a constant image becomes zeros, not NaN
    assert x[1, 0, 0, 0] == 8  # input untouched


def test_volume_is_cut_into_slices_along_the_first_axis_and_empty_slices_dropped():
    img = np.arange(2 * 1 * 3 * 4 * 5, dtype=np.float32).reshape(2, 1, 3, 4, 5)
    lab = np.zeros((2, 2, 3, 4, 5), np.int16)
    lab[1, :, 2] = -1  # nobody annotated slice 2 of case 1
    s = train.make_samples(img, lab, spatial_dims=2)
    assert s.images.shape == (5, 1, 4, 5) and s.raters.shape == (5, 2, 4, 5)
    assert torch.equal(s.images[4], torch.from_numpy(img[1, :, 1]))
    s3 = train.make_samples(img, lab, spatial_dims=3)
    assert s3.images.shape == (2, 1, 3, 4, 5)


def test_flips_move_image_and_labels_together():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 6, 7)
    y = (x > 0).long().repeat(1, 3, 1, 1)
    fx, fy = train._flip(x, y, g)
    assert torch.equal(fy, (fx > 0).long().repeat(1, 3, 1, 1))
    changed = (fx != x).flatten(1).any(1).float().mean()
    assert 0.5 < changed < 0.95  # about 3/4 of the samples flip along at least one axis


def test_training_is_repeatable_on_cpu_and_depends_on_the_seed():
    images, raters, _ = _data()
    kw = dict(epochs=2, device="cpu", **TINY)
    p = [rs.create("cm", seed=s, **kw).fit(images, raters).predict(images).probabilities
         for s in (3, 3, 4)]
    assert np.array_equal(p[0], p[1])
    assert not np.allclose(p[0], p[2])


def test_iter_fit_yields_one_event_per_epoch_with_the_losses():
    images, raters, _ = _data()
    m = rs.create("cm", epochs=3, val_fraction=0.34, patience=0, **TINY)
    events = list(m.iter_fit(images, raters))
    assert [(e.step, e.total) for e in events] == [(1, 3), (2, 3), (3, 3)]
    assert {"loss", "val_loss", "nll", "trace"} <= set(events[0].metrics)
    assert [h["epoch"] for h in m.history_] == [1, 2, 3]
    seen = []
    rs.create("unet", epochs=2, **TINY).fit(images, raters, progress=seen.append)
    assert len(seen) == 2 and "loss" in seen[-1].metrics


def test_closing_the_generator_cancels_and_leaves_the_method_untouched():
    images, raters, _ = _data()
    m = rs.create("cm", epochs=50, **TINY)
    it = m.iter_fit(images, raters)
    next(it)
    it.close()
    with pytest.raises(rs.RaterSegError, match="not trained"):
        m.predict(images)
    # a fitted method keeps its network when a second training is cancelled
    m = rs.create("unet", epochs=1, **TINY).fit(images, raters)
    before = m.predict(images).probabilities
    it = m.iter_fit(images, raters)
    next(it)
    it.close()
    assert np.array_equal(m.predict(images).probabilities, before)


def test_early_stopping_when_the_validation_loss_stops_improving():
    images, raters, _ = _data()
    events = []
    m = rs.create("unet", epochs=20, lr=0.0, patience=2, val_fraction=0.34, **TINY)
    m.fit(images, raters, progress=events.append)
    assert len(m.history_) == 3  # best at epoch 1, then two epochs without improvement
    assert "early stop" in events[-1].message


def test_diverging_loss_is_reported_with_a_hint():
    class Broken(ConfusionMatrices):
        def loss(self, outputs, raters, annotated, state):
            return outputs["seg"].sum() * float("nan")

    images, raters, _ = _data()
    with pytest.raises(rs.RaterSegError, match="lr"):
        Broken(epochs=1, **TINY).fit(images, raters)


@pytest.mark.parametrize("val_fraction", [0.34, 0.0])
def test_a_diverged_network_is_never_kept(val_fraction, tmp_path):
    # every batch loss was finite, but the last optimiser step left weights whose outputs
    # overflow: the model was kept (and saved by 'raterseg train') and predicted NaN
    images, raters, _ = _data(n=8)
    m = rs.create("unet", epochs=1, lr=1e30, val_fraction=val_fraction,
                  **{**TINY, "batch_size": 8})
    with pytest.raises(rs.RaterSegError, match=r"lr: training diverged .* try a smaller lr"):
        m.fit(images, raters)
    with pytest.raises(rs.RaterSegError, match="not trained yet"):
        m.predict(images)


def test_divergence_after_a_good_epoch_stops_and_keeps_that_epoch():
    # the last optimiser step of epoch 2 turns a weight into NaN: training stops there and
    # the model keeps epoch 1 (a run is not thrown away for its last step), and says so
    base = type(rs.create("unet"))

    class LateNaN(base):
        def configure_optimizer(self, parameters, lr):
            params = list(parameters)
            opt = torch.optim.Adam(params, lr=lr)
            plain_step, steps = opt.step, [0]

            def step(*args, **kwargs):
                plain_step(*args, **kwargs)
                steps[0] += 1
                if steps[0] == 2 * 2:  # 2 batches per epoch
                    with torch.no_grad():
                        params[0].fill_(float("nan"))

            opt.step = step
            return opt

    images, raters, _ = _data(n=8)
    events = []
    m = LateNaN(epochs=4, val_fraction=0.25, **{**TINY, "batch_size": 3})
    m.fit(images, raters, progress=events.append)
    assert [h["epoch"] for h in m.history_] == [1]
    assert "training diverged (non-finite weights after epoch 2)" in events[-1].message
    assert "keeping epoch 1" in events[-1].message
    assert np.isfinite(m.predict(images).probabilities).all()


def test_predict_on_one_image_says_how_to_make_a_batch():
    images, raters, _ = _data(n=8)
    m = rs.create("unet", epochs=1, **TINY).fit(images, raters)
    with pytest.raises(rs.RaterSegError, match=r"got an array of shape \(24, 24\); for one "
                                               r"image pass image\[None\]"):
        m.predict(images[0])
    assert m.predict(images[0][None]).truth.shape == (1, 24, 24)


def test_predict_refuses_non_finite_outputs_of_a_saved_model():
    # a model saved before divergence was caught: predict says so instead of returning NaN
    images, raters, _ = _data(n=8)
    m = rs.create("unet", epochs=1, **TINY).fit(images, raters)
    with torch.no_grad():
        next(iter(m.network_.parameters())).fill_(float("nan"))
    with pytest.raises(rs.RaterSegError, match=r"model: .*NaN or infinite.*smaller lr"):
        m.predict(images)


def test_bad_inputs_raise_raterseg_errors():
    images, raters, _ = _data()
    m = rs.create("cm", epochs=1, **TINY)
    with pytest.raises(rs.RaterSegError, match="images"):
        m.fit(images[:4], raters)
    bad = images.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(rs.RaterSegError, match="NaN"):
        m.fit(bad, raters)
    with pytest.raises(rs.RaterSegError, match="image"):
        rs.fuse(raters[0], method="cm")
    with pytest.raises(rs.RaterSegError, match="spatial_dims"):
        rs.fuse(raters[0], image=images[0], method="cm", spatial_dims=3)
    with pytest.raises(rs.RaterSegError, match="features"):
        rs.create("cm", features=(8, 16))
    with pytest.raises(rs.RaterSegError, match="not trained"):
        m.predict(images)
    m.fit(images, raters)
    with pytest.raises(rs.RaterSegError, match="channel"):
        m.predict(np.stack([images, images], axis=1))
    with pytest.raises(rs.RaterSegError, match="num_raters|raters"):
        rs.create("cm", num_raters=2, **TINY).fit(images, raters)


def test_predict_returns_a_batched_result():
    images, raters, _ = _data()
    m = rs.create("cm", epochs=1, **TINY).fit(images, raters)
    res = m.predict(images[:2])
    L, R = 2, 3
    assert res.truth.shape == (2, 24, 24) and res.probabilities.shape == (2, L, 24, 24)
    assert res.rater_maps.shape == (2, R, 24, 24)
    assert res.rater_estimates.shape == (2, R, L, 24, 24)
    assert res.rater_confusion.shape == (R, L, L)
    assert np.allclose(res.rater_confusion.sum(1), 1, atol=1e-5)
    assert np.all(res.disagreement == 0)
    assert np.allclose(res.probabilities.sum(1), 1, atol=1e-5)
    assert res.uncertainty.min() >= 0 and res.uncertainty.max() <= 1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fuse_a_volume_returns_whole_volume_fields(spatial_dims):
    image, truth = synth.phantom_3d((12, 40, 40), seed=1)
    raters = synth.simulate_raters(truth, ("good", "over", "under"), seed=1)
    raters[2, :6] = -1  # rater 2 skipped the first slices
    events = []
    res = rs.fuse(raters, image=image, method="cm", epochs=2, spatial_dims=spatial_dims,
                  progress=events.append, **TINY)
    assert res.probabilities.shape == (2, 12, 40, 40)
    assert res.rater_maps.shape == (3, 12, 40, 40)
    assert res.rater_estimates.shape == (3, 2, 12, 40, 40)
    assert res.rater_confusion.shape == (3, 2, 2)
    assert res.disagreement.shape == (12, 40, 40) and res.disagreement.max() > 0
    assert [h["epoch"] for h in res.history] == [1, 2] and len(events) == 2
    assert res.method == "cm" and res.params["spatial_dims"] == spatial_dims


@pytest.mark.parametrize("method", ["cm", "avap", "mrprism", "tgce"])
def test_labels_with_gaps_train_only_the_classes_that_occur(method, tmp_path):
    # Labels {0, 2, 5} (e.g. a crop of a multi-organ map): six classes, three of them never
    # drawn. The network is trained on the three that occur, exactly as on labels 0/1/2, and
    # the result is on the original labels: no voxel gets 1, 3 or 4 (a user saw 61% of
    # voxels labelled 1/3/4 by CM before), their probabilities are 0 and their confusion
    # columns NaN.
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    disk = (yy - 12) ** 2 + (xx - 12) ** 2
    truth = np.where(disk < 25, 5, np.where(disk < 81, 2, 0))
    image = (truth + rng.normal(0, 0.5, truth.shape)).astype(np.float32)
    raters = np.stack([truth, truth, np.where(truth == 5, 2, truth)]).astype(np.int16)
    lut = np.array([0, 0, 1, 0, 0, 2])
    kw = dict(method=method, epochs=2, seed=0, device="cpu", **TINY)
    gap = rs.fuse(raters, image=image, **kw)
    dense = rs.fuse(lut[raters], image=image, **kw)
    assert gap.probabilities.shape == (6, 24, 24)
    np.testing.assert_array_equal(gap.truth, np.array([0, 2, 5])[dense.truth])
    np.testing.assert_allclose(gap.probabilities[[0, 2, 5]], dense.probabilities, atol=1e-6)
    assert not gap.probabilities[[1, 3, 4]].any()
    assert np.isnan(gap.rater_confusion[:, :, [1, 3, 4]]).all()
    np.testing.assert_allclose(gap.rater_confusion[np.ix_(range(3), [0, 2, 5], [0, 2, 5])],
                               dense.rater_confusion, atol=1e-6)
    if gap.rater_estimates is not None:
        assert gap.rater_estimates.shape == (3, 6, 24, 24)
        assert not gap.rater_estimates[:, [1, 3, 4]].any()
    # a model trained on such labels saves, loads and predicts on the original labels
    m = rs.create(**kw).fit(image[None], raters[None])
    m.save(tmp_path / "gap.safetensors")
    again = rs.load(tmp_path / "gap.safetensors").predict(image[None])
    assert again.probabilities.shape == (1, 6, 24, 24)
    np.testing.assert_array_equal(again.truth, m.predict(image[None]).truth)
    assert set(np.unique(again.truth)) <= {0, 2, 5}

"""TGCE (Lotero Londoño 2025, ch. 2): the loss on hand-worked cases (Λ = 1 is GCE, Λ = 0
the uniform constant, q → 0 cross entropy), missing raters, the outputs derived from Λ
and f, the network layouts, and — trained — that Λ tells a blank rater from a good one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import raterseg as rs
import torch
from raterseg import metrics, synth
from raterseg.nn.tgce_loss import gce_per_pixel, tgce_loss, uniform_gce
from raterseg.train import TrainState

# One image of two pixels (H=1, W=2), two classes, two raters.
F = np.array([[0.2, 0.6], [0.8, 0.4]])  # f[k, pixel]: pixel a = (0.2, 0.8), b = (0.6, 0.4)
# Rater 0 says 1 at a and 0 at b; rater 1 says 0 at a and did not annotate b.
LABELS = np.array([[[1, 0]], [[0, -1]]])


def _seg(f=F):
    return torch.tensor(np.log(f), dtype=torch.float64).reshape(1, f.shape[0], 1, -1)


def _lam(values):
    """Λ ``(1, R, 1, 2)`` from per-rater, per-pixel values."""
    return torch.tensor(np.asarray(values, dtype=np.float64)).reshape(1, -1, 1, 2)


def _y(labels=LABELS):
    y = torch.tensor(labels)[None]
    return y.clamp_min(0), y >= 0


def _state(epoch=5, training=True):
    return TrainState(epoch=epoch, epochs=10, step=0, training=training,
                      generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the loss by hand
def test_reliability_one_is_gce():
    # q = 1/2: (1 − f_y^q)/q = 2(1 − √f_y) for rater 0 at a (f_y = 0.8), rater 0 at b (0.6),
    # rater 1 at a (0.2): 0.2111456, 0.4508067, 1.1055728; mean over the 3 annotated pairs.
    expected = (0.21114562 + 0.45080666 + 1.10557281) / 3  # 0.5891750
    loss, parts = tgce_loss(_seg(), _lam([[1, 1], [1, 1]]), *_y(), q=0.5)
    assert float(loss) == pytest.approx(expected, abs=1e-7)
    assert float(parts["gce"]) == pytest.approx(expected, abs=1e-7)
    gce = gce_per_pixel(_seg(), _y()[0], 0.5)
    assert float(gce[0, 1, 0, 0]) == pytest.approx(2 * (1 - math.sqrt(0.2)), abs=1e-12)


def test_reliability_zero_is_the_uniform_constant():
    # (1 − (1/L)^q)/q = 2(1 − √½) = 0.5857864 for L = 2, q = ½, whatever f and the labels
    loss, _ = tgce_loss(_seg(), _lam([[0, 0], [0, 0]]), *_y(), q=0.5)
    assert float(loss) == pytest.approx(0.58578644, abs=1e-7)
    assert uniform_gce(2, 0.5) == pytest.approx(0.58578644, abs=1e-7)
    # ... which is the GCE of a uniform prediction
    flat = np.full((3, 2), 1 / 3)
    y3 = torch.tensor([[[2, 1]], [[0, 0]]])[None]
    loss3, _ = tgce_loss(_seg(flat), _lam([[1, 1], [1, 1]]), y3, y3 >= 0, q=0.7)
    assert float(loss3) == pytest.approx(uniform_gce(3, 0.7), abs=1e-12)


def test_mixed_reliability_by_hand():
    # Λ_0 = 0.9, Λ_1 = 0.25:  0.9·0.2111456 + 0.1·0.5857864 = 0.2486097 (rater 0, a)
    #                          0.9·0.4508067 + 0.1·0.5857864 = 0.4643046 (rater 0, b)
    #                          0.25·1.1055728 + 0.75·0.5857864 = 0.7157330 (rater 1, a)
    loss, parts = tgce_loss(_seg(), _lam([[0.9, 0.9], [0.25, 0.7]]), *_y(), q=0.5)
    assert float(loss) == pytest.approx((0.2486097 + 0.4643046 + 0.7157330) / 3, abs=1e-6)
    assert float(parts["reliability"]) == pytest.approx((0.9 + 0.9 + 0.25) / 3)


def test_small_q_approaches_cross_entropy_and_q_one_is_mae():
    ce = (-math.log(0.8) - math.log(0.6) - math.log(0.2)) / 3  # 0.7811357
    for q, tol in ((1e-2, 2e-2), (1e-4, 2e-4), (1e-6, 2e-6)):
        loss, _ = tgce_loss(_seg(), _lam([[1, 1], [1, 1]]), *_y(), q=q)
        assert float(loss) == pytest.approx(ce, rel=tol)
        assert uniform_gce(2, q) == pytest.approx(math.log(2), rel=tol)
    loss, _ = tgce_loss(_seg(), _lam([[1, 1], [1, 1]]), *_y(), q=1.0)
    assert float(loss) == pytest.approx((0.2 + 0.4 + 0.8) / 3, abs=1e-12)


def test_missing_raters_add_neither_a_term_nor_a_gradient():
    # Rater 1 missing everywhere vs rater 1 absent from the stack: the same loss and f-gradient;
    # rater 1's Λ gets exactly zero gradient.
    lab = np.array([[[1, 0]], [[-1, -1]]])
    seg = _seg().requires_grad_(True)
    lam = _lam([[0.6, 0.3], [0.1, 0.9]]).requires_grad_(True)
    loss, _ = tgce_loss(seg, lam, *_y(lab), q=0.7)
    loss.backward()
    seg1 = _seg().requires_grad_(True)
    lam1 = _lam([[0.6, 0.3]]).requires_grad_(True)
    loss1, _ = tgce_loss(seg1, lam1, *_y(lab[:1]), q=0.7)
    loss1.backward()
    assert float(loss.detach()) == pytest.approx(float(loss1.detach()), abs=1e-15)
    assert torch.equal(lam.grad[:, 1], torch.zeros_like(lam.grad[:, 1]))
    assert torch.allclose(seg.grad, seg1.grad, atol=1e-15)
    assert torch.allclose(lam.grad[:, :1], lam1.grad, atol=1e-15)


def test_images_are_averaged_after_their_pixels_and_raters():
    # eq. 2-7: the mean over images of each image's mean over annotated (rater, pixel) pairs;
    # an image nobody annotated is left out.
    seg = torch.cat([_seg(), _seg(), _seg()])
    lab = torch.tensor(np.stack([LABELS, np.array([[[1, 1]], [[-1, -1]]]), np.full((2, 1, 2), -1)]))
    lam = torch.full((3, 2, 1, 2), 0.5, dtype=torch.float64)
    loss, _ = tgce_loss(seg, lam, lab.clamp_min(0), lab >= 0, q=0.5)
    c = 0.58578644
    img0 = 0.5 * (0.21114562 + 0.45080666 + 1.10557281) / 3 + 0.5 * c
    img1 = 0.5 * (0.21114562 + 2 * (1 - math.sqrt(0.4))) / 2 + 0.5 * c
    assert float(loss) == pytest.approx((img0 + img1) / 2, abs=1e-7)


def test_reliability_gradient_sign_follows_gce_minus_constant():
    # ∂ℓ/∂Λ = GCE − const: negative (Λ rises) where f_y > 1/L, positive where f_y < 1/L
    lam = _lam([[0.5, 0.5], [0.5, 0.5]]).requires_grad_(True)
    loss, _ = tgce_loss(_seg(), lam, *_y(), q=0.5)
    loss.backward()
    g = lam.grad[0, :, 0]
    assert g[0, 0] < 0 and g[0, 1] < 0  # rater 0 agrees with f at a (0.8) and b (0.6)
    assert g[1, 0] > 0  # rater 1 says 0 at a where f_0 = 0.2 < ½
    assert g[1, 0] == pytest.approx((1.10557281 - 0.58578644) / 3, abs=1e-7)


def test_reliability_none_is_plain_gce_by_hand():
    # reliability="none": Λ ≡ 1 whatever the reliability output holds, so the loss is the GCE
    # of eq. 2-1 on every annotated pair: the 0.5891750 of test_reliability_one_is_gce.
    m = rs.create("tgce", q=0.5, reliability="none")
    rel = torch.tensor([[-3.0, 2.0], [0.0, -1.0]], dtype=torch.float64).reshape(1, 2, 1, 2)
    loss, parts = m.loss({"seg": _seg(), "rel": rel}, *_y(), _state())
    assert float(loss) == pytest.approx((0.21114562 + 0.45080666 + 1.10557281) / 3, abs=1e-7)
    assert parts["reliability"] == 1.0
    # the same outputs under pixel reliability (Λ = sigmoid(rel)) give another loss
    pixel, _ = rs.create("tgce", q=0.5).loss({"seg": _seg(), "rel": rel}, *_y(), _state())
    assert abs(float(pixel) - float(loss)) > 0.02


def test_reliability_none_fits_predicts_and_round_trips(tmp_path):
    cases = [synth.phantom_2d((32, 32), seed=s) for s in range(6)]
    images = np.stack([c[0] for c in cases])
    raters = np.stack([synth.simulate_raters(c[1], ("good", "blank"), seed=i)
                       for i, c in enumerate(cases)])
    m = rs.create("tgce", reliability="none", device="cpu", seed=0, epochs=2, batch_size=4,
                  features=(4, 4, 4, 4, 4), val_fraction=0.0)
    net = m.build_network(1, 2, 2, 2)
    # no reliability parameter: only the segmentation head besides the trunk
    assert set(net.unet.heads) == {"seg"} and not len(net.unet.pooled_heads)
    assert net.global_rel is None
    m.fit(images[:4], raters[:4])
    res = m.predict(images[4:])
    assert res.rater_maps.shape == (2, 2, 32, 32) and np.all(res.rater_maps == 1)
    assert np.allclose(res.rater_estimates, res.probabilities[:, None], atol=1e-6)
    assert np.allclose(res.rater_confusion, np.eye(2)[None].repeat(2, 0), atol=1e-6)
    path = tmp_path / "tgce_none.safetensors"
    m.save(path)
    loaded = rs.load(path)
    assert loaded.config.reliability == "none"
    again = loaded.predict(images[4:])
    assert np.array_equal(again.probabilities, res.probabilities)
    assert np.array_equal(again.rater_maps, res.rater_maps)


# ---------------------------------------------------------------- outputs from Λ and f
def test_interpret_by_hand():
    m = rs.create("tgce")
    lam = _lam([[0.9, 0.5], [0.0, 1.0]])
    res = m.interpret({"seg": _seg().float(), "rel": torch.logit(lam).float()})
    assert torch.allclose(res["probabilities"][0, :, 0].double(), torch.tensor(F), atol=1e-6)
    assert torch.allclose(res["rater_maps"].double(), lam, atol=1e-6)
    # rater 0 at a: Λ f + (1 − Λ)(1 − f) = (0.9·0.2 + 0.1·0.8, 0.9·0.8 + 0.1·0.2) = (0.26, 0.74)
    assert np.allclose(res["rater_estimates"][0, 0, :, 0, 0].numpy(), [0.26, 0.74], atol=1e-6)
    # rater 1 (Λ = 0 at a) is modelled as saying the other class: (0.8, 0.2)
    assert np.allclose(res["rater_estimates"][0, 1, :, 0, 0].numpy(), [0.8, 0.2], atol=1e-6)
    # rater 0, column j: Λ averaged with weights f_j: j=0 (0.2·0.9 + 0.6·0.5)/0.8 = 0.6,
    # j=1 (0.8·0.9 + 0.4·0.5)/1.2 = 0.76667
    cm = res["rater_confusion"][0, 0].numpy()
    assert np.allclose(cm, [[0.6, 1 - 0.766667], [0.4, 0.766667]], atol=1e-5)
    assert np.allclose(res["confusion_weight"][0, 0, 0].numpy(), [0.8, 1.2], atol=1e-6)


def test_interpret_multiclass_distributions():
    m = rs.create("tgce", num_classes=3)
    g = torch.Generator().manual_seed(0)
    out = {"seg": torch.randn(2, 3, 5, 6, generator=g), "rel": torch.randn(2, 4, 5, 6, generator=g)}
    res = m.interpret(out)
    assert res["rater_estimates"].shape == (2, 4, 3, 5, 6)
    assert torch.allclose(res["rater_estimates"].sum(2), torch.ones(2, 4, 5, 6), atol=1e-6)
    cm = res["rater_confusion"]
    assert cm.shape == (2, 4, 3, 3)
    assert torch.allclose(cm.sum(2), torch.ones(2, 4, 3), atol=1e-6)  # columns sum to 1
    # off-diagonal mass split evenly over the other classes
    off = cm[:, :, 0, 1], cm[:, :, 2, 1]
    assert torch.allclose(*off)


@pytest.mark.parametrize("level", ["pixel", "image", "global", "none"])
@pytest.mark.parametrize("dims", [2, 3])
def test_network_layouts_and_finite_gradients(level, dims):
    m = rs.create("tgce", num_classes=3, features=(4, 4, 4, 4, 4), reliability=level,
                  spatial_dims=dims)
    net = m.build_network(1, 3, 2, dims)
    s = (6,) * dims
    x = torch.randn(2, 1, *s) * 50
    with torch.no_grad():  # saturate: huge logits everywhere
        for prm in net.parameters():
            prm.mul_(40)
    out = net(x)
    assert out["seg"].shape == (2, 3, *s) and out["rel"].shape == (2, 2, *s)
    if level != "pixel":  # one Λ per rater and image (a placeholder with "none")
        flat = out["rel"].reshape(2, 2, -1)
        assert torch.equal(flat, flat[..., :1].expand_as(flat))
    if level == "global":
        assert torch.equal(out["rel"][0], out["rel"][1])
    y = torch.randint(0, 3, (2, 2, *s))
    y[:, 1, :3] = -1
    loss, _ = m.loss(out, y.clamp_min(0), y >= 0, _state())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)


@pytest.mark.parametrize("level", ["pixel", "image", "global"])
def test_training_starts_from_the_initial_reliability(level):
    m = rs.create("tgce", features=(4, 4, 4, 4, 4), reliability=level, initial_reliability=0.9)
    net = m.build_network(1, 2, 3, 2)
    with torch.no_grad():
        lam = torch.sigmoid(net(torch.randn(2, 1, 8, 8))["rel"])
    assert lam.shape == (2, 3, 8, 8)
    assert float(lam.mean()) == pytest.approx(0.9, abs=0.06)


def test_bad_parameters_are_refused():
    with pytest.raises(rs.RaterSegError, match="q"):
        rs.create("tgce", q=0.0)
    with pytest.raises(rs.RaterSegError, match="q"):
        rs.create("tgce", q=1.5)
    with pytest.raises(rs.RaterSegError, match="reliability"):
        rs.create("tgce", reliability="voxel")
    with pytest.raises(rs.RaterSegError, match="initial_reliability"):
        rs.create("tgce", initial_reliability=1.0)


# ---------------------------------------------------------------- trained
def _fg_means(maps: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean Λ_r over the true foreground: maps (N, R, *S), truth (N, *S) → (R,)."""
    fg = truth > 0
    return np.array([maps[:, r][fg].mean() for r in range(maps.shape[1])])


def test_mnist_reliability_tells_the_blank_rater_from_the_good_one(shared_dir):
    # The CM paper's five raters on a few digits; held-out digits are scored. A fast version
    # of benchmarks/tgce_mnist.py (numbers in docs/BENCHMARKS.md).
    kinds = ("good", "over", "under", "wrong", "blank")
    images, truth = synth.load_mnist(shared_dir / "data" / "mnist", n=96)
    raters = np.stack([synth.simulate_raters(t, kinds, seed=i) for i, t in enumerate(truth)])
    m = rs.create("tgce", num_classes=2, device="cpu", seed=0, epochs=12, batch_size=8, lr=1e-2,
                  features=(4, 8, 16, 32, 64), val_fraction=0.0, patience=0)
    m.fit(images[:64], raters[:64])
    res = m.predict(images[64:])
    lam = dict(zip(kinds, _fg_means(res.rater_maps, truth[64:])))
    assert lam["blank"] < 0.3, lam
    assert lam["good"] > 0.7, lam
    assert lam["under"] < 0.5, lam
    dice = np.mean([metrics.dice(p, t) for p, t in zip(res.truth, truth[64:])])
    # 0.85 here (0.85-0.93 over seeds 0-2); copying the over or the wrong rater, or
    # per-digit STAPLE, scores 0.56-0.60
    assert dice > 0.8, dice
    # the estimated confusion of the blank rater: it says background on the foreground
    assert res.rater_confusion[4, 0, 1] > 0.7
    assert res.rater_confusion[0, 1, 1] > 0.7


def test_one_label_per_image_three_classes():
    # 3-class phantoms; two good raters and a blank one, only one of them per image.
    cases = [synth.phantom_2d((32, 32), num_classes=3, seed=s) for s in range(20)]
    images = np.stack([c[0] for c in cases])
    truth = np.stack([c[1] for c in cases])
    raters = np.stack([synth.simulate_raters(t, ("good", "good", "blank"), seed=i)
                       for i, t in enumerate(truth)])
    raters = synth.drop_raters(raters, mode="one_per_case", seed=0, batched=True)
    assert ((raters >= 0).reshape(20, 3, -1).any(-1).sum(1) == 1).all()
    m = rs.create("tgce", num_classes=3, device="cpu", seed=0, epochs=25, batch_size=4, lr=1e-2,
                  features=(4, 8, 16, 32, 64), val_fraction=0.0, patience=0)
    m.fit(images[:16], raters[:16])
    res = m.predict(images[16:])
    assert res.rater_maps.shape == (4, 3, 32, 32)
    assert res.rater_estimates.shape == (4, 3, 3, 32, 32)
    assert res.rater_confusion.shape == (3, 3, 3)
    assert np.allclose(res.rater_confusion.sum(1), 1, atol=1e-5)
    lam = _fg_means(res.rater_maps, truth[16:])
    assert lam[2] < min(lam[0], lam[1]) - 0.3, lam
    # the core (class 2) and the whole object; the thin rim (class 1, 4% of the pixels at
    # 32×32) needs a longer training than a unit test affords, for a plain U-Net as well
    core = np.mean([metrics.dice(p, t, label=2) for p, t in zip(res.truth, truth[16:])])
    whole = np.mean([metrics.dice(p > 0, t > 0) for p, t in zip(res.truth, truth[16:])])
    assert core > 0.7 and whole > 0.7, (core, whole)


def test_3d_volume_with_3d_network_and_with_slices():
    image, truth = synth.phantom_3d((16, 32, 32), seed=0)
    raters = synth.simulate_raters(truth, ("good", "over", "blank"), strength=[1.0, 2.0, None], seed=1)
    before = raters.copy()
    res = rs.fuse(raters, image=image, method="tgce", device="cpu", seed=0, spatial_dims=3,
                  epochs=30, lr=1e-2, features=(4, 8, 16, 32, 64), val_fraction=0.0, patience=0)
    assert np.array_equal(raters, before)
    assert res.truth.shape == (16, 32, 32) and res.rater_maps.shape == (3, 16, 32, 32)
    assert res.rater_confusion.shape == (3, 2, 2)
    assert metrics.dice(res.truth, truth) > 0.7
    lam = _fg_means(res.rater_maps[None], truth[None])
    assert lam[2] < lam[0] - 0.3, lam
    sl = rs.fuse(raters, image=image, method="tgce", device="cpu", seed=0, spatial_dims=2,
                 epochs=2, features=(4, 8, 16, 32, 64))
    assert sl.rater_maps.shape == (3, 16, 32, 32)
    assert sl.rater_estimates.shape == (3, 2, 16, 32, 32)

"""Baselines: ``unet`` on fused targets (mv / mean / staple / sample) and ``softseg``
(normalised ReLU, Adaptive Wing loss)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import raterseg as rs
import torch
from raterseg.methods.baselines import vote_fractions
from raterseg.nn.losses import adaptive_wing_loss, normalized_relu
from raterseg.train import TrainState

torch.set_num_threads(2)

TINY = {"features": (4, 8, 8, 8, 8), "batch_size": 4}


def _state(seed=0):
    return TrainState(0, 1, 0, True, torch.Generator().manual_seed(seed))


# one image, 1×3 pixels, 3 raters; rater 2 did not annotate pixel 2
RATERS = torch.tensor([[[[1, 0, 1]], [[1, 1, 0]], [[0, 0, -1]]]])


def test_vote_fractions_leave_out_missing_raters():
    frac, any_ann = vote_fractions(RATERS.clamp_min(0), RATERS >= 0, 2)
    assert torch.allclose(frac[0, 1, 0], torch.tensor([2 / 3, 1 / 3, 1 / 2]))
    assert torch.allclose(frac.sum(1), torch.ones(1, 1, 3))
    assert torch.equal(any_ann, torch.ones(1, 1, 3))


# votes per pixel: (class 0, class 1) = (1, 2), (2, 1), (1, 1) — a tie goes to the lowest label
@pytest.mark.parametrize("target,soft", [("mv", [[0, 1, 1], [1, 0, 0]]),
                                         ("mean", [[1 / 3, 2 / 3, 1 / 2], [2 / 3, 1 / 3, 1 / 2]])])
def test_unet_loss_is_cross_entropy_against_the_fused_target(target, soft):
    logits = torch.tensor([[[[0.2, -1.0, 0.5]], [[1.0, 0.3, -0.2]]]])
    m = rs.create("unet", target=target)
    loss = m.loss({"seg": logits}, RATERS.clamp_min(0), RATERS >= 0, _state())
    logp = torch.log_softmax(logits, 1)[0, :, 0]  # (L, 3)
    t = torch.tensor(soft, dtype=torch.float32)
    assert float(loss) == pytest.approx(float(-(t * logp).sum(0).mean()), rel=1e-6)


def test_unet_sample_target_draws_only_raters_who_annotated():
    logits = torch.zeros(8, 2, 1, 3)
    logits[:, 1] = 2.0  # predicts class 1 everywhere
    raters = torch.full((8, 3, 1, 3), -1)
    raters[:, 1] = 0  # only rater 1 annotated: all background
    m = rs.create("unet", target="sample")
    loss = m.loss({"seg": logits}, raters.clamp_min(0), raters >= 0, _state())
    assert float(loss) == pytest.approx(-math.log(1 / (1 + math.e ** 2)), rel=1e-6)
    # with several annotating raters the draw varies and follows the seed
    full = torch.stack([torch.zeros(1, 3), torch.ones(1, 3)]).long()[None].repeat(64, 1, 1, 1)
    draws = [float(m.loss({"seg": logits.repeat(8, 1, 1, 1)}, full, full >= 0, _state(s)))
             for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]


def test_unet_staple_target_is_the_staple_consensus():
    from raterseg.types import as_rater_stack

    raters = np.zeros((2, 3, 10, 10), np.int16)
    raters[:, :, 2:7, 2:7] = 1
    raters[:, 2] = 0  # one rater says nothing
    stack = as_rater_stack(raters, batched=True)
    target = rs.create("unet", target="staple").prepare_raters(stack)
    expected = rs.fuse(raters[0], method="staple").truth
    assert target.shape == (2, 1, 10, 10) and np.array_equal(target[0, 0], expected)


def test_normalized_relu_sums_to_one_and_is_uniform_where_all_negative():
    x = torch.tensor([[[3.0, -1.0]], [[1.0, -2.0]], [[-1.0, -0.5]]]).reshape(1, 3, 1, 2)
    y = normalized_relu(x)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(y[0, :, 0, 1], torch.full((3,), 1 / 3))


def test_adaptive_wing_loss_values():
    t = torch.zeros(1, 1, 1, 1)
    # small errors: ω ln(1 + (d/ε)^(α−y)) = 8 ln(1 + 0.25^2.1) = 0.4238465 (y = 0, d = 0.25)
    assert float(adaptive_wing_loss(torch.full_like(t, 0.25), t)) == pytest.approx(0.4238465, rel=1e-6)
    assert float(adaptive_wing_loss(t, t)) == pytest.approx(0.0, abs=1e-12)
    # continuous at d = θ and increasing in d for y = 0 and y = 1
    for y in (0.0, 1.0, 0.5):
        tt = torch.full_like(t, y)
        d = torch.linspace(0, 0.99, 200)
        vals = [float(adaptive_wing_loss(tt - s if y > 0.5 else tt + s, tt)) for s in d]
        assert all(b > a for a, b in itertools.pairwise(vals))
        lo = float(adaptive_wing_loss(tt + 0.5 - 1e-6 if y < 0.5 else tt - 0.5 + 1e-6, tt))
        hi = float(adaptive_wing_loss(tt + 0.5 + 1e-6 if y < 0.5 else tt - 0.5 - 1e-6, tt))
        assert hi == pytest.approx(lo, abs=1e-4)


@pytest.mark.parametrize("method,params", [("unet", {"target": "sample"}), ("softseg", {})])
def test_baselines_learn_a_clean_square(method, params):
    g = np.random.default_rng(0)
    truth = np.zeros((8, 24, 24), np.int16)
    for i in range(8):
        a, b = g.integers(2, 12, 2)
        truth[i, a:a + 10, b:b + 10] = 1
    images = truth + 0.2 * g.standard_normal(truth.shape).astype(np.float32)
    raters = np.stack([truth, truth, truth], axis=1)
    m = rs.create(method, epochs=12, lr=3e-3, val_fraction=0, seed=0, **TINY, **params)
    res = m.fit(images, raters).predict(images)
    assert np.allclose(res.probabilities.sum(1), 1, atol=1e-5)
    from raterseg.metrics import dice

    assert np.mean([dice(p, t) for p, t in zip(res.truth, truth)]) > 0.8

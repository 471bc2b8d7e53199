"""raterseg.metrics: every metric on tiny arrays worked out by hand (in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from raterseg import RaterSegError
from raterseg import metrics as M

LN2 = math.log(2)


def test_dice_by_hand():
    # |P|=2, |T|=2, |P∩T|=1 -> 2*1/4
    assert M.dice([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert M.dice(np.zeros((3, 3), int), np.zeros((3, 3), int)) == 1.0  # both empty
    assert M.dice([0, 0], [1, 1]) == 0.0
    # target -1 is left out: only the first voxel counts -> 2*1/(1+1)
    assert M.dice([1, 1], [1, -1]) == 1.0
    # class 2 of a multi-class map: P2={0,1}, T2={1} -> 2*1/3
    assert M.dice([2, 2, 1], [1, 2, 1], label=2) == pytest.approx(2 / 3)
    assert M.dice(np.array([True, False]), np.array([True, True])) == pytest.approx(2 / 3)


def test_soft_dice_by_hand():
    p = np.array([0.2, 0.6, 0.8, 0.95])
    t = np.array([0.0, 0.5, 1.0, 1.0])
    # t=0.1: P={0,1,2,3} T={1,2,3} -> 6/7;  t=0.3: both {1,2,3} -> 1
    # t=0.5: P={1,2,3} T={2,3} (0.5 is not > 0.5) -> 4/5;  t=0.7: both {2,3} -> 1
    # t=0.9: P={3} T={2,3} -> 2/3
    expected = (6 / 7 + 1 + 0.8 + 1 + 2 / 3) / 5
    assert M.soft_dice(p, t) == pytest.approx(expected)
    assert M.soft_dice(p, t, thresholds=(0.5,)) == pytest.approx(0.8)
    assert M.soft_dice(np.zeros(4), np.zeros(4)) == 1.0
    with pytest.raises(RaterSegError, match="prob"):
        M.soft_dice(p * 2, t)
    with pytest.raises(RaterSegError, match="target_prob.*shape"):
        M.soft_dice(p, t[:3])


def test_generalized_energy_distance_by_hand():
    a1 = np.array([1, 1, 0, 0])
    b1, b2 = np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])
    # d(a1,b1)=0, d(a1,b2)=1-1/3=2/3 -> E[d(A,B)]=1/3; E[d(A,A')]=0
    # E[d(B,B')] over the 4 ordered pairs: (0 + 2/3 + 2/3 + 0)/4 = 1/3 -> 2/3 - 0 - 1/3
    assert M.generalized_energy_distance([a1], [b1, b2]) == pytest.approx(1 / 3)
    assert M.generalized_energy_distance([b1, b2], [b1, b2]) == pytest.approx(0.0)
    # empty vs empty is distance 0, empty vs non-empty 1: 2*1 - 0 - 0
    z = np.zeros(4, int)
    assert M.generalized_energy_distance([z], [z]) == 0.0
    assert M.generalized_energy_distance([z], [a1]) == pytest.approx(2.0)
    # a missing rater (all -1) is not a sample
    assert M.generalized_energy_distance([a1], [b1, np.full(4, -1)]) == pytest.approx(0.0)
    # two classes: IoU(class 1) = 1, IoU(class 2) = 1/2 -> d = 1 - 0.75; GED = 2d - 0 - 0
    assert M.generalized_energy_distance([[1, 2, 2]], [[1, 2, 0]]) == pytest.approx(2 * (1 - 0.75))


def test_cm_rmse_by_hand():
    est = np.array([[0.9, 0.2], [0.1, 0.8]])
    true = np.eye(2)
    # squared errors .01 .04 .01 .04 -> mean .025
    assert M.cm_rmse(est, true) == pytest.approx(math.sqrt(0.025))
    both = np.stack([est, true])
    np.testing.assert_allclose(M.cm_rmse(both, np.stack([true, true]), per_rater=True),
                               [math.sqrt(0.025), 0.0])
    # over both raters: squared errors sum to .1 over 8 entries -> mean .0125
    assert M.cm_rmse(both, np.stack([true, true])) == pytest.approx(math.sqrt(0.0125))
    with pytest.raises(RaterSegError, match="true"):
        M.cm_rmse(est, np.eye(3))
    # NaN = not defined (a column of a class that never occurred): left out of the mean
    gap = est.copy()
    gap[:, 1] = np.nan
    assert M.cm_rmse(gap, true) == pytest.approx(math.sqrt(0.01))  # errors .01 .01
    silent = np.stack([est, np.full((2, 2), np.nan)])  # rater 2 annotated nothing
    np.testing.assert_allclose(M.cm_rmse(silent, np.stack([true, true]), per_rater=True),
                               [math.sqrt(0.025), np.nan])
    assert M.cm_rmse(silent, np.stack([true, true])) == pytest.approx(math.sqrt(0.025))
    with pytest.raises(RaterSegError, match="no entry"):
        M.cm_rmse(np.full((2, 2), np.nan), true)
    with pytest.raises(RaterSegError, match="infinite"):
        M.cm_rmse(np.full((2, 2), np.inf), true)


def test_reliability_bins_and_ece_by_hand():
    p = np.array([0.9, 0.8, 0.3, 0.6])  # foreground probability
    t = np.array([1, 0, 0, 1])
    # top-label confidence .9 .8 .7 .6, predicted 1 1 0 1, correct 1 0 1 1
    # K=4: bin [.5,.75) holds .7,.6 (conf .65, acc 1); bin [.75,1] holds .9,.8 (conf .85, acc .5)
    bins = M.reliability_bins(p, t, n_bins=4)
    np.testing.assert_array_equal(bins["count"], [0, 0, 2, 2])
    np.testing.assert_allclose(bins["confidence"][2:], [0.65, 0.85])
    np.testing.assert_allclose(bins["accuracy"][2:], [1.0, 0.5])
    assert np.isnan(bins["accuracy"][0])
    # ECE = 2/4 * .35 + 2/4 * .35
    assert M.expected_calibration_error(p, t, n_bins=4) == pytest.approx(0.35)
    # the same with class probabilities (L, *S) and a -1 voxel that is left out
    probs = np.stack([1 - p, p])
    assert M.expected_calibration_error(np.concatenate([probs, [[0.5], [0.5]]], 1),
                                        np.append(t, -1), n_bins=4) == pytest.approx(0.35)
    # perfectly calibrated: confidence 1 and always right
    assert M.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0


def test_classwise_bins_match_monai():
    torch = pytest.importorskip("torch")
    calibration = pytest.importorskip("monai.metrics.calibration")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 20, 20))
    prob = np.exp(logits) / np.exp(logits).sum(0)
    target = rng.integers(0, 3, size=(20, 20))
    mine = M.reliability_bins(prob, target, n_bins=10, mode="classwise")
    onehot = (np.arange(3)[:, None, None] == target).astype(np.float32)
    mean_p, mean_gt, counts = calibration.calibration_binning(
        torch.as_tensor(prob[None], dtype=torch.float32), torch.as_tensor(onehot[None]), num_bins=10)
    counts = counts[0].numpy()
    np.testing.assert_array_equal(mine["count"], counts.sum(0))
    pooled_p = np.nansum(mean_p[0].numpy() * counts, 0) / np.maximum(counts.sum(0), 1)
    pooled_gt = np.nansum(mean_gt[0].numpy() * counts, 0) / np.maximum(counts.sum(0), 1)
    full = counts.sum(0) > 0
    np.testing.assert_allclose(mine["confidence"][full], pooled_p[full], atol=1e-6)
    np.testing.assert_allclose(mine["accuracy"][full], pooled_gt[full], atol=1e-6)


def test_brier_by_hand():
    # (0.1² + 0.2²) / 2
    assert M.brier_score(np.array([0.9, 0.2]), np.array([1.0, 0.0])) == pytest.approx(0.025)
    # (L, *S) against labels [0, 1]: one-hot errors -.1 .2 / .1 -.2 -> mean of squares .025
    assert M.brier_score(np.array([[0.9, 0.2], [0.1, 0.8]]), np.array([0, 1])) == pytest.approx(0.025)
    with pytest.raises(RaterSegError, match="target"):
        M.brier_score(np.array([[0.9, 0.2], [0.1, 0.8]]), np.array([0, 1, 1]))


def test_entropy_and_entropy_mae_by_hand():
    # Bernoulli: H(0.5) = ln 2, H(0) = H(1) = 0
    np.testing.assert_allclose(M.entropy(np.array([0.5, 0.0, 1.0])), [LN2, 0, 0])
    # classes [.5, .25, .25]: .5 ln2 + 2 * .25 ln4 = 1.5 ln2
    assert M.entropy(np.array([0.5, 0.25, 0.25]), axis=0) == pytest.approx(1.5 * LN2)
    # totals: 2 ln2 vs ln2
    assert M.entropy_mae(np.array([0.5, 0.5]), np.array([0.5, 0.0])) == pytest.approx(LN2)
    # per case: [2ln2, 0] vs [ln2, 2ln2] -> |diffs| ln2, 2ln2 -> mean 1.5 ln2
    a = np.array([[0.5, 0.5], [0.0, 0.0]])
    b = np.array([[0.5, 0.0], [0.5, 0.5]])
    assert M.entropy_mae(a, b, batched=True) == pytest.approx(1.5 * LN2)


def test_rater_table_by_hand():
    truth = np.array([[1, 1, 0, 0]])
    raters = np.array([
        [[1, 0, 0, 1]],      # TP 1 FN 1 TN 1 FP 1: sens .5, spec .5, Dice 2/4, acc .5
        [[1, 1, -1, -1]],    # labelled half: sens 1, no negatives -> spec NaN, Dice 1
        [[-1, -1, -1, -1]],  # missing
    ])
    rows = M.rater_table(raters, truth)
    assert [r["rater"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"rater": 0, "annotated": 1.0, "sensitivity": 0.5, "specificity": 0.5,
                       "dice": 0.5, "accuracy": 0.5}
    assert rows[1]["sensitivity"] == 1.0 and math.isnan(rows[1]["specificity"])
    assert rows[1]["dice"] == 1.0 and rows[1]["annotated"] == 0.5
    assert rows[2]["annotated"] == 0.0 and math.isnan(rows[2]["dice"])
    with pytest.raises(RaterSegError, match="raters"):
        M.rater_table(raters[:, 0], truth)


def test_bad_input_names_the_argument():
    with pytest.raises(RaterSegError, match="pred"):
        M.dice(np.array([0.5, 0.2]), np.array([1, 0]))
    with pytest.raises(RaterSegError, match="target.*shape"):
        M.dice([1, 0], [1, 0, 1])
    with pytest.raises(RaterSegError, match="n_bins"):
        M.expected_calibration_error(np.array([0.5]), np.array([1]), n_bins=0)
    with pytest.raises(RaterSegError, match="prob"):
        M.entropy(np.array([np.nan]))
    with pytest.raises(RaterSegError, match="samples_a"):
        M.generalized_energy_distance([], [[1, 0]])

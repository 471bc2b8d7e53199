"""Evaluation metrics (numpy in, Python floats or numpy arrays out; no torch).

- :func:`dice`, :func:`soft_dice` (MrPrism / AVAP papers: Dice averaged over thresholds),
- :func:`generalized_energy_distance` (Kohl et al. 2018, with d = 1 - IoU),
- :func:`cm_rmse` (CM paper, Zhang et al. 2020: root-MSE between confusion matrices),
- :func:`expected_calibration_error`, :func:`reliability_bins`, :func:`brier_score`,
  :func:`entropy`, :func:`entropy_mae` (Lemay et al. 2022, sections 2.3.2-2.3.3),
- :func:`rater_table`: per-rater sensitivity, specificity and Dice against a truth.

Label maps are int arrays; ``-1`` in a *target* or rater map means "not annotated"
and those voxels are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .types import MISSING, RaterSegError

__all__ = [
    "brier_score",
    "cm_rmse",
    "dice",
    "entropy",
    "entropy_mae",
    "expected_calibration_error",
    "generalized_energy_distance",
    "rater_table",
    "reliability_bins",
    "soft_dice",
]


def _labels(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a.astype(np.int16)
    if not np.issubdtype(a.dtype, np.integer):
        raise RaterSegError(f"{name}: expected integer labels (or bool), got dtype {a.dtype}")
    return a


def _probs(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise RaterSegError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    # float32 rounding may step 1e-7 outside [0, 1]; anything beyond 1e-6 is a mistake.
    if a.size and (not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6):
        fin = a[np.isfinite(a)]
        rng = f"min {fin.min():.3g}, max {fin.max():.3g}" if fin.size else "no finite value"
        raise RaterSegError(f"{name}: expected probabilities in [0, 1] without NaN, got {rng}"
                            f"{' and NaN/inf' if fin.size < a.size else ''}")
    return np.clip(a, 0.0, 1.0)


def _same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise RaterSegError(f"{nb}: expected the shape of {na} {a.shape}, got {b.shape}")


def _dice_masks(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = int(a.sum()), int(b.sum())
    if sa + sb == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / (sa + sb)


def dice(pred, target, label: int = 1) -> float:
    """Dice of class ``label``: 2|P∩T| / (|P| + |T|); 1.0 when both are empty.

    Args:
        pred: int or bool ``(*S)``.
        target: int or bool ``(*S)``; voxels where it is -1 are left out.
        label: the class scored.

    Raises:
        RaterSegError: shapes differ, float labels.
    """
    p, t = _labels(pred, "pred"), _labels(target, "target")
    _same_shape(p, t, "pred", "target")
    keep = t != MISSING
    return _dice_masks((p == label) & keep, (t == label) & keep)


def soft_dice(prob, target_prob, thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)) -> float:
    """Soft Dice D^s: both maps are binarised at each threshold (value > t) and the
    hard Dice scores are averaged (MrPrism, sec. 4.1; AVAP, sec. IV-A.2).

    Args:
        prob: predicted foreground probability ``(*S)`` in [0, 1].
        target_prob: soft target ``(*S)`` in [0, 1], e.g. the mean of the raters' masks.
        thresholds: threshold levels; a level where both maps are empty scores 1.0.

    Raises:
        RaterSegError: shapes differ, values outside [0, 1], no thresholds.
    """
    p, t = _probs(prob, "prob"), _probs(target_prob, "target_prob")
    _same_shape(p, t, "prob", "target_prob")
    ths = [float(x) for x in thresholds]
    if not ths:
        raise RaterSegError("thresholds: expected at least one threshold, got none")
    return float(np.mean([_dice_masks(p > th, t > th) for th in ths]))


def _iou_distance(a: np.ndarray, b: np.ndarray, classes: range) -> float:
    """1 - mean IoU over the foreground classes present in a or b; 0 when none is."""
    ious = []
    for c in classes:
        ma, mb = a == c, b == c
        union = np.logical_or(ma, mb).sum()
        if union:
            ious.append(np.logical_and(ma, mb).sum() / union)
    return 0.0 if not ious else 1.0 - float(np.mean(ious))


def _sample_set(x: Any, name: str) -> list[np.ndarray]:
    arrs = [_labels(a, name) for a in (list(x) if not isinstance(x, np.ndarray) else x)]
    if not arrs:
        raise RaterSegError(f"{name}: expected at least one segmentation, got none")
    # A rater missing from this case (all -1) is not a sample.
    arrs = [a for a in arrs if not (a == MISSING).all()]
    if not arrs:
        raise RaterSegError(f"{name}: every segmentation is -1 (missing)")
    if any((a < 0).any() for a in arrs):
        raise RaterSegError(f"{name}: expected labels >= 0 (partly missing maps are not supported)")
    return arrs


def generalized_energy_distance(samples_a, samples_b, num_classes: int | None = None) -> float:
    """Squared generalised energy distance D²_GED (Kohl et al. 2018, eq. 4):
    2 E[d(a, b)] - E[d(a, a')] - E[d(b, b')], d = 1 - IoU.

    Expectations run over all pairs (including a sample with itself, which adds 0), as in
    the probabilistic U-Net evaluation. For more than two classes d = 1 - mean IoU over
    the foreground classes present in either map; two empty maps are at distance 0.

    Args:
        samples_a: n label maps ``(n, *S)`` (e.g. a model's samples or rater estimates).
        samples_b: m label maps ``(m, *S)`` (e.g. the raters' annotations). Maps entirely
            -1 (missing raters) are skipped.
        num_classes: L; max label + 1 (at least 2) when None.

    Raises:
        RaterSegError: no samples, shapes differ, partly missing maps.
    """
    a = _sample_set(samples_a, "samples_a")
    b = _sample_set(samples_b, "samples_b")
    shapes = {x.shape for x in a + b}
    if len(shapes) != 1:
        raise RaterSegError(f"samples_b: expected every map to have the same shape, got {shapes}")
    L = num_classes or max(2, max(int(x.max()) for x in a + b) + 1)
    classes = range(1, L)

    def mean_d(xs, ys):
        return float(np.mean([[_iou_distance(x, y, classes) for y in ys] for x in xs]))

    return 2 * mean_d(a, b) - mean_d(a, a) - mean_d(b, b)


def cm_rmse(estimated, true, per_rater: bool = False) -> float | np.ndarray:
    """Root mean squared error between confusion matrices (CM paper, sec. 4):
    sqrt(mean over all entries of (estimated - true)²).

    Args:
        estimated, true: ``(R, L, L)`` (or ``(L, L)``, or pixel-wise ``(R, L, L, *S)``),
            ``[r, i, j] = p(rater r says i | truth j)``.
        per_rater: return one RMSE per rater (leading axis) instead of one number.

    Entries that are NaN in either (raterseg's "not defined": a rater who annotated
    nothing, a class that is never the truth) are left out of the mean; a rater with no
    defined entry gets NaN with ``per_rater``.

    Raises:
        RaterSegError: shapes differ, fewer than 2 dimensions, infinite values, or no
            entry defined in both.
    """
    e, t = np.asarray(estimated, np.float64), np.asarray(true, np.float64)
    _same_shape(e, t, "estimated", "true")
    if e.ndim < 2:
        raise RaterSegError(f"estimated: expected confusion matrices (..., L, L), got shape {e.shape}")
    if np.isinf(e).any() or np.isinf(t).any():
        raise RaterSegError("estimated/true: contain infinite values")
    sq = (e - t) ** 2
    defined = ~np.isnan(sq)
    if not defined.any():
        raise RaterSegError("estimated/true: no entry is defined (not NaN) in both")
    if per_rater:
        d = defined.reshape(sq.shape[0], -1)
        total = np.where(d, sq.reshape(sq.shape[0], -1), 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.where(d.any(axis=1), total / d.sum(axis=1), np.nan))
    return float(np.sqrt(sq[defined].mean()))


def _calibration_inputs(prob, target, mode: str):
    """(confidence, correct) flat arrays over annotated voxels (and classes for classwise)."""
    t = _labels(target, "target")
    p = _probs(prob, "prob")
    if p.shape == t.shape:  # binary: prob is the foreground probability
        p = np.stack([1.0 - p, p])
    if p.shape[1:] != t.shape:
        raise RaterSegError(
            f"prob: expected (L, *S) or (*S) with S = target's shape {t.shape}, got {p.shape}")
    L = p.shape[0]
    if t.size and t.max() >= L:
        raise RaterSegError(f"target: expected labels < {L} (classes in prob), got {int(t.max())}")
    keep = t != MISSING
    pk, tk = p[:, keep], t[keep]
    if mode == "top_label":
        return pk.max(axis=0), (pk.argmax(axis=0) == tk).astype(np.float64)
    if mode == "classwise":
        onehot = (np.arange(L)[:, None] == tk[None]).astype(np.float64)
        return pk.reshape(-1), onehot.reshape(-1)
    raise RaterSegError(f"mode: expected 'top_label' or 'classwise', got {mode!r}")


def reliability_bins(prob, target, n_bins: int = 10, mode: str = "top_label") -> dict[str, np.ndarray]:
    """Reliability-diagram statistics (Lemay et al. 2022, eqs. 3-4; Guo et al. 2017).

    Confidences fall in ``n_bins`` equal bins [k/K, (k+1)/K) (the last includes 1).

    Args:
        prob: class probabilities ``(L, *S)``, or a foreground probability ``(*S)``.
        target: int labels ``(*S)``; -1 voxels are left out.
        n_bins: K.
        mode: ``"top_label"``: confidence = max_c p_c, correct = argmax == target (Guo;
            Lemay). ``"classwise"``: every p_c against 1[target == c], as MONAI's
            ``calibration_binning`` does per channel, pooled over classes.

    Returns:
        dict with ``"edges"`` ``(K+1,)``, ``"confidence"``, ``"accuracy"`` (NaN in empty
        bins) and ``"count"`` ``(K,)``.

    Raises:
        RaterSegError: shapes differ, probabilities outside [0, 1], labels >= L, n_bins < 1.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise RaterSegError(f"n_bins: expected an integer >= 1, got {n_bins!r}")
    conf, correct = _calibration_inputs(prob, target, mode)
    K = int(n_bins)
    idx = np.minimum((conf * K).astype(np.int64), K - 1)
    count = np.bincount(idx, minlength=K).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(idx, weights=conf, minlength=K) / count
        accuracy = np.bincount(idx, weights=correct, minlength=K) / count
    return {"edges": np.linspace(0.0, 1.0, K + 1), "confidence": confidence,
            "accuracy": accuracy, "count": count}


def expected_calibration_error(prob, target, n_bins: int = 10, mode: str = "top_label") -> float:
    """ECE = Σ_k (#B_k / N) |accuracy(B_k) - confidence(B_k)| (Lemay et al. 2022, eq. 5;
    Naeini et al. 2015). Arguments as :func:`reliability_bins`.

    Implemented here rather than taken from MONAI because MONAI's ``CalibrationErrorMetric``
    is class-wise only (each channel against its one-hot target) and needs torch; the
    papers use the top-label form. ``mode="classwise"`` gives MONAI's binning pooled over
    classes.

    Raises:
        RaterSegError: as :func:`reliability_bins`; also no annotated voxel.
    """
    bins = reliability_bins(prob, target, n_bins, mode)
    n = bins["count"].sum()
    if n == 0:
        raise RaterSegError("target: no annotated voxel (all -1)")
    full = bins["count"] > 0
    gap = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    return float((bins["count"][full] / n * gap).sum())


def brier_score(prob, target) -> float:
    """Mean squared difference between prediction and target (Lemay et al. 2022, eq. 2).

    ``prob`` and ``target`` of the same shape (e.g. a foreground probability against the
    raters' mean), or ``prob`` ``(L, *S)`` against int labels ``(*S)`` (one-hot; the mean
    of eq. 2 over the L classes). -1 labels are left out.

    Raises:
        RaterSegError: shapes do not fit, values outside [0, 1].
    """
    p = _probs(prob, "prob")
    t_raw = np.asarray(target)
    if p.shape == t_raw.shape:
        return float(np.mean((p - _probs(t_raw, "target")) ** 2))
    t = _labels(t_raw, "target")
    if p.shape[1:] != t.shape:
        raise RaterSegError(
            f"target: expected the shape of prob {p.shape} or labels of shape {p.shape[1:]}, "
            f"got {t.shape}")
    keep = t != MISSING
    onehot = (np.arange(p.shape[0])[:, None] == t[keep][None]).astype(np.float64)
    return float(np.mean((p[:, keep] - onehot) ** 2))


def entropy(prob, axis: int | None = None) -> np.ndarray:
    """Voxel-wise predictive entropy in nats (Lemay et al. 2022, eq. 1, before the sum
    over voxels).

    Args:
        prob: a foreground probability map ``(*S)`` (``axis=None``: Bernoulli entropy
            -p log p - (1-p) log(1-p)), or class probabilities with classes along ``axis``
            (-Σ_c p_c log p_c).

    Returns:
        float64 array: ``prob``'s shape, without ``axis`` when given.

    Raises:
        RaterSegError: values outside [0, 1].
    """
    p = _probs(prob, "prob")

    def plogp(x):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    if axis is None:
        return -(plogp(p) + plogp(1.0 - p))
    return -plogp(p).sum(axis=axis)


def entropy_mae(prob_a, prob_b, axis: int | None = None, batched: bool = False) -> float:
    """Mean absolute error between per-case total entropies (Lemay et al. 2022, sec. 2.3.2):
    H = Σ_voxels entropy (eq. 1) for each case, then mean over cases of |H_a - H_b|.

    Args:
        prob_a, prob_b: same shape; a foreground map ``(*S)`` or class probabilities
            (classes along ``axis``), with a leading case axis N when ``batched``
            (``axis`` then counts from the case axis, e.g. ``axis=1`` for ``(N, L, *S)``).

    Raises:
        RaterSegError: shapes differ, values outside [0, 1].
    """
    a, b = _probs(prob_a, "prob_a"), _probs(prob_b, "prob_b")
    _same_shape(a, b, "prob_a", "prob_b")
    ha, hb = entropy(a, axis), entropy(b, axis)
    if batched:
        ha, hb = ha.reshape(ha.shape[0], -1).sum(1), hb.reshape(hb.shape[0], -1).sum(1)
    else:
        ha, hb = np.atleast_1d(ha.sum()), np.atleast_1d(hb.sum())
    return float(np.mean(np.abs(ha - hb)))


def rater_table_caption(num_classes: int) -> str:
    """What :func:`rater_table`'s columns measure, for a table's title (the CLI's and the
    napari dock's)."""
    if num_classes <= 2:
        what = "label 1 vs 0"
    else:
        what = (f"sensitivity and specificity: any label > 0 vs 0; Dice: mean over labels "
                f"1..{num_classes - 1}, those present")
    return f"Each rater against the fused truth, on the voxels it annotated ({what}):"


def rater_table(raters, truth, num_classes: int | None = None) -> list[dict[str, Any]]:
    """Each rater against a truth: one dict per rater.

    Keys: ``rater`` (index), ``annotated`` (share of voxels the rater labelled),
    ``sensitivity`` and ``specificity`` of foreground (any label > 0) vs background,
    ``dice`` (mean Dice over the foreground classes; 1.0 if neither has foreground) and
    ``accuracy`` (share of exact labels). Voxels where the rater or the truth is -1 are
    left out; a value that cannot be computed (a rater who labelled nothing, no true
    foreground for sensitivity) is NaN.

    Args:
        raters: int ``(R, *S)``, -1 where a rater did not annotate.
        truth: int ``(*S)`` (e.g. a fused ``FusionResult.truth``).

    Raises:
        RaterSegError: shapes do not fit, float labels.
    """
    r = _labels(raters, "raters")
    t = _labels(truth, "truth")
    if r.ndim != t.ndim + 1 or r.shape[1:] != t.shape:
        raise RaterSegError(f"raters: expected (R, *S) with S = truth's shape {t.shape}, got {r.shape}")
    L = num_classes or max(2, int(max(r.max(initial=0), t.max(initial=0))) + 1)
    nan = float("nan")
    rows = []
    for i in range(r.shape[0]):
        keep = (r[i] != MISSING) & (t != MISSING)
        n = int(keep.sum())
        row: dict[str, Any] = {"rater": i, "annotated": float((r[i] != MISSING).mean())}
        if n == 0:
            row.update(sensitivity=nan, specificity=nan, dice=nan, accuracy=nan)
            rows.append(row)
            continue
        ri, ti = r[i][keep], t[keep]
        pos, neg = ti > 0, ti == 0
        row["sensitivity"] = float((ri[pos] > 0).mean()) if pos.any() else nan
        row["specificity"] = float((ri[neg] == 0).mean()) if neg.any() else nan
        dices = [_dice_masks(ri == c, ti == c) for c in range(1, L) if (ri == c).any() or (ti == c).any()]
        row["dice"] = float(np.mean(dices)) if dices else 1.0
        row["accuracy"] = float((ri == ti).mean())
        rows.append(row)
    return rows

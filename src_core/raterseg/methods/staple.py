"""STAPLE: Simultaneous Truth And Performance Level Estimation (Warfield, Zou & Wells 2004).

EM over a hidden true label per voxel with a global class prior ``f`` and one
confusion matrix per rater, ``θ[r, i, j] = p(rater r says i | truth j)``:

- E-step (paper eq. 12/22): ``W[v, j] ∝ f[j] · Π_r θ[r, D[r, v], j]``, raters missing at
  the voxel (label -1) left out of the product (their factor is 1);
- M-step (eq. 13-14/24): ``θ[r, i, j] = Σ_{v: D[r,v]=i} W[v, j] / Σ_{v: r annotated v} W[v, j]``.

The order, initialisation and stopping rule follow SimpleITK so results can be checked
against it: ``init="mean_vote"`` is ``STAPLEImageFilter`` (W₀ = share of raters per class,
prior = mean of W₀, M-step first, stop when every (Δθ)² ≤ 1e-14) and
``init="majority_vote"`` is ``MultiLabelSTAPLEImageFilter`` (θ₀ from comparing raters
with their majority vote — undecided voxels left out, matrices normalised over each
rater label as ITK does — prior = label frequencies over all raters, E-step first, stop
when every |Δθ| < 1e-5). Both keep the prior fixed. Everything accumulates in float64,
so results stay exact above 2^24 voxels (SimpleITK's multi-label filter uses float32).

The E-step sees a voxel only through its pattern of rater labels, so EM runs on the
histogram of patterns (:mod:`._patterns`) and the posterior is mapped back with one
gather. :func:`staple_em` also runs densely over voxels (chunked), which tests use as a
reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..types import RaterSegError, TrainingEvent
from ._base import Progress, normalize_columns, param
from ._patterns import PatternFit, PatternHistogram, PatternMethod, pattern_histogram
from ._registry import register_method

#: STAPLEImageFilter's rule: converged when every (Δp)² and (Δq)² ≤ 1e-14.
SITK_BINARY_TOL_SQ = 1e-14
#: MultiLabelSTAPLEImageFilter's rule: converged when every |Δθ| < 1e-5.
SITK_MULTILABEL_TOL = 1e-5
#: Items (patterns or voxels) per EM chunk: bounds the float64 temporaries.
EM_CHUNK = 1 << 18


def parse_prior(value: Any) -> tuple[float, ...] | None:
    """``"data"`` → None; a number or a comma-separated list / sequence → tuple of floats.

    Raises:
        RaterSegError: not a number list, negative, not finite, or all zero.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("data", ""):
            return None
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
    elif np.ndim(value) == 0:
        parts = [value]
    else:
        parts = list(np.asarray(value).reshape(-1))
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise RaterSegError(
            f"prior (parameter of 'staple'): expected 'data', a foreground probability or "
            f"one probability per class like '0.6,0.3,0.1', got {value!r}") from None
    if not vals or not all(math.isfinite(v) and v >= 0 for v in vals) or sum(vals) <= 0:
        raise RaterSegError(
            f"prior (parameter of 'staple'): expected non-negative finite probabilities with a "
            f"positive sum, got {value!r}")
    return vals


@dataclass
class StapleFit:
    """What :func:`staple_em` returns.

    Attributes:
        probabilities: float32 numpy ``(L, N)`` posterior of the true class.
        rater_confusion: float64 numpy ``(R, L, L)`` (columns with no mass left at 0, as ITK).
        prior: float64 numpy ``(L,)`` the prior used.
        history: one dict per E+M iteration.
        converged: whether the stopping rule was met within ``max_iterations``.
        table: per-pattern results (pattern path only): ``hist`` and ``probabilities`` ``(L, P)``.
    """

    probabilities: np.ndarray | None
    rater_confusion: np.ndarray
    prior: np.ndarray
    history: list[dict[str, Any]]
    converged: bool
    hist: Any = None
    table: np.ndarray | None = None


class _Items:
    """What EM iterates over: P items (patterns, or voxels) with weights, in chunks.

    A chunk is ``(start, lab1, flat, w)``: ``lab1`` int64 ``(R, n)`` = label + 1 (0 =
    missing), ``flat`` = ``lab1`` offset by ``r·(L+1)`` and flattened (rows of the stacked
    ``(R·(L+1), L)`` matrices), ``w`` the item weights or None (= 1 each). A histogram
    fits in one chunk, which is kept so iterations only do arithmetic.
    """

    def __init__(self, labels, num_classes: int, counts=None):
        import torch

        self.labels = labels  # int torch (R, P), -1 = missing
        self.counts = counts  # float64 torch (P,) or None
        R = labels.shape[0]
        self._offsets = (torch.arange(R, device=labels.device) * (num_classes + 1))[:, None]
        self._cache = list(self._make()) if labels.shape[1] <= EM_CHUNK else None

    def _make(self):
        import torch

        n = self.labels.shape[1]
        for s in range(0, n, EM_CHUNK):
            lab1 = self.labels[:, s : s + EM_CHUNK].to(torch.int64) + 1
            flat = (lab1 + self._offsets).reshape(-1)
            w = None if self.counts is None else self.counts[s : s + EM_CHUNK]
            yield s, lab1, flat, w

    def chunks(self):
        return self._cache if self._cache is not None else self._make()


def _votes(lab1, L: int):
    """Per-item votes ``(n, L)`` float64 from shifted labels ``(R, n)``."""
    import torch

    v = torch.zeros(lab1.shape[1], L + 1, dtype=torch.float64, device=lab1.device)
    ones = torch.ones(lab1.shape[1], 1, dtype=torch.float64, device=lab1.device)
    for r in range(lab1.shape[0]):
        v.scatter_add_(1, lab1[r][:, None], ones)
    return v[:, 1:]


def _accumulate(acc, flat, weights) -> None:
    """M-step sums: acc[r, D[r]+1, j] += weights[v, j] for every rater (row 0: missing)."""
    R = acc.shape[0]
    acc.view(-1, acc.shape[2]).index_add_(0, flat, weights.repeat(R, 1))


def _weighted(x, w):
    return x if w is None else x * w[:, None]


def _normalize(m, dim: int):
    """Divide by the sum over ``dim`` where it is positive (ITK leaves zero sums alone)."""
    import torch

    s = m.sum(dim, keepdim=True)
    return torch.where(s > 0, m / torch.where(s > 0, s, torch.ones_like(s)), m)


def _posterior(flat, cm_ext, prior):
    """E-step (eq. 12/22) on a chunk: normalised ``W`` ``(n, L)`` and the evidence ``(n,)``.

    ``cm_ext`` is ``(R, L+1, L)`` with an all-ones row 0, the factor of a missing rater.
    """
    import torch

    R, _, L = cm_ext.shape
    W = cm_ext.reshape(-1, L).index_select(0, flat).view(R, -1, L).prod(0) * prior
    s = W.sum(1)
    ok = s > 0
    W = torch.where(ok[:, None], W / torch.where(ok, s, torch.ones_like(s))[:, None], W)
    return W, s


def _sum_log(s, w) -> float:
    """Σ w·log(s) over items with s > 0 (their log-likelihood)."""
    import torch

    if s.device.type == "cpu":
        # numpy: torch's log on a few hundred CPU values can stall for milliseconds
        # waiting on MKL's thread pool when the machine is busy
        s_np = s.numpy()
        logs = np.log(np.where(s_np > 0, s_np, 1.0))
        return float(logs.sum() if w is None else logs @ w.numpy())
    logs = torch.where(s > 0, s, torch.ones_like(s)).log()
    return float(logs.sum() if w is None else (logs * w).sum())


def _initialise(items: _Items, R: int, L: int, init: str, dev):
    """First confusion matrices and the data prior (counts over all raters' annotations)."""
    import torch

    acc = torch.zeros(R, L + 1, L, dtype=torch.float64, device=dev)
    prior_acc = torch.zeros(L, dtype=torch.float64, device=dev)
    for _, lab1, flat, w in items.chunks():
        votes = _votes(lab1, L)
        total = votes.sum(1)
        if init == "mean_vote":
            # W0 = share of raters per class; prior = mean of W0 (STAPLEImageFilter)
            w0 = votes / total.clamp(min=1)[:, None]
            _accumulate(acc, flat, _weighted(w0, w))
            prior_acc += _weighted(w0, w).sum(0)
        else:
            # theta0 from the majority vote; ties/undecided left out (LabelVotingImageFilter)
            top = votes.max(1, keepdim=True).values
            decided = ((votes == top).sum(1) == 1) & (total > 0)
            hard = torch.zeros_like(votes)
            hard.scatter_(1, votes.argmax(1, keepdim=True), 1.0)
            hard *= decided[:, None]
            _accumulate(acc, flat, _weighted(hard, w))
            prior_acc += _weighted(votes, w).sum(0)  # label frequencies over all raters
    if init == "mean_vote":
        cm = _normalize(acc[:, 1:], 1)  # this is the first M-step
    else:
        cm = _normalize(acc[:, 1:], 2)  # ITK normalises each rater-label row here
    return cm, prior_acc / prior_acc.sum()


def staple_em(labels, num_classes: int, *, init: str = "mean_vote", prior=None,
              max_iterations: int = 10000, tolerance: float = 0.0, patterns: bool = True,
              progress: Progress = None) -> StapleFit:
    """Run STAPLE's EM on one case.

    Args:
        labels: int torch tensor ``(R, N)`` (-1 = missing) on the device to compute on.
        num_classes: L.
        init: ``"mean_vote"`` (STAPLEImageFilter) or ``"majority_vote"`` (MultiLabelSTAPLE).
        prior: None (from the data) or float ``(L,)`` summing to 1.
        max_iterations: most E+M iterations after initialisation.
        tolerance: stop when every |Δθ| ≤ tolerance; 0 = SimpleITK's rule for ``init``.
        patterns: run on the histogram of rater-label patterns (else densely over voxels).
        progress: called with a :class:`TrainingEvent` per iteration.

    Returns:
        :class:`StapleFit` (``probabilities`` None on the pattern path: use ``table``).
    """
    if patterns:
        return staple_em_histogram(pattern_histogram(labels, num_classes), num_classes, init=init,
                                   prior=prior, max_iterations=max_iterations,
                                   tolerance=tolerance, progress=progress)
    return _run_em(_Items(labels, num_classes), num_classes, init, prior, max_iterations,
                   tolerance, progress)


def staple_em_histogram(hist, num_classes: int, *, init: str = "mean_vote", prior=None,
                        max_iterations: int = 10000, tolerance: float = 0.0,
                        progress: Progress = None) -> StapleFit:
    """STAPLE's EM on a histogram of rater-label patterns (see :func:`staple_em`).

    Only ``hist.labels`` and ``hist.counts`` are used, so the histogram may have been
    accumulated over chunks of a volume too big for memory (:mod:`raterseg.chunked`).
    Returns a :class:`StapleFit` whose ``table`` holds the posterior per pattern.
    """
    import torch

    dev = hist.labels.device
    if hist.num_patterns <= EM_CHUNK:
        # A few hundred items: EM on the CPU beats kernel launches on a GPU.
        dev = torch.device("cpu")
    items = _Items(hist.labels.to(dev), num_classes, hist.counts.to(dev, torch.float64))
    fit = _run_em(items, num_classes, init, prior, max_iterations, tolerance, progress)
    fit.hist, fit.table, fit.probabilities = hist, fit.probabilities, None
    return fit


def _run_em(items: _Items, num_classes: int, init: str, prior, max_iterations: int,
            tolerance: float, progress: Progress) -> StapleFit:
    """EM iterations over ``items`` (patterns or voxels); ``probabilities`` ``(L, P)``."""
    import torch

    dev = items.labels.device
    R = items.labels.shape[0]
    L = num_classes
    cm, data_prior = _initialise(items, R, L, init, dev)
    f = data_prior if prior is None else torch.as_tensor(prior, dtype=torch.float64, device=dev)
    ones = torch.ones(R, 1, L, dtype=torch.float64, device=dev)  # factor of a missing rater
    history: list[dict[str, Any]] = []
    converged = False
    acc = torch.empty(R, L + 1, L, dtype=torch.float64, device=dev)
    for it in range(1, max_iterations + 1):
        cm_ext = torch.cat([ones, cm], 1)
        acc.zero_()
        loglik = 0.0
        for _, _, flat, w in items.chunks():
            W, s = _posterior(flat, cm_ext, f)
            loglik += _sum_log(s, w)
            _accumulate(acc, flat, _weighted(W, w))
        new = _normalize(acc[:, 1:], 1)  # M-step, eq. 13-14 / 24
        delta = float((new - cm).abs().max())
        cm = new
        if tolerance > 0:
            converged = delta <= tolerance
        elif init == "mean_vote":
            converged = delta * delta <= SITK_BINARY_TOL_SQ
        else:
            converged = delta < SITK_MULTILABEL_TOL
        history.append({"iteration": it, "max_update": delta,
                        "log_likelihood": float(loglik), "converged": converged})
        if progress is not None:
            progress(TrainingEvent(it, max_iterations, f"staple: EM iteration {it}",
                                   {"max_update": delta, "log_likelihood": float(loglik)}))
        if converged:
            break

    # Final E-step with the last confusion matrices: the returned posterior.
    cm_ext = torch.cat([ones, cm], 1)
    P = items.labels.shape[1]
    out = np.empty((L, P), np.float32)
    for s0, _, flat, _ in items.chunks():
        W, s = _posterior(flat, cm_ext, f)
        W = torch.where((s > 0)[:, None], W, torch.full_like(W, 1.0 / L))  # impossible pattern
        out[:, s0 : s0 + W.shape[0]] = W.T.to(torch.float32).cpu().numpy()
    return StapleFit(out, cm.cpu().numpy(), f.cpu().numpy(), history, converged)


@register_method("staple")
class Staple(PatternMethod):
    """STAPLE (Warfield, Zou & Wells 2004), binary and multi-class, matching SimpleITK.

    ``init="auto"`` behaves as SimpleITK's ``STAPLEImageFilter`` for two classes and as
    ``MultiLabelSTAPLEImageFilter`` for more (see the module docstring for the exact
    order and stopping rules). Raters missing at a voxel (-1) are left out of its
    likelihood and of the M-step sums. ``rater_confusion[r, i, j] = p(rater r says i |
    truth j)``; for two classes ``[r, 1, 1]`` is the sensitivity and ``[r, 0, 0]`` the
    specificity. ``history`` has one dict per EM iteration (``max_update``,
    ``log_likelihood`` of the matrices going into that iteration's E-step, ``converged``).

    Examples:
        >>> res = rs.fuse(raters, method="staple")
        >>> sensitivity = res.rater_confusion[:, 1, 1]
    """

    @dataclass(frozen=True)
    class Config:
        init: str = param("auto", "starting point and stopping rule: mean_vote = SimpleITK "
                          "STAPLE, majority_vote = MultiLabelSTAPLE, auto = by number of classes",
                          choices=("auto", "mean_vote", "majority_vote"))
        prior: str = param("data", "class prior: 'data' (estimated at the start), a foreground "
                           "probability (binary) or one probability per class, e.g. '0.7,0.2,0.1'")
        max_iterations: int = param(10000, "most EM iterations", low=1)
        tolerance: float = param(0.0, "stop when no confusion-matrix entry changes by more than "
                                 "this; 0 = SimpleITK's rule for the init", low=0.0)

    def __init__(self, num_classes: int | None = None, num_raters: int | None = None,
                 device: Any = None, seed: int = 0, **params: Any) -> None:
        if "prior" in params and not isinstance(params["prior"], str):
            # numbers and sequences are welcome from Python; the Config keeps a string
            vals = parse_prior(params["prior"])
            params["prior"] = ",".join(repr(v) for v in vals)
        super().__init__(num_classes, num_raters, device, seed, **params)
        self._prior = parse_prior(self.config.prior)

    def _prior_for(self, L: int) -> np.ndarray | None:
        if self._prior is None:
            return None
        vals = self._prior
        if len(vals) == 1 and L == 2:
            if not 0.0 < vals[0] < 1.0:
                raise RaterSegError(
                    f"prior (parameter of 'staple'): expected a foreground probability in (0, 1), "
                    f"got {vals[0]!r}")
            vals = (1.0 - vals[0], vals[0])
        if len(vals) != L:
            raise RaterSegError(
                f"prior (parameter of 'staple'): expected {L} class probabilities "
                f"(num_classes={L}){' or one foreground probability' if L == 2 else ''}, "
                f"got {len(vals)}: {self.config.prior!r}")
        p = np.asarray(vals, np.float64)
        if abs(p.sum() - 1.0) > 0.05:  # '0.3,0.3' is a typo; '0.33,0.33,0.33' is rounding
            raise RaterSegError(
                f"prior (parameter of 'staple'): expected class probabilities that sum to 1, "
                f"got {self.config.prior!r} (sum {p.sum():.4g})")
        return p / p.sum()

    def fit_patterns(self, hist: PatternHistogram, num_classes: int, progress: Progress) -> PatternFit:
        L = num_classes
        init = self.config.init
        if init == "auto":
            init = "mean_vote" if L == 2 else "majority_vote"
        fit = staple_em_histogram(hist, L, init=init, prior=self._prior_for(L),
                                  max_iterations=self.config.max_iterations,
                                  tolerance=self.config.tolerance, progress=progress)
        cm = normalize_columns(fit.rater_confusion)  # a class absent from W: NaN column
        return PatternFit(fit.table, None, {"rater_confusion": cm, "history": fit.history})

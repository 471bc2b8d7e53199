"""Losses and output activations of the learned methods.

Shapes: ``B`` batch, ``R`` raters, ``L`` classes, ``s`` spatial (2D or 3D). Rater
labels arrive as ``raters`` long ``(B, R, *s)`` with missing entries replaced by a
valid class index and flagged False in ``annotated`` ``(B, R, *s)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "adaptive_wing_loss",
    "cm_log_annotator_probs",
    "cm_loss",
    "low_rank_annotator_probs",
    "low_rank_cm",
    "normalized_relu",
    "soft_cross_entropy",
]


def cm_log_annotator_probs(seg_logits: torch.Tensor, cm_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of each annotator's label distribution ``A_r · p`` (Zhang et al. 2020, eq. 2).

    Args:
        seg_logits: ``(B, L, *s)`` logits of the segmentation network; ``p = softmax``.
        cm_logits: ``(B, R, L, L, *s)`` logits of the CMs; ``A[i, j] = softmax_i``, so every
            column sums to 1 (``A[i, j] = p(noisy i | true j)``).

    Returns:
        ``(log_q, trace)``: ``log_q`` ``(B, R, L, *s)`` = log Σ_j A[i, j] p[j], computed as a
        log-sum-exp (no softmax applied twice, no log of a rounded-off zero), and
        ``trace`` ``(B, R, *s)`` = tr(A_r).
    """
    log_a = F.log_softmax(cm_logits, dim=2)
    log_p = F.log_softmax(seg_logits, dim=1)
    log_q = torch.logsumexp(log_a + log_p.unsqueeze(1).unsqueeze(2), dim=3)
    # diagonal() moves the (i, j) pair to the last axis: (B, R, *s, L).
    trace = torch.diagonal(log_a, dim1=2, dim2=3).exp().sum(-1)
    return log_q, trace


def _positive(x: torch.Tensor) -> torch.Tensor:
    return F.softplus(x) + 1e-6


def low_rank_cm(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Full CMs from the low-rank factors of appendix A.4: ``A = B1 · B2ᵀ``, columns normalised.

    Args:
        b1, b2: ``(B, R, L, l, *s)`` unconstrained factors (made positive with softplus).

    Returns:
        ``(B, R, L, L, *s)`` column-normalised CMs.
    """
    a = torch.einsum("brik...,brjk...->brij...", _positive(b1), _positive(b2))
    return a / a.sum(dim=2, keepdim=True)


def low_rank_annotator_probs(seg_logits: torch.Tensor, b1: torch.Tensor,
                             b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(A_r · p)`` and ``tr(A_r)`` for ``A = colnorm(B1 B2ᵀ)`` without forming ``A``.

    With column sums ``c_j = Σ_k (Σ_i B1[i, k]) B2[j, k]``:
    ``A p = B1 (B2ᵀ (p / c))`` and ``tr A = Σ_j Σ_k B1[j, k] B2[j, k] / c_j`` — O(L·l) per
    pixel instead of O(L²).

    Returns:
        ``(log_q (B, R, L, *s), trace (B, R, *s))``.
    """
    u, v = _positive(b1), _positive(b2)
    p = torch.softmax(seg_logits, dim=1).unsqueeze(1)  # (B, 1, L, *s)
    col = torch.einsum("brk...,brjk...->brj...", u.sum(2), v)  # (B, R, L, *s)
    w = torch.einsum("brjk...,brj...->brk...", v, p / col)  # (B, R, l, *s)
    q = torch.einsum("brik...,brk...->bri...", u, w)
    trace = ((u * v).sum(3) / col).sum(2)
    return torch.log(q.clamp_min(1e-12)), trace


def cm_loss(log_q: torch.Tensor, trace: torch.Tensor, raters: torch.Tensor,
            annotated: torch.Tensor, trace_weight: float,
            trace_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zhang et al. 2020, eq. (4), averaged over pixels, with the trace averaged over raters.

    ``(1/P) Σ_pixels Σ_{r∈S} [ −log q_r[y_r]  +  (λ/R) · tr A_r ]`` with ``S`` the raters
    who annotated the pixel, ``R`` the number of raters of the model and ``P`` the number
    of pixels that at least one rater annotated. With dense labels the first term is the
    sum over raters of each rater's mean cross-entropy, as in the authors' code
    (appendix B, but on ``log(A·p)``, not a second softmax), and the second is λ times the
    *mean* trace over the raters — section 3.3: "the mean trace represents the average
    probability that a randomly selected annotator provides an accurate label"; the
    authors' code adds the mean trace of one annotator (the last of its loop), so its
    λ = 0.7 weighs one annotator's trace against the sum of five cross-entropies.
    Summing the traces over the raters instead (λ·Σ_r tr A_r) multiplies λ by R: with the
    paper's λ and five MNIST annotators the trace then outweighs the likelihood and the
    segmentation follows the over-segmenting annotators (docs/BENCHMARKS.md,
    ``cm_baselines``). Each annotation carries the same weight λ/R of trace as of
    cross-entropy, so a rater who did not annotate adds neither, and with one label per
    image the trace is as strong, relative to the likelihood, as with dense labels (as in
    Theorem 1, where each rater's CM is weighted by the probability ``π_r`` that the rater
    labels the image).

    Args:
        log_q: ``(B, R, L, *s)`` log annotator distributions.
        trace: ``(B, R, *s)`` traces of the CMs.
        raters: long ``(B, R, *s)``; annotated: bool ``(B, R, *s)``.
        trace_weight: λ; a negative λ maximises the trace (the warm-up towards identity).
        trace_floor: traces below this are not rewarded (``max(tr A, floor)``); 0 is
            eq. (4) as printed (the CM method's default is 1, see ``methods/cm.py``).

    Returns:
        ``(loss, nll_term, trace_term)`` scalars (the last two without λ): the summed NLL
        per pixel and ``(1/(P·R)) Σ Σ_{r∈S} tr A_r`` (the mean trace with dense labels).
    """
    nll = -log_q.gather(2, raters.unsqueeze(2)).squeeze(2)
    w = annotated.to(nll.dtype)
    pixels = (w.sum(1) > 0).sum().clamp_min(1)
    nll_term = (nll * w).sum() / pixels
    trace_term = (trace.clamp_min(trace_floor) * w).sum() / (pixels * raters.shape[1])
    return nll_term + trace_weight * trace_term, nll_term, trace_term


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy with soft targets: mean over pixels of ``−Σ_c t_c log softmax(z)_c``.

    Args:
        logits: ``(B, L, *s)``; target: ``(B, L, *s)`` probabilities;
        weight: optional ``(B, *s)`` pixel weights (e.g. 0 where no rater annotated).
    """
    ce = -(target * F.log_softmax(logits, dim=1)).sum(1)
    if weight is None:
        return ce.mean()
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def normalized_relu(x: torch.Tensor, dim: int = 1, eps: float = 1e-6) -> torch.Tensor:
    """SoftSeg's final activation generalised to several classes (Lemay et al. 2022, §2.1.2).

    ``relu(x)`` divided by its sum over the classes (including background), so the
    classes sum to 1; where every class is ≤ 0 the output is uniform ``1/L``.
    """
    r = F.relu(x)
    s = r.sum(dim, keepdim=True)
    uniform = torch.full_like(r, 1.0 / x.shape[dim])
    return torch.where(s > eps, r / s.clamp_min(eps), uniform)


def adaptive_wing_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                       *, omega: float = 8.0, theta: float = 0.5, alpha: float = 2.1,
                       epsilon: float = 1.0) -> torch.Tensor:
    """Adaptive Wing loss (Wang et al. 2019), as used by SoftSeg (Lemay et al. 2022, table 5:
    ε = 1, α = 2.1, θ = 0.5, ω = 8).

    For ``d = |y − ŷ|``: ``ω ln(1 + (d/ε)^(α−y))`` when ``d < θ``, else ``A d − C`` with
    ``A = ω (α−y) (θ/ε)^(α−y−1) / (ε (1 + (θ/ε)^(α−y)))`` and
    ``C = θ A − ω ln(1 + (θ/ε)^(α−y))`` (continuous at ``d = θ``).

    Args:
        pred, target: ``(B, L, *s)`` values in [0, 1]; weight: optional ``(B, *s)``.

    Returns:
        The mean over classes and (weighted) pixels.
    """
    d = (target - pred).abs()
    a_y = alpha - target
    ratio = theta / epsilon
    small = omega * torch.log1p((d / epsilon).clamp_min(1e-12).pow(a_y))
    big_a = omega * a_y * ratio ** (a_y - 1) / (epsilon * (1 + ratio ** a_y))
    big_c = theta * big_a - omega * torch.log1p(ratio ** a_y)
    loss = torch.where(d < theta, small, big_a * d - big_c).mean(1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)

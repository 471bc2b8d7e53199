"""Truncated generalised cross entropy with reliability maps (TGCE_SS; Lotero Londoño 2025,
M.Eng. thesis, ch. 2).

Shapes: ``B`` batch, ``R`` raters, ``L`` classes, ``s`` spatial (2D or 3D).

For one pixel, a rater r who labelled it ``y_r`` and the network's reliability
``Λ_r ∈ [0, 1]`` and class probabilities ``f``, the loss is (eq. 2-6)

    ℓ_r = Λ_r · (1 − Σ_k y_rk f_k^q) / q  +  (1 − Λ_r) · (1 − (1/L)^q) / q.

The first term is the generalised cross entropy of eq. 2-1 (Zhang & Sabuncu 2018);
the second is a constant, the GCE of a uniform prediction. Eq. 2-6 writes the
first term as ``E_k{Y_r ∘ (1 − f^q)/q}``, a mean over the classes; with a one-hot
``Y_r`` that is ``(1 − f_y^q)/(q·L)``, which is *not* the GCE of eq. 2-1 and would
no longer be on the scale of the constant it is traded against (Λ = 1 must give
back GCE, Λ = 0 the uniform loss). We use the sum over classes, i.e. eq. 2-1.

Properties the tests check: Λ = 1 gives GCE; Λ = 0 gives the constant; as q → 0
the first term tends to the cross entropy ``−log f_y`` and the constant to ``log L``;
q = 1 gives the mean absolute error ``1 − f_y``.

The loss is linear in Λ: ``∂ℓ/∂Λ = GCE(y_r, f) − (1 − (1/L)^q)/q``, so Λ is pushed to
1 exactly where f puts more than ``1/L`` on the rater's label and to 0 where less.
The "trivial" solution Λ → 0 everywhere therefore only wins where every rater is
worse than a uniform guess; it is not a minimum otherwise.

Averaging (eqs. 2-6, 2-7): over the (pixel, rater) pairs that were annotated within
each image, then over the images that have any annotation. A missing rater adds
neither a term nor a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gce_per_pixel", "tgce_loss", "uniform_gce"]


def uniform_gce(num_classes: int, q: float) -> float:
    """``(1 − (1/L)^q) / q``: the GCE of a uniform prediction, the loss where Λ = 0."""
    return (1.0 - num_classes ** (-q)) / q


def gce_per_pixel(seg_logits: torch.Tensor, raters: torch.Tensor, q: float) -> torch.Tensor:
    """GCE of eq. 2-1 for every rater and pixel: ``(1 − f_y^q) / q`` with ``f = softmax``.

    ``f_y^q`` is computed as ``exp(q · log_softmax)``, whose gradient stays finite where
    ``f_y`` underflows to 0 (``f^q`` itself has an infinite derivative at 0).

    Args:
        seg_logits: ``(B, L, *s)`` logits of the segmentation head.
        raters: long ``(B, R, *s)`` class indices (any valid class where not annotated).
        q: truncation, in (0, 1].

    Returns:
        ``(B, R, *s)`` float tensor.
    """
    log_f = F.log_softmax(seg_logits, dim=1)  # (B, L, *s)
    b, r = raters.shape[:2]
    log_f_y = log_f.unsqueeze(1).expand(b, r, *log_f.shape[1:]).gather(2, raters.unsqueeze(2))
    return -torch.expm1(q * log_f_y.squeeze(2)) / q


def tgce_loss(seg_logits: torch.Tensor, reliability: torch.Tensor, raters: torch.Tensor,
              annotated: torch.Tensor, q: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TGCE_SS, eqs. 2-6 and 2-7 (with the Σ_k form of eq. 2-1; see the module docstring).

    Args:
        seg_logits: ``(B, L, *s)`` logits; f = softmax over L.
        reliability: ``(B, R, *s)`` Λ in [0, 1] (already through a sigmoid).
        raters: long ``(B, R, *s)``; annotated: bool ``(B, R, *s)``.
        q: truncation, in (0, 1].

    Returns:
        ``(loss, parts)``: the scalar loss and, detached, ``gce`` (mean GCE over the
        annotated pairs), ``reliability`` (mean Λ over them) — for logging.
    """
    L = seg_logits.shape[1]
    gce = gce_per_pixel(seg_logits, raters, q)
    const = uniform_gce(L, q)
    lam = reliability.to(gce.dtype)
    per = lam * gce + (1.0 - lam) * const
    zero = torch.zeros((), dtype=per.dtype, device=per.device)
    per = torch.where(annotated, per, zero)  # missing raters: no term, no gradient
    b = per.shape[0]
    count = annotated.reshape(b, -1).sum(1).to(per.dtype)  # annotated (rater, pixel) pairs
    per_image = per.reshape(b, -1).sum(1) / count.clamp_min(1.0)
    has = count > 0
    loss = per_image[has].sum() / has.sum().clamp_min(1)
    with torch.no_grad():
        n = count.sum().clamp_min(1.0)
        parts = {"gce": torch.where(annotated, gce, zero).sum() / n,
                 "reliability": torch.where(annotated, lam, zero).sum() / n}
    return loss, parts


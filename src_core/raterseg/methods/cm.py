"""``cm``: learned spatial confusion matrices (Zhang, Tanno et al., NeurIPS 2020).

A segmentation network gives ``p(x)`` ``(L, *S)``; an annotator network gives each
rater's confusion matrices ``A_r(x)`` with ``A_r[i, j] = p(rater r says i | true j)``
(columns sum to 1). Rater r's labels are modelled as ``A_r · p`` (eq. 2) and both
networks are trained with eq. (4): the negative log-likelihood of the labels of the
raters who annotated plus λ times the trace of their CMs, which pushes the CMs to
be as unreliable as the labels allow and so separates the raters' errors from the
truth (section 3.4). Both networks share one U-Net with separate output heads
(appendix B).

The loss is eq. (4) with the trace averaged over the raters: per pixel
``Σ_{r∈S} −log(A_r·p)[y_r] + (λ/R) Σ_{r∈S} tr A_r`` (see
:func:`raterseg.nn.losses.cm_loss`). With dense labels that is the sum of the raters'
cross-entropies plus λ times the mean trace — the paper's "mean trace" and the scale of
the authors' code, which adds one annotator's trace. Summing the traces over the raters
(what this module did before) multiplies λ by R; with the paper's λ = 0.7 and five
annotators the trace then outweighs the likelihood and the segmentation follows the
over-segmenting annotators (MNIST, 500 digits: Dice 57.5 summed, 97 averaged;
docs/BENCHMARKS.md, ``cm_baselines``).

Differences from the authors' code, on purpose: the NLL is taken on
``log(A·p)`` (computed as a log-sum-exp), not by feeding probabilities to
``CrossEntropyLoss`` (a second softmax); the trace term covers every rater, not only
the last one in the loop; and the warm-up the paper describes (CMs driven towards
identity first) is done: for ``warmup_epochs`` epochs the trace is maximised
(the term's sign flipped) instead of minimised. The loss logged and monitored for
early stopping stays eq. (4) during the warm-up.

What the trace can and cannot do (section 3.4): it separates the raters' errors from
the truth where the raters are right on average at a pixel. Pixel-wise CMs leave the
column of a class absent at a pixel free, and the trace is lowest when ``p`` sides with
the minority of the raters there: left alone it can flip ``p`` wherever raters disagree.
Theorem 1 assumes the estimated mean CM is diagonally dominant, which for two classes
means a trace above 1; the paper relies on the warm-up to stay there. One deliberate
change to eq. (4), therefore: by default a trace below 1 is not rewarded
(``trace_floor=1``: the penalty is ``λ·max(tr A_r, 1)``; 1 is the trace of a rater whose
labels ignore the truth). On MNIST (500 digits, 20 epochs, seed 1; docs/BENCHMARKS.md)
the printed loss (``trace_floor=0``) let the traces sink below 1 after epoch 10 and the
segmentation collapsed to background (Dice 9.7); with the floor it kept 85.8. Which
explanation training settles in still depends on the seed: 97.6 on seed 0, ~86 on seeds
1 and 2, where the good annotator is modelled as missing ~40 % of the digit.
Where the raters split evenly (the 4-rater phantom of ``synth.sample_case``: good and
under say background, over and wrong foreground in a ring around each blob) nothing in
the labels tells the two explanations apart, and CM, like STAPLE, may take either.

A second deliberate addition to eq. (4), on by default: the raters' *mean* CM is kept
diagonally dominant at every pixel, with a hinge ``μ·Σ_j max(0, 1/L − Ā[j, j])`` (``Ā``
the mean of the raters' CMs at the pixel; ``dominance_weight`` μ = 10; 0 gives eq. (4)
alone; see :meth:`ConfusionMatrices.dominance_penalty`). Theorem 1's proof (appendix C)
assumes every diagonal entry of the estimated mean CM is at least 1/L, and eq. (4) does
not keep it so: where every rater says background and ``p`` says background, the CMs'
foreground column is unused, and both the likelihood (in proportion to ``p_fg``) and the
trace move it towards "says background"; once ``a01`` nears ``a00`` the likelihood no
longer holds ``p`` at background there, and nothing else does. On LIDC, where nodules
are ~3 % of a 64×64 slice, that is almost every pixel: CM over-segmented (foreground
6.3 % of the test pixels vs the raters' 2.6 %; at the pixels all four raters call
background but CM foreground, mean a11 0.24) and scored 26.5 ± 6.6 Dice vs STAPLE
against 44.6 ± 4.3 for a U-Net on the STAPLE target (reduced CPU run, seeds 0-2;
docs/BENCHMARKS.md, "CM on LIDC"). λ = 0, 0.01 or 0.1, no warm-up, no trace floor or a
floor on each diagonal entry instead of the trace leave it at 23-26 — the likelihood
alone does it. With the hinge: 39.1 ± 5.7 (+10 to +16 on every seed; still below the
U-Net at this budget; ``cm_level="image"``, where no column is unused, reaches it at
44.7 ± 5.5 but models no spatial pattern of the errors), and on MNIST
(five simulated annotators) it also removes the seeds where the good annotator was
modelled as missing ~40 % of the digit (500 digits, 20 epochs, dense, seeds 0-2: Dice
97.7, 97.3, 97.1 vs 97.6, 85.9, 85.9 without; CM RMSE 0.033 vs 0.13). Only the mean is
constrained, so a rater who misses everything (MNIST's "blank") stays representable
next to better ones. μ = 10 was picked from 1, 10, 100 on those LIDC runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.backbones import MultiHeadUNet
from ..nn.losses import cm_log_annotator_probs, cm_loss, low_rank_annotator_probs, low_rank_cm
from ..types import RaterSegError
from ._base import param
from ._learned import LearnedMethod
from ._registry import register_method

#: Initial diagonal logit of the CMs: p(says j | true j) = e²/(e² + 1) ≈ 0.88 at the start
#: for two classes (the log(L-1) added in the code keeps it so for L classes).
DIAGONAL_LOGIT = 2.0


class CMNetwork(nn.Module):
    """Shared U-Net with a segmentation head ``seg`` ``(B, L, *s)`` and a CM head ``cm``
    ``(B, R·K, *s)`` (K = L·L, or 2·L·rank for the low-rank form), pixel-wise, pooled
    per image, or one learned matrix per rater broadcast everywhere (``global``)."""

    def __init__(self, spatial_dims: int, in_channels: int, features, num_classes: int,
                 num_raters: int, level: str, rank: int) -> None:
        super().__init__()
        k = num_raters * (num_classes * num_classes if rank == 0 else 2 * num_classes * rank)
        heads = {"seg": num_classes}
        pooled = {}
        if level == "pixel":
            heads["cm"] = k
        elif level == "image":
            pooled["cm"] = k
        self.unet = MultiHeadUNet(spatial_dims, in_channels, features, heads, pooled)
        self.global_cm = nn.Parameter(torch.zeros(k)) if level == "global" else None
        if rank == 0:
            self._start_near_identity(num_raters, num_classes)

    @torch.no_grad()
    def _start_near_identity(self, num_raters: int, num_classes: int) -> None:
        """Start every CM near the identity (section 3.4: the CMs are initialised as
        identities). With the CMs' columns all alike at the start — what a random head
        gives — ``A·p`` hardly depends on ``p`` and the segmentation head gets no signal."""
        L = num_classes
        diag = torch.zeros(num_raters, L, L)
        diag[:, range(L), range(L)] = DIAGONAL_LOGIT + math.log(L - 1)
        if self.global_cm is not None:
            self.global_cm.copy_(diag.flatten())
            return
        head = (self.unet.heads if "cm" in self.unet.heads else self.unet.pooled_heads)["cm"]
        head.weight.mul_(0.1)
        head.bias.copy_(diag.flatten())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.unet(x)
        if self.global_cm is not None:
            g = self.global_cm.reshape(1, -1, *([1] * (x.ndim - 2)))
            out["cm"] = g.expand(x.shape[0], -1, *x.shape[2:])
        return out


@register_method("cm", learned=True)
class ConfusionMatrices(LearnedMethod):
    """Segmentation network + annotator network of spatial confusion matrices.

    ``probabilities`` = the segmentation network's p; ``rater_estimates`` = ``A_r·p``;
    ``rater_maps`` = the probability that rater r gives the true label,
    ``Σ_j p_j A_r[j, j]``; ``rater_confusion`` = the CMs averaged over the pixels,
    column j weighted by ``p(true = j)`` there (so it is ``p(says i | true j)`` over the
    image; a plain average would mix in the CM columns of classes absent at a pixel,
    which the loss cannot identify).

    Reference: L. Zhang, R. Tanno et al., "Disentangling Human Error from the Ground
    Truth in Segmentation of Medical Images", NeurIPS 2020 (eqs. 2 and 4, appendix A.4
    for ``rank``, appendix B for the network).

    Examples:
        >>> res = rs.fuse(raters, image=image, method="cm", epochs=30)
        >>> res.rater_confusion[0]          # rater 0: p(says i | true j)
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        trace_weight: float = param(0.7, "λ: weight of the CMs' trace in the loss (eq. 4)",
                                    low=0.0)
        cm_level: str = param("pixel", "confusion matrices per pixel, per image or one per rater",
                              choices=("pixel", "image", "global"))
        rank: int = param(0, "0: full CMs; l >= 2: low-rank CMs B1·B2ᵀ of rank l (appendix A.4)",
                          low=0)
        trace_floor: float = param(1.0, "traces below this are not rewarded (1: an uninformative "
                                   "rater, below which a CM is no longer diagonally dominant; "
                                   "0: eq. 4 as printed)", low=0.0)
        dominance_weight: float = param(10.0, "μ: weight of a hinge that keeps every diagonal "
                                        "entry of the raters' mean CM at least 1/L at every "
                                        "pixel (theorem 1's assumption; 0: eq. 4 alone)",
                                        low=0.0)
        warmup_epochs: int = param(2, "first epochs that maximise the trace (CMs towards identity)",
                                   low=0)

    def check_config(self) -> None:
        if self.config.rank == 1:
            raise RaterSegError(
                "rank: expected 0 (full) or at least 2, got 1 — a rank-1 CM with normalised "
                "columns has identical columns, i.e. a rater whose labels ignore the truth"
            )
        if self.num_classes is not None and self.config.rank >= self.num_classes:
            raise RaterSegError(
                f"rank: expected 0 (full) or 2..{self.num_classes - 1} for {self.num_classes} "
                f"classes, got {self.config.rank}"
            )

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        rank = self.config.rank
        if rank >= num_classes:
            raise RaterSegError(
                f"rank: expected 0 (full) or 2..{num_classes - 1}, as the network tells "
                f"{num_classes} classes apart (the labels that occur in the training data), "
                f"got {rank}"
            )
        return CMNetwork(spatial_dims, in_channels, self.config.features, num_classes,
                         num_raters, self.config.cm_level, rank)

    # -- the CMs from the network outputs ----------------------------------------------
    def _split(self, outputs):
        seg = outputs["seg"]
        b, L = seg.shape[:2]
        spatial = seg.shape[2:]
        cm = outputs["cm"]
        rank = self.config.rank
        if rank == 0:
            return seg, cm.reshape(b, -1, L, L, *spatial), None
        f = cm.reshape(b, -1, 2, L, rank, *spatial)
        return seg, f[:, :, 0], f[:, :, 1]

    def matrices(self, outputs) -> torch.Tensor:
        """Column-normalised CMs ``(B, R, L, L, *s)`` from network outputs."""
        _seg, a, b2 = self._split(outputs)
        return torch.softmax(a, dim=2) if b2 is None else low_rank_cm(a, b2)

    def loss(self, outputs, raters, annotated, state):
        seg, a, b2 = self._split(outputs)
        if b2 is None:
            log_q, trace = cm_log_annotator_probs(seg, a)
        else:
            log_q, trace = low_rank_annotator_probs(seg, a, b2)
        lam = self.config.trace_weight
        warm = state.training and state.epoch < self.config.warmup_epochs
        # The warm-up maximises the trace (λ's sign flipped), but the loss the engine logs
        # and monitors (early stopping, best epoch) stays eq. (4): otherwise a warm-up
        # epoch, whose objective is lower by 2·λ·trace, looks like the best one and its
        # weights are what training returns when there is no validation split.
        loss, nll, tr = cm_loss(log_q, trace, raters, annotated, -lam if warm else lam,
                                trace_floor=0.0 if warm else self.config.trace_floor)
        metrics = {"nll": float(nll.detach()), "trace": float(tr.detach())}
        mu = self.config.dominance_weight
        if mu > 0:
            dom = self.dominance_penalty(self.matrices(outputs), annotated)
            loss = loss + mu * dom
            metrics["dominance"] = float(dom.detach())
        if warm:
            metrics["loss"] = metrics["nll"] + lam * metrics["trace"] + mu * metrics.get("dominance", 0.0)
        return loss, metrics

    @staticmethod
    def dominance_penalty(cm: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """``(1/P) Σ_pixels Σ_j max(0, 1/L − Ā[j, j])`` with ``Ā`` the mean of the raters' CMs
        ``cm`` ``(B, R, L, L, *s)`` at the pixel and ``P`` the pixels some rater annotated
        (``annotated`` ``(B, R, *s)``): zero while every diagonal entry of the mean CM is at
        least 1/L, the assumption of theorem 1's proof (appendix C)."""
        diag = torch.diagonal(cm.mean(1), dim1=1, dim2=2)  # (B, *s, L)
        hinge = torch.relu(1.0 / diag.shape[-1] - diag).sum(-1)  # (B, *s)
        where = annotated.any(1).to(hinge.dtype)
        return (hinge * where).sum() / where.sum().clamp_min(1)

    def interpret(self, outputs):
        p = torch.softmax(outputs["seg"], dim=1)  # (B, L, *s)
        cm = self.matrices(outputs)  # (B, R, L, L, *s)
        estimates = torch.einsum("brij...,bj...->bri...", cm, p)
        maps = torch.einsum("brjj...,bj...->br...", cm, p)
        # p(says i | true j) over the image: column j averaged with weights p_j.
        b, r, L = cm.shape[:3]
        flat_cm = cm.reshape(b, r, L, L, -1)
        flat_p = p.reshape(b, 1, 1, L, -1)
        weight = flat_p.sum(-1)  # (B, 1, 1, L)
        confusion = (flat_cm * flat_p).sum(-1) / weight.clamp_min(1e-12)
        return {"probabilities": p, "rater_estimates": estimates, "rater_maps": maps,
                "rater_confusion": confusion, "confusion_weight": weight}

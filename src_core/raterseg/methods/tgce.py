"""``tgce``: truncated generalised cross entropy with rater reliability maps.

B. Lotero Londoño, "Medical image segmentation in a multiple labelers context:
Application to the study of histopathology" (M.Eng. thesis, Universidad Nacional de
Colombia, 2025), ch. 2: a
U-Net segmentation head ``f(x)`` (L classes, softmax, eq. 2-3) and a reliability
branch giving each rater's map ``Λ_r(x) ∈ [0, 1]`` (eq. 2-5; a sigmoid, §2.2.3)
trained jointly with TGCE_SS (eq. 2-6, see :mod:`raterseg.nn.tgce_loss`): where Λ_r
is high the rater's label is fitted with the noise-robust GCE, where it is low the
rater pays the constant loss of a uniform guess instead. Both heads share one U-Net
trunk (the same as every other learned method here, so comparisons are fair).

Differences from the authors' code, on purpose: Λ comes through a sigmoid, as the
thesis says, not by clipping an unbounded output to [0, 1] (clipping has zero
gradient outside the interval, so a map that leaves it never comes back); the
first term is eq. 2-1's GCE (a sum over classes), not a mean over classes; raters
who did not annotate are left out of the average instead of counting as background.

Reading the outputs. The loss is linear in Λ with slope ``GCE(y_r, f) − (1 − L^{−q})/q``,
so Λ_r(x) learns to be 1 where the rater's label at x is expected to beat a uniform
guess under f and 0 where not: Λ_r is (a thresholded estimate of) the probability
that rater r is right at x, and the rest of the rater's mass goes to the other
classes. We model rater r at a pixel as "says the true class with probability Λ,
otherwise one of the other L − 1 classes evenly" (the even split is all Λ can tell;
for two classes it is exact). Hence

- ``rater_estimates[r, i] = Λ f_i + (1 − Λ)(1 − f_i)/(L − 1)`` (the rater's modelled
  label distribution: a blank rater on the foreground, Λ ≈ 0, is predicted to say
  background), and
- ``rater_confusion[r, i, j] = p(says i | true j)`` = the per-pixel matrices
  ``Λ·I + (1 − Λ)(1 − I)/(L − 1)`` averaged over the pixels with column j weighted by
  ``f_j`` (as for ``cm``).

Where training starts matters. The loss has a fixed point for every self-consistent
set of trusted raters: f follows the raters Λ trusts and Λ trusts the raters f
agrees with. Early in training f is blurred, close to the raters' mean label, so a
rater that over-segments looks right; if Λ adapts to that f at once, it locks in —
on MNIST with the CM paper's five raters, starting from Λ = ½ TGCE ends up trusting
the over-segmenting raters and returns their dilated mask (Dice 57 against the truth,
98 against the over rater; docs/BENCHMARKS.md). Starting from Λ ≈ 1
(``initial_reliability``, default 0.95) makes the first epochs plain GCE on every rater
(eq. 2-1, a sharpened mean label), and raters lose trust only where they disagree with
a network that has already sharpened (Dice 90). Even so, Λ only learns to distrust
raters who miss foreground; over-segmenting raters keep Λ ≈ 1 where they are wrong, and
long training drifts back towards them. The opposite failure, Λ → 0
everywhere, would need every rater worse than a uniform guess (see
:mod:`raterseg.nn.tgce_loss`); we have not seen it.

``reliability="none"`` is the ablation baseline: no reliability head, Λ ≡ 1, so the loss
is eq. 2-1's GCE on every annotating rater (averaged as eq. 2-7); ``rater_maps`` are all 1,
``rater_estimates`` equal f and every ``rater_confusion`` is the identity (the model
believes every rater). Comparing it with ``"pixel"`` shows what the reliability maps buy.

The alternative ``Λ·I + (1 − Λ)/L`` (the unreliable rater guessing uniformly, the
reading of the constant term) puts at least ``1/L`` on every diagonal entry, so it
cannot show a rater who is always wrong on a class (a blank rater's foreground
column would be (½, ½), not (1, 0)); we do not use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.backbones import MultiHeadUNet
from ..nn.tgce_loss import tgce_loss
from ..types import RaterSegError
from ._base import param
from ._learned import LearnedMethod
from ._registry import register_method


class TGCENetwork(nn.Module):
    """Shared U-Net with a segmentation head ``seg`` ``(B, L, *s)`` (logits) and a
    reliability head ``rel`` ``(B, R, *s)`` (logits of Λ): pixel-wise (1×1 convolution),
    per image (pooled features, linear layer, broadcast) or one learned value per rater
    (``global``, broadcast). The reliability bias starts at ``logit(initial)``.

    ``level="none"``: no reliability head and no reliability parameter; ``rel`` is a
    broadcast zero placeholder of shape ``(B, R, *s)`` that :class:`TruncatedGCE` ignores
    (it uses Λ ≡ 1)."""

    def __init__(self, spatial_dims: int, in_channels: int, features, num_classes: int,
                 num_raters: int, level: str, initial: float = 0.5) -> None:
        super().__init__()
        heads, pooled = {"seg": num_classes}, {}
        if level == "pixel":
            heads["rel"] = num_raters
        elif level == "image":
            pooled["rel"] = num_raters
        self.unet = MultiHeadUNet(spatial_dims, in_channels, features, heads, pooled)
        self.num_raters = num_raters
        self.level = level
        bias = math.log(initial / (1 - initial))  # logit of the starting Λ
        self.global_rel = None
        if level == "global":
            self.global_rel = nn.Parameter(torch.full((num_raters,), bias))
        elif level in ("pixel", "image"):
            head = self.unet.heads["rel"] if level == "pixel" else self.unet.pooled_heads["rel"]
            with torch.no_grad():
                head.bias.fill_(bias)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.unet(x)
        if self.global_rel is not None:
            g = self.global_rel.reshape(1, -1, *([1] * (x.ndim - 2)))
            out["rel"] = g.expand(x.shape[0], -1, *x.shape[2:])
        elif self.level == "none":
            seg = out["seg"]
            out["rel"] = seg.new_zeros((1, 1) + (1,) * (x.ndim - 2)).expand(
                x.shape[0], self.num_raters, *seg.shape[2:])
        return out


@register_method("tgce", learned=True)
class TruncatedGCE(LearnedMethod):
    """Segmentation network + per-rater reliability maps Λ_r trained with TGCE_SS.

    ``probabilities`` = f; ``rater_maps`` = Λ_r (the probability that rater r is right
    there); ``rater_estimates`` and ``rater_confusion`` follow from Λ and f as the
    module docstring explains.

    Reference: B. Lotero Londoño, "Medical image segmentation in a multiple labelers
    context: Application to the study of histopathology", M.Eng. thesis, Universidad
    Nacional de Colombia, 2025, ch. 2, eqs. 2-1 to 2-7 (TGCE_SS); Z. Zhang & M. Sabuncu, "Generalized cross entropy loss for
    training deep neural networks with noisy labels", NeurIPS 2018 (GCE).

    Examples:
        >>> res = rs.fuse(raters, image=image, method="tgce", q=0.7)
        >>> res.rater_maps[2].mean()        # how reliable rater 2 is on average
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        q: float = param(0.7, "GCE truncation q in (0, 1]: → 0 is cross entropy, 1 is MAE "
                              "(eq. 2-1)", low=0.0, high=1.0)
        reliability: str = param("pixel", "reliability Λ per pixel, per image or one per rater; "
                                          "'none': Λ ≡ 1, plain GCE on every rater (the ablation "
                                          "baseline)", choices=("pixel", "image", "global", "none"))
        initial_reliability: float = param(0.95, "Λ at the start of training (trust every rater; "
                                                 "see the class docstring)", low=0.5, high=0.999)

    def check_config(self) -> None:
        if not self.config.q > 0:
            raise RaterSegError(f"q: expected a value in (0, 1], got {self.config.q!r}")

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        return TGCENetwork(spatial_dims, in_channels, self.config.features, num_classes,
                           num_raters, self.config.reliability, self.config.initial_reliability)

    def _reliability(self, outputs) -> torch.Tensor:
        """Λ ``(B, R, *s)``: the sigmoid of the reliability head, or 1 with ``"none"``."""
        if self.config.reliability == "none":
            return torch.ones_like(outputs["rel"], dtype=outputs["seg"].dtype)
        return torch.sigmoid(outputs["rel"])

    def loss(self, outputs, raters, annotated, state):
        lam = self._reliability(outputs)
        loss, parts = tgce_loss(outputs["seg"], lam, raters, annotated, self.config.q)
        return loss, {k: float(v) for k, v in parts.items()}

    def interpret(self, outputs):
        f = torch.softmax(outputs["seg"], dim=1)  # (B, L, *s)
        lam = self._reliability(outputs)  # (B, R, *s)
        b, L = f.shape[:2]
        r = lam.shape[1]
        lam_ = lam.unsqueeze(2)  # (B, R, 1, *s)
        f_ = f.unsqueeze(1)  # (B, 1, L, *s)
        estimates = lam_ * f_ + (1 - lam_) * (1 - f_) / (L - 1)
        # p(says i | true j) over the image: per-pixel Λ·I + (1−Λ)(1−I)/(L−1), column j
        # weighted by f_j.
        flat_f = f.reshape(b, L, -1)  # (B, L, P)
        weight = flat_f.sum(-1)  # (B, L)
        lam_j = torch.einsum("brp,bjp->brj", lam.reshape(b, r, -1), flat_f) / weight.clamp_min(1e-12)[:, None]
        eye = torch.eye(L, device=f.device, dtype=f.dtype)
        confusion = lam_j[:, :, None, :] * eye + (1 - lam_j[:, :, None, :]) * (1 - eye) / (L - 1)
        return {"probabilities": f, "rater_maps": lam, "rater_estimates": estimates,
                "rater_confusion": confusion, "confusion_weight": weight[:, None, None, :]}

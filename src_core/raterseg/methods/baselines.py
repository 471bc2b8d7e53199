"""Learned baselines users compare against: ``unet`` on a fused target and ``softseg``.

Both use the same U-Net trunk, training loop and defaults as ``cm``, so that a
comparison measures the rater model and nothing else.

- ``unet`` (Lemay et al. 2022, "conventional" framework): softmax output and
  cross-entropy against a target fused from the raters — majority vote (``mv``), the
  soft mean label (``mean``), the STAPLE consensus (``staple``, computed once per case
  before training) or one rater drawn at random for each image at each step
  (``sample``; Jungo et al. 2018, "random sampling").
- ``softseg`` (Gros et al. 2021 as generalised by Lemay et al. 2022, §2.1.2): normalised
  ReLU output (ReLU divided by its sum over the classes) and the Adaptive Wing loss
  against the mean label, with no binarisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..nn.backbones import MultiHeadUNet
from ..nn.losses import adaptive_wing_loss, normalized_relu, soft_cross_entropy
from ..types import RaterStack
from ._base import param
from ._learned import LearnedMethod
from ._registry import register_method


def vote_fractions(raters: torch.Tensor, annotated: torch.Tensor, num_classes: int):
    """Share of annotating raters per class ``(B, L, *s)`` and the pixels anyone annotated
    ``(B, *s)`` float; uniform where nobody did."""
    onehot = torch.nn.functional.one_hot(raters, num_classes).movedim(-1, 2)  # (B, R, L, *s)
    counts = (onehot * annotated.unsqueeze(2)).sum(1).float()
    total = counts.sum(1, keepdim=True)
    frac = torch.where(total > 0, counts / total.clamp_min(1), torch.full_like(counts, 1 / num_classes))
    return frac, (total[:, 0] > 0).float()


def _seg_network(method, in_channels, num_classes, spatial_dims):
    return MultiHeadUNet(spatial_dims, in_channels, method.config.features, {"seg": num_classes})


@register_method("unet", learned=True)
class UNetBaseline(LearnedMethod):
    """A U-Net trained with cross-entropy on a target fused from the raters.

    ``target``: ``mv`` majority vote (ties → lowest label), ``mean`` soft labels,
    ``staple`` the STAPLE consensus of each case, ``sample`` one annotating rater drawn
    at random per image and step. ``rater_confusion`` of :func:`raterseg.fuse` compares
    each rater with the prediction; there are no rater maps.

    Examples:
        >>> rs.fuse(raters, image=image, method="unet", target="staple")
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        target: str = param("mv", "training target: majority vote, mean label, STAPLE, or a "
                                  "random rater per step", choices=("mv", "mean", "staple", "sample"))

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        return _seg_network(self, in_channels, num_classes, spatial_dims)

    def prepare_raters(self, stack: RaterStack) -> np.ndarray:
        if self.config.target != "staple":
            return stack.labels
        from .. import api

        # STAPLE per case, as one rater; its hard consensus is the target (Lemay et al.).
        truths = [api.fuse(stack.labels[n], method="staple", num_classes=stack.num_classes,
                           device="cpu").truth for n in range(stack.labels.shape[0])]
        return np.stack(truths)[:, None].astype(np.int16)

    def loss(self, outputs, raters, annotated, state):
        logits = outputs["seg"]
        L = logits.shape[1]
        target = self.config.target
        if target == "sample":
            # one annotating rater per image: random scores, non-annotating raters excluded
            b, r = raters.shape[:2]
            has = annotated.reshape(b, r, -1).any(-1)
            score = torch.rand(b, r, generator=state.generator).to(raters.device)
            pick = torch.where(has, score, torch.full_like(score, -1.0)).argmax(1)
            idx = pick.view(b, 1, *([1] * (raters.ndim - 2))).expand(b, 1, *raters.shape[2:])
            lab = raters.gather(1, idx)[:, 0]
            ann = annotated.gather(1, idx)[:, 0].float()
            onehot = torch.nn.functional.one_hot(lab, L).movedim(-1, 1).float()
            return soft_cross_entropy(logits, onehot, ann)
        frac, any_ann = vote_fractions(raters, annotated, L)
        if target == "mv":
            # .max(1).indices = .argmax(1) (first maximum: background on ties), but ~14x
            # faster on the CPU along a non-last axis
            frac = torch.nn.functional.one_hot(frac.max(1).indices, L).movedim(-1, 1).float()
        # mean: soft labels; staple: a single "rater" holding the consensus
        return soft_cross_entropy(logits, frac, any_ann)

    def interpret(self, outputs):
        return {"probabilities": torch.softmax(outputs["seg"], dim=1)}


@register_method("softseg", learned=True)
class SoftSeg(LearnedMethod):
    """SoftSeg: normalised-ReLU output trained with Adaptive Wing loss on the mean label.

    Reference: A. Lemay et al., "Label fusion and training methods for reliable
    representation of inter-rater uncertainty", MELBA 2022 (§2.1.2; loss parameters of
    table 5: ε = 1, α = 2.1, θ = 0.5, ω = 8); C. Gros et al., "SoftSeg", MedIA 2021.

    Examples:
        >>> rs.fuse(raters, image=image, method="softseg")
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        pass

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        return _seg_network(self, in_channels, num_classes, spatial_dims)

    def loss(self, outputs, raters, annotated, state):
        pred = normalized_relu(outputs["seg"], dim=1)
        frac, any_ann = vote_fractions(raters, annotated, pred.shape[1])
        return adaptive_wing_loss(pred, frac, any_ann)

    def interpret(self, outputs):
        return {"probabilities": normalized_relu(outputs["seg"], dim=1)}

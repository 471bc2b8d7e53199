"""Voting: ``majority_vote`` (hard) and ``mean`` (soft labels).

Both count, per voxel, the raters who gave each label, leaving out raters marked
-1 there. They run in torch on the chosen device (CPU or CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._device import resolve_device
from ..types import FusionResult, RaterStack
from ._base import FusionMethod, Progress, empirical_confusion, finish_result, param
from ._registry import register_method

#: Label given to voxels whose vote is tied (``tie="undecided"``) or that no rater annotated.
UNDECIDED = -1


def vote_fractions(stack: RaterStack, device=None):
    """Share of annotating raters per class, float32 torch ``(L, *S)`` on ``device``,
    and the number of annotating raters ``(*S)``; uniform 1/L where nobody annotated."""
    import torch

    dev = resolve_device(device)
    lab = torch.as_tensor(stack.labels, device=dev)
    L = stack.num_classes
    counts = torch.stack([(lab == c).sum(0, dtype=torch.int32) for c in range(L)])
    total = counts.sum(0)
    frac = counts.float() / total.clamp(min=1).float()
    frac = torch.where(total > 0, frac, torch.full_like(frac, 1.0 / L))
    return frac, counts, total


@register_method("majority_vote")
class MajorityVote(FusionMethod):
    """Majority vote over the raters who annotated each voxel.

    ``probabilities`` are the vote shares, so ``uncertainty`` shows where the vote
    was close. Ties are explicit: ``tie="lowest"`` takes the lowest tied label
    (background first); ``tie="undecided"`` marks the voxel -1, as are voxels that
    no rater annotated. (SimpleITK's ``LabelVotingImageFilter`` silently uses max+1.)

    Examples:
        >>> rs.fuse(raters, method="majority_vote", tie="undecided").truth
    """

    @dataclass(frozen=True)
    class Config:
        tie: str = param("lowest", "label for tied votes: lowest tied label, or -1 (undecided)",
                         choices=("lowest", "undecided"))

    def _fuse(self, stack: RaterStack, image, progress: Progress) -> FusionResult:
        frac, counts, total = vote_fractions(stack, self.device)
        top = counts.max(0).values
        truth = counts.argmax(0)  # first maximum = lowest tied label
        if self.config.tie == "undecided":
            n_top = (counts == top).sum(0)
            truth = truth.masked_fill((n_top > 1) | (total == 0), UNDECIDED)
        truth = truth.cpu().numpy().astype(np.int16)
        prob = frac.cpu().numpy()
        hard = np.zeros_like(prob)
        for c in range(stack.num_classes):
            hard[c] = truth == c
        return finish_result(prob, stack, self.name, self.params_dict, truth=truth,
                             rater_confusion=empirical_confusion(stack.labels, hard))


@register_method("mean")
class MeanVote(FusionMethod):
    """Soft labels: the share of annotating raters per class (missing raters excluded).

    ``truth`` is the most voted class (lowest label on ties); ``rater_confusion``
    compares each rater with the soft labels.
    """

    @dataclass(frozen=True)
    class Config:
        pass

    def _fuse(self, stack: RaterStack, image, progress: Progress) -> FusionResult:
        frac, _, _ = vote_fractions(stack, self.device)
        prob = frac.cpu().numpy()
        return finish_result(prob, stack, self.name, self.params_dict,
                             rater_confusion=empirical_confusion(stack.labels, prob))

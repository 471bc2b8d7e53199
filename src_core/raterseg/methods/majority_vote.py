"""Voting: ``majority_vote`` (hard) and ``mean`` (soft labels).

Both count, per voxel, the raters who gave each label, leaving out raters marked
-1 there. Every output is a function of the voxel's pattern of rater labels, so both
work on the histogram of patterns (:mod:`._patterns`, built in one pass on the chosen
device, CPU or CUDA) and gather the per-pattern results back to the voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._device import resolve_device
from ..types import FusionResult, RaterStack
from ._base import FusionMethod, Progress, param
from ._patterns import pattern_confusion, pattern_histogram, pattern_votes, result_from_patterns
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


def _pattern_fractions(stack: RaterStack, device):
    """Histogram of the case's rater patterns, their votes ``(L, P)`` and vote shares
    ``(L, P)`` float32 (uniform where nobody annotated), computed as :func:`vote_fractions`."""
    import torch

    dev = resolve_device(device)
    R, L = stack.num_raters, stack.num_classes
    hist = pattern_histogram(torch.as_tensor(stack.labels.reshape(R, -1), device=dev), L)
    counts = pattern_votes(hist, L)
    total = counts.sum(0)
    frac = counts.astype(np.float32) / np.maximum(total, 1).astype(np.float32)
    frac = np.where(total > 0, frac, np.float32(1.0 / L)).astype(np.float32)
    return hist, counts, total, frac


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
        hist, counts, total, frac = _pattern_fractions(stack, self.device)
        L = stack.num_classes
        truth = counts.argmax(0)  # first maximum = lowest tied label
        if self.config.tie == "undecided":
            n_top = (counts == counts.max(0)).sum(0)
            truth = np.where((n_top > 1) | (total == 0), UNDECIDED, truth)
        hard = (truth[None] == np.arange(L)[:, None]).astype(np.float32)
        return result_from_patterns(hist, frac, stack.spatial_shape, self.name, self.params_dict,
                                    truth_table=truth, rater_confusion=pattern_confusion(hist, hard))


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
        hist, _, _, frac = _pattern_fractions(stack, self.device)
        return result_from_patterns(hist, frac, stack.spatial_shape, self.name, self.params_dict,
                                    rater_confusion=pattern_confusion(hist, frac))

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
from ..types import RaterStack
from ._base import Progress, param
from ._patterns import PatternFit, PatternHistogram, PatternMethod, pattern_confusion, pattern_votes
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


def _pattern_fractions(hist: PatternHistogram, num_classes: int):
    """Votes ``(L, P)``, annotating raters ``(P,)`` and vote shares ``(L, P)`` float32 of
    each pattern (uniform where nobody annotated), as :func:`vote_fractions` computes."""
    counts = pattern_votes(hist, num_classes)
    total = counts.sum(0)
    frac = counts.astype(np.float32) / np.maximum(total, 1).astype(np.float32)
    frac = np.where(total > 0, frac, np.float32(1.0 / num_classes)).astype(np.float32)
    return counts, total, frac


@register_method("majority_vote")
class MajorityVote(PatternMethod):
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

    def fit_patterns(self, hist: PatternHistogram, num_classes: int, progress: Progress) -> PatternFit:
        counts, total, frac = _pattern_fractions(hist, num_classes)
        L = num_classes
        truth = counts.argmax(0)  # first maximum = lowest tied label
        if self.config.tie == "undecided":
            n_top = (counts == counts.max(0)).sum(0)
            truth = np.where((n_top > 1) | (total == 0), UNDECIDED, truth)
        hard = (truth[None] == np.arange(L)[:, None]).astype(np.float32)
        return PatternFit(frac, truth, {"rater_confusion": pattern_confusion(hist, hard)})


@register_method("mean")
class MeanVote(PatternMethod):
    """Soft labels: the share of annotating raters per class (missing raters excluded).

    ``truth`` is the most voted class (lowest label on ties); ``rater_confusion``
    compares each rater with the soft labels.
    """

    @dataclass(frozen=True)
    class Config:
        pass

    def fit_patterns(self, hist: PatternHistogram, num_classes: int, progress: Progress) -> PatternFit:
        _, _, frac = _pattern_fractions(hist, num_classes)
        return PatternFit(frac, None, {"rater_confusion": pattern_confusion(hist, frac)})

"""``mrprism``: Multi-rater Prism (Wu et al., "Multi-rater Prism: Learning self-calibrated
medical image segmentation from multiple raters", papers/mrprism_multi_rater_prism.txt).

ConP segments the image conditioned on rater-confidence maps; DivP splits ConP's mask
into one probability map per rater; the confidences come from DivP's maps
(proposition 1) and condition ConP in the next recurrence. The network and the fusion
algebra are in :mod:`raterseg.nn.mrprism_net`; this module holds the losses (§4.3).

Per recurrence t (T = ``recurrences``, default 3), with ``Pᵗ`` ConP's mask, ``p̂ᵗ``
DivP's rater maps, ``wᵗ⁺¹ = confidences(p̂ᵗ)`` and ``F`` the fusion of eq. (1):

- recurrence loss, eq. (8): ``1 − SSIM(Pᵗ, F(Y, wᵗ))`` for ConP: the raters' labels
  ``Y`` fused under the very confidences ConP is conditioned on, ``wᵗ = confidences(p̂ᵗ⁻¹)``
  from DivP's maps of the previous recurrence, and for t = 0 eq. (14)'s initial ones
  (which is eq. 15); plus the cross-entropy of DivP's self-fusion ``F(p̂ᵗ, wᵗ⁺¹)``
  against ConP's mask ``Pᵗ`` (a fixed target). §4.3.1 calls ConP's target "the
  self-fusion label (shown in Eqn. (1))", and eq. (1) fuses the *labels* by the
  confidences; the authors' code does the same. It is not DivP's self-fusion of its own
  maps ``F(p̂ᵗ⁻¹, wᵗ)``, as an earlier version here had it: that target carries no label,
  and DivP's own loss makes it equal to ``Pᵗ⁻¹``, so ConP learned ``Pᵗ = Pᵗ⁻¹`` whatever
  the confidences and the recurrence stayed flat (docs/BENCHMARKS.md, mrprism section).
  SSIM is MONAI's (Gaussian window 11, σ 1.5) on the class probabilities, as the paper
  intends; the authors' code minimises the SSIM
  *similarity* of logits instead, which is not repeated here;
- shuffle loss, eqs. (10)-(12), weight ``shuffle_weight`` (0.3), ``shuffles`` (3) random
  rater permutations π per recurrence: cross-entropy of ``F(p̂ᵗ[π], w)`` against
  ``T₀.₅(F(Y[π], w))`` — the same confidences w (detached: the identity holds "under
  any multi-rater confidences") fuse the shuffled predicted and the shuffled true
  labels; T₀.₅ is the 0.5 threshold (the arg-max class for more than 2 classes);
- total, eq. (13): the sum over the recurrences of recurrence + weight × shuffle loss,
  back-propagated once; confidences and DivP's input are detached between
  recurrences, so a recurrence's gradients do not reach the next.

Missing raters (label -1): no loss ever sees a -1 as a label. Pixels nobody annotated
carry no label loss. The shuffle loss (eq. 12) renormalises the confidences over the
raters who annotated. The self-fusions involve no labels and use every rater's DivP head
(the network models all R raters, as at prediction time). ConP's targets (eqs. 4, 15)
with ``impute_missing`` (default): where a rater did not annotate, DivP's map of that
rater (detached) stands in for its label, and the confidences weigh all R raters. This
goes beyond the paper, whose raters all annotate every image. Leaving the missing raters
out of the fusion instead (``impute_missing=False``) reduces the target, with one label
per image, to that one rater's label whatever the confidences: the recurrence cannot
re-weight anything, and 1 − SSIM against the blank or thinned raters' masks pulled ConP
to an empty mask on 2 of 3 MNIST seeds (docs/BENCHMARKS.md, accuracy section). With
every rater present the two are the same.

Initialisation, eq. (14): equal raw confidences ``clip(α + β, 0, 1)``, α ~ U(0.1, 0.9),
β ~ N(0, ``init_noise``) per rater and voxel while training; exactly 1/R at prediction.
Normalised over the raters, α cancels (it only sets the relative noise), and the per-voxel
β averages out over ConP's /16 attention tokens: recurrence 0 trains ConP on practically
equal confidences, so the confidences ConP learns to use come from the later recurrences.

Results: ``probabilities`` = the last ConP; ``rater_estimates`` = the last DivP's rater
maps; ``rater_maps`` = the confidences from them, ``Σ_c P_c w_{r,c}`` (in [0, 1], summing
to 1 over the raters; in :func:`raterseg.fuse` over the raters who annotated each voxel,
0 for the others); ``rater_confusion`` = DivP's rater model ``p̂_r(says i)`` averaged
over voxels with weights ``P_j``. ``history`` holds, per epoch, the training batches'
soft Dice (thresholds 0.1-0.9) of each recurrence's ConP against the raters' mean
label, ``dice_rec0`` … (foreground = any class but 0).

Architecture as built vs the paper (details in :mod:`raterseg.nn.mrprism_net`): the
encoder is the MONAI U-Net encoder shared by every learned method (the paper's CNN
encoder is unspecified) and ConP its decoder with an attention block before each of
the 4 up-sampling stages; the attention token grid is the /16 grid at every stage (the
paper's patch sizes 8, 7, 7, 7, 7 are tied to its 256² inputs); DivP has 4
self-attention blocks on patches of 4 (2D) or 8 (3D) voxels. Attention layers are
PyTorch's (MONAI 1.6.1's attention blocks need ``einops``, not a dependency here).
Choices the paper leaves open, made here: the fusion of several classes (foreground
classes fused, background the rest — the authors' binary fusion); residuals of ConP's
attention on the query (confidence) stream; the confidence embedding fed ``w − 1/R``
(equal confidences embed to 0) with He-initialised, bias-free-at-start separable
convolutions, so that the confidences reach ConP at a scale comparable to its features
(with PyTorch's default initialisation a one-hot vs an equal confidence map moved
ConP's foreground probability by < 0.003 at initialisation, and the embedding got
~1e-4 of the encoder's gradient norm, so it never learned to matter); ConP's output
initialised at p(background) ≈ 0.95 (1 − SSIM hardly trains a mask that starts at 0.5 everywhere);
DivP's heads initialised at random (identical heads stay identical).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..nn.mrprism_net import MrPrismNet, confidences, fuse
from ..types import FusionResult, RaterSegError, RaterStack, check_image
from ._base import param
from ._learned import LearnedMethod, _expand_classes
from ._registry import register_method

__all__ = ["MrPrism", "rater_confidence_maps"]

_EPS = 1e-6


def rater_confidence_maps(rater_estimates: np.ndarray, probabilities: np.ndarray,
                          annotated: np.ndarray | None = None) -> np.ndarray:
    """Per-rater confidence maps ``Σ_c P_c w_{r,c}`` from DivP's maps (numpy).

    Args:
        rater_estimates: ``(R, L, *S)`` DivP's per-rater probabilities ``p̂``.
        probabilities: ``(L, *S)`` ConP's mask ``P``.
        annotated: optional bool ``(R, *S)``: raters outside it get 0 and the others are
            renormalised among themselves.

    Returns:
        float32 ``(R, *S)``, summing to 1 over the (annotating) raters.
    """
    q = torch.from_numpy(np.ascontiguousarray(rater_estimates, dtype=np.float32))[None]
    p = torch.from_numpy(np.ascontiguousarray(probabilities, dtype=np.float32))[None]
    m = None if annotated is None else torch.from_numpy(np.ascontiguousarray(annotated))[None]
    w = confidences(q, m)
    return (w * p.unsqueeze(1)).sum(2)[0].numpy().astype(np.float32)


class _RecurrenceView:
    """``interpret`` adapter for :meth:`MrPrism.recurrence_probabilities`."""

    def __init__(self, num_classes: int, recurrences: int) -> None:
        self.L, self.T = num_classes, recurrences

    def interpret(self, outputs):
        z = outputs["conp"].unflatten(1, (self.T, self.L))
        return {"probabilities": torch.softmax(z, 2).flatten(1, 2)}


@register_method("mrprism", learned=True)
class MrPrism(LearnedMethod):
    """ConP/DivP recurrence: self-calibrated segmentation and per-rater confidences.

    Reference: J. Wu, H. Fang, et al., "Multi-rater Prism: Learning self-calibrated
    medical image segmentation from multiple raters" (sections 3-4, eqs. 1, 4-15,
    proposition 1; supplement table for the architecture).

    Examples:
        >>> res = rs.fuse(raters, image=image, method="mrprism", epochs=30)
        >>> res.rater_maps            # (R, *S) confidences, summing to 1 over raters
        >>> res.history[-1]["dice_rec2"]
    """

    @dataclass(frozen=True)
    class Config(LearnedMethod.Config):
        recurrences: int = param(3, "ConP/DivP recurrences (the first with equal confidences)",
                                 low=1)
        shuffle_weight: float = param(0.3, "weight of the shuffle loss (eq. 13)", low=0.0)
        shuffles: int = param(3, "random rater shuffles per recurrence in the shuffle loss",
                              low=1)
        init_noise: float = param(0.2, "σ of the perturbation of the initial confidences "
                                       "while training (eq. 14)", low=0.0)
        heads: int = param(4, "attention heads in ConP and DivP", low=1)
        divp_depth: int = param(4, "self-attention blocks in DivP", low=1)
        divp_width: int = param(64, "token width of DivP", low=1)
        impute_missing: bool = param(
            True, "in ConP's targets, a rater who did not annotate a voxel counts with DivP's "
                  "estimate of that rater (False: left out, so one label per image gives "
                  "ConP that rater's label as its only target)")

    def build_network(self, in_channels, num_classes, num_raters, spatial_dims):
        c = self.config
        return MrPrismNet(spatial_dims, in_channels, c.features, num_classes, num_raters,
                          recurrences=c.recurrences, heads=c.heads, divp_width=c.divp_width,
                          divp_depth=c.divp_depth, init_noise=c.init_noise)

    # -- losses -----------------------------------------------------------------------
    def _ssim(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``1 − SSIM`` (MONAI) over the class channels; window ≤ 11 and ≤ the image."""
        from monai.losses import SSIMLoss

        nd = pred.ndim - 2
        win = min(11, *pred.shape[2:])
        win -= 1 - win % 2
        return SSIMLoss(spatial_dims=nd, data_range=1.0, win_size=win)(pred, target)

    def loss(self, outputs, raters, annotated, state):
        T, R = self.config.recurrences, raters.shape[1]
        conp = outputs["conp"]
        L = conp.shape[1] // T
        conp = conp.unflatten(1, (T, L))
        divp = outputs["divp"].unflatten(1, (T, R, L))
        onehot = F.one_hot(raters, L).movedim(-1, 2).to(conp.dtype)  # (B, R, L, *s)
        ann = annotated.to(conp.dtype)
        any_ann = annotated.any(1)  # (B, *s)
        n_ann = any_ann.sum().clamp_min(1)
        b = raters.shape[0]
        c0 = outputs["init_conf"].unsqueeze(2).expand(b, R, L, *raters.shape[2:])
        impute = self.config.impute_missing  # with every rater present: the same targets
        q0 = torch.softmax(divp[:, 0], 2).detach() if impute else None
        target = self._conp_target(onehot, annotated, c0, q0)  # eq. (15)
        target = torch.where(any_ann.unsqueeze(1), target, torch.softmax(conp[:, 0], 1).detach())
        total = conp.new_zeros(())
        sums = {"ssim": 0.0, "divp_ce": 0.0, "shuffle": 0.0}
        probs = []
        for t in range(T):
            p = torch.softmax(conp[:, t], 1)
            probs.append(p.detach())
            l_con = self._ssim(p, target.detach())
            q = torch.softmax(divp[:, t], 2)  # (B, R, L, *s) each rater's map
            s_self = fuse(q, confidences(q))  # eq. (5)
            l_div = -(p.detach() * torch.log(s_self.clamp_min(_EPS))).sum(1).mean()
            # shuffle loss, eqs. (10)-(12)
            qd = q.detach()
            l_sf = conp.new_zeros(())
            for _ in range(self.config.shuffles):
                perm = torch.randperm(R, generator=state.generator).to(q.device)
                w = confidences(qd, ann[:, perm])
                pred = fuse(q[:, perm], w)
                # .max(1).indices = .argmax(1) (first maximum), but ~14x faster on the CPU
                hard = F.one_hot(fuse(onehot[:, perm], w).max(1).indices, L).movedim(-1, 1)
                ce = -(hard * torch.log(pred.clamp_min(_EPS))).sum(1)
                l_sf = l_sf + (ce * any_ann).sum() / n_ann
            l_sf = l_sf / self.config.shuffles
            total = total + l_con + l_div + self.config.shuffle_weight * l_sf
            for k, v in (("ssim", l_con), ("divp_ce", l_div), ("shuffle", l_sf)):
                sums[k] += float(v.detach())
            # next recurrence's ConP target: the raters' labels fused under the confidences
            # ConP will be conditioned on, wᵗ⁺¹ = confidences(p̂ᵗ) (eq. 1 / 4), as eq. (15)
            # is for t = 0. Not DivP's self-fusion F(p̂ᵗ, wᵗ⁺¹): DivP is trained to make that
            # equal to Pᵗ, so ConP would learn Pᵗ⁺¹ = Pᵗ and the recurrence could not help.
            if t + 1 < T:  # (the last recurrence has no successor to supervise)
                target = torch.where(any_ann.unsqueeze(1),
                                     self._conp_target(onehot, annotated, qd, qd if impute else None),
                                     torch.softmax(conp[:, t + 1], 1).detach())
        if state.training:
            sums.update(self._recurrence_dice(probs, onehot, ann, any_ann))
        return total, sums

    @staticmethod
    def _conp_target(onehot, annotated, raw, stand_in):
        """ConP's target: the raters' one-hot labels ``(B, R, L, *s)`` fused under the
        confidences of ``raw`` (eq. 1/4). ``stand_in`` None: raters who did not annotate a
        voxel are left out there. Else DivP's maps ``(B, R, L, *s)``: they stand in for
        those raters' labels, and every rater is weighted."""
        if stand_in is None:
            return fuse(onehot, confidences(raw, annotated.to(onehot.dtype)))
        return fuse(torch.where(annotated.unsqueeze(2), onehot, stand_in), confidences(raw))

    @staticmethod
    def _recurrence_dice(probs, onehot, ann, any_ann) -> dict[str, float]:
        """Soft Dice (thresholds 0.1-0.9) of each recurrence's foreground probability
        against the annotating raters' mean foreground label, on annotated voxels."""
        from ..metrics import soft_dice

        keep = any_ann.cpu().numpy()
        fg_votes = (onehot[:, :, 1:].sum(2) * ann).sum(1) / ann.sum(1).clamp_min(1)
        target = fg_votes.cpu().numpy()[keep]
        out = {}
        for t, p in enumerate(probs):
            fg = (1.0 - p[:, 0]).clamp(0, 1).cpu().numpy()[keep]
            # NaN outputs (a diverging run) score NaN; the engine then stops with its
            # "training diverged" message instead of soft_dice's complaint about them
            out[f"dice_rec{t}"] = soft_dice(fg, target) if np.isfinite(fg).all() else float("nan")
        return out

    # -- results ------------------------------------------------------------------------
    def interpret(self, outputs):
        T = self.config.recurrences
        conp = outputs["conp"]
        L = conp.shape[1] // T
        R = outputs["divp"].shape[1] // (T * L)
        p = torch.softmax(conp[:, (T - 1) * L:], 1)  # (B, L, *s)
        q = torch.softmax(outputs["divp"][:, (T - 1) * R * L:].unflatten(1, (R, L)), 2)
        w = confidences(q)
        maps = (w * p.unsqueeze(1)).sum(2)
        b = p.shape[0]
        flat_q = q.reshape(b, R, L, 1, -1)
        flat_p = p.reshape(b, 1, 1, L, -1)
        weight = flat_p.sum(-1)  # (B, 1, 1, L)
        confusion = (flat_q * flat_p).sum(-1) / weight.clamp_min(1e-12)  # [r, i, j]
        return {"probabilities": p, "rater_estimates": q, "rater_maps": maps,
                "rater_confusion": confusion, "confusion_weight": weight}

    def _iter_fuse(self, stack: RaterStack, image: Any) -> Generator[Any, None, FusionResult]:
        result = yield from super()._iter_fuse(stack, image)
        # one case with its raters known: confidences among the raters who annotated
        maps = rater_confidence_maps(result.rater_estimates, result.probabilities,
                                     stack.labels >= 0)
        return dataclasses.replace(result, rater_maps=maps)

    def recurrence_probabilities(self, images: Any) -> np.ndarray:
        """ConP's class probabilities after each recurrence (table 1's Rec0, Rec1, …).

        Args:
            images: float ``(N, C, *S)`` or ``(N, *S)`` like :meth:`predict`.

        Returns:
            float32 ``(N, T, L, *S)``.

        Raises:
            RaterSegError: not trained, wrong shape or channel count, NaN.
        """
        from .. import train
        from .._device import resolve_device

        self._check_fitted("recurrence_probabilities")
        arr = np.asarray(images)
        rank = self.data_ndim_
        if arr.ndim not in (rank + 1, rank + 2):
            raise RaterSegError(f"images: expected (N, C, *S) or (N, *S) with S {rank}D, got an "
                                f"array of shape {arr.shape}")
        imgs = check_image(arr, tuple(arr.shape[-rank:]), batched=True, argname="images")
        if imgs.shape[1] != self.in_channels_:
            raise RaterSegError(f"images: expected {self.in_channels_} channel(s) like the "
                                f"training data, got {imgs.shape[1]} (shape {arr.shape})")
        T, K = self.config.recurrences, self.network_classes
        out = train.predict_outputs(_RecurrenceView(K, T), self.network_, train.zscore(imgs),
                                    self.config.spatial_dims, resolve_device(self.device),
                                    self.config.batch_size)
        prob = out["probabilities"]
        prob = prob.reshape(prob.shape[0] * T, K, *prob.shape[2:])  # recurrences as cases
        prob = _expand_classes({"probabilities": prob}, getattr(self, "class_values_", None),
                               self.num_classes)["probabilities"]
        return prob.reshape(-1, T, *prob.shape[1:])

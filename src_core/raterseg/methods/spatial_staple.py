"""Spatial STAPLE (Asman & Landman 2012): rater performance that varies across the image.

A. J. Asman and B. A. Landman, "Formulating spatially varying performance in the
statistical fusion framework", IEEE TMI 31(6):1326-1336, 2012.

STAPLE (Warfield et al. 2004) gives each rater r one confusion matrix θ_r. Spatial
STAPLE gives it one per voxel i, θ_r,i, estimated in the window B(i) around i and
regularised towards the rater's whole-image matrix θ_r^0 (the paper's prior on the
local performance, weighted like a Dirichlet pseudo-count κ):

    E-step  W_si ∝ f(s) Π_{r annotating i} θ_r,i(D_ri, s)
    M-step  θ_r,i(s', s) = (Σ_{k∈B(i)} 1[D_rk = s'] W_sk + κ θ_r^0(s', s))
                           / (Σ_{k∈B(i)} 1[D_rk annotated] W_sk + κ)
            θ_r^0(s', s) = Σ_k 1[D_rk = s'] W_sk / Σ_k 1[D_rk annotated] W_sk

The paper estimates θ on a coarse grid of overlapping windows and interpolates; here
every voxel has its own window (a sliding box), computed for any window size in O(N)
with cumulative sums, in torch on the chosen device. With a window covering the whole
image, θ_r,i = θ_r^0 and the method is STAPLE. The iteration order follows SimpleITK's
STAPLE (see DESIGN.md): W₀ = share of raters per class, prior f = mean of W₀, M-step first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._device import resolve_device
from ..types import FusionResult, RaterStack, TrainingEvent
from ._base import FusionMethod, Progress, finish_result, param
from ._registry import register_method
from .majority_vote import vote_fractions

_TINY = 1e-12


def box_sum(x, window: int, spatial_dims: int):
    """Sum of ``x`` over a ``window``-wide box around every voxel (clipped at the borders).

    Args:
        x: torch tensor ``(..., *S)`` with ``spatial_dims`` trailing spatial axes.
        window: box side in voxels; covers offsets -(window-1)//2 .. window//2.

    Returns:
        Tensor of ``x``'s shape and dtype. Cost O(N) whatever the window (cumulative sums).
    """
    import torch

    lo, hi = (window - 1) // 2, window // 2
    for ax in range(x.ndim - spatial_dims, x.ndim):
        n = x.shape[ax]
        a, b = min(lo, n - 1), min(hi, n - 1)  # a window wider than the axis sees all of it
        c = torch.cumsum(x, dim=ax)
        # p[k] = c[clamp(k - a - 1, -1, n - 1)] with c[-1] = 0, so that the sum over
        # [i - a, i + b] is p[i + a + b + 1] - p[i]: two slices, one subtraction.
        parts = [torch.zeros_like(c.narrow(ax, 0, 1)).expand(
                     *[a + 1 if d == ax else -1 for d in range(c.ndim)]), c]
        if b:
            parts.append(c.narrow(ax, n - 1, 1).expand(*[b if d == ax else -1 for d in range(c.ndim)]))
        p = torch.cat(parts, dim=ax)
        x = p.narrow(ax, a + b + 1, n) - p.narrow(ax, 0, n)
    return x


@register_method("spatial_staple")
class SpatialStaple(FusionMethod):
    """Spatial STAPLE: STAPLE with each rater's confusion matrix estimated in local windows.

    Use it when a rater's quality changes across the image (careful in one region,
    careless in another). ``rater_maps`` is each rater's local probability of being
    right, Σ_s W_s θ_r,i(s, s); ``rater_confusion`` the whole-image matrices θ_r^0.
    Raters marked -1 are left out of the likelihood and of the counts. A rater who
    annotated nothing gets chance (1/L) in ``rater_maps`` and an identity confusion.

    ``prior_weight`` sets κ = prior_weight × (voxels in a window). Keep it near 1: inside
    a window that holds a single class, "this is class A, and every rater is locally
    right" and "this is class B, and every rater is locally wrong" explain the labels
    equally well, and with a weak pull towards θ_r^0 (e.g. 0.1 with ``prior="global"``)
    EM can drift into the second, losing whole objects. ``prior="local"`` (class shares
    of W₀ in the window) also blocks that drift, at the cost of trusting the vote more.

    Examples:
        >>> res = rs.fuse(raters, method="spatial_staple", window=15)
        >>> res.rater_maps.shape   # (R, *S): where each rater can be trusted
    """

    @dataclass(frozen=True)
    class Config:
        window: int = param(15, "side (voxels) of the window in which each rater's performance "
                            "is estimated; larger = closer to global STAPLE", low=1)
        prior_weight: float = param(1.0, "weight of the rater's whole-image confusion matrix, as "
                                    "a share of the voxels in a window (pseudo-count)", low=0.0)
        prior: str = param("global", "prior f(s): whole-image class shares, or shares in the "
                           "window around each voxel", choices=("global", "local"))
        max_iterations: int = param(100, "most EM iterations", low=1)
        tolerance: float = param(1e-4, "stop when no voxel's probability changes more than this",
                                 low=0.0)

    def _fuse(self, stack: RaterStack, image, progress: Progress) -> FusionResult:
        import torch

        dev = resolve_device(self.device)
        cfg = self.config
        L, R = stack.num_classes, stack.num_raters
        nd = len(stack.spatial_shape)
        window = int(cfg.window)
        kappa = float(cfg.prior_weight) * window ** nd
        # Window sums run in float32: half the memory traffic of float64, and a window
        # count's rounding error (~1e-7 relative) is far below what EM resolves.
        # Whole-image sums (θ_r^0) accumulate in float64.
        f32 = torch.float32
        lab = torch.as_tensor(stack.labels, device=dev).long()  # (R, *S)
        ann = lab >= 0
        frac, _, _ = vote_fractions(stack, dev)
        W = frac.to(f32)  # W₀: share of annotating raters per class
        if cfg.prior == "global":  # f(s), fixed: the mean of W₀ (as SimpleITK's STAPLE)
            log_prior = torch.log(W.reshape(L, -1).mean(1).clamp_min(_TINY))
            log_prior = log_prior.reshape((L,) + (1,) * nd)
        else:  # f(s, i): W₀ averaged over the window around i
            local_prior = box_sum(W, window, nd)
            local_prior = local_prior / local_prior.sum(0, keepdim=True).clamp_min(_TINY)
            log_prior = torch.log(local_prior.clamp_min(1e-6))
        classes = torch.arange(L, device=dev).reshape((L,) + (1,) * nd)
        history: list[dict] = []
        theta0 = torch.zeros((R, L, L), dtype=torch.float64, device=dev)
        # Window counts of each rater's labels, 1[D_r = s'], do not change during EM.
        said_box = [box_sum((lab[r].unsqueeze(0) == classes).to(f32), window, nd)
                    if bool(ann[r].any()) else None for r in range(R)]
        for it in range(1, int(cfg.max_iterations) + 1):
            loglik = log_prior.expand_as(W).clone()
            for r in range(R):
                if said_box[r] is None:  # a rater who annotated nothing
                    theta0[r] = torch.eye(L, dtype=torch.float64, device=dev)
                    continue
                theta0[r], local = self._rater_performance(lab[r], said_box[r], W, classes,
                                                           window, kappa, nd)
                loglik += torch.where(ann[r], torch.log(local.clamp_min(_TINY)), 0.0)
            W_new = torch.softmax(loglik, dim=0)
            change = float((W_new - W).abs().max())
            W = W_new
            history.append({"iteration": it, "change": change})
            if progress is not None:
                progress(TrainingEvent(it, int(cfg.max_iterations),
                                       f"spatial_staple: EM iteration {it}", {"change": change}))
            if change <= cfg.tolerance:
                break
        maps = self._rater_maps(lab, said_box, W, classes, window, kappa, nd)
        return finish_result(W.float().cpu().numpy(), stack, self.name, self.params_dict,
                             rater_confusion=theta0.float().cpu().numpy(), rater_maps=maps,
                             history=history)

    @staticmethod
    def _local_theta(lab_r, said_box, W, classes, window, kappa, nd):
        """Whole-image θ_r^0 ``(L, L)`` and windowed θ_r,i ``(L, L, *S)`` (``[s', s, i]``).

        ``said_box`` ``(L', *S)`` is the window count of 1[D_r = s'], fixed over EM. As
        Σ_s W_s = 1, the counts for the last true class are said_box minus the others,
        so each iteration box-filters L(L-1) maps instead of L². Voxels the rater left
        out (-1) match no class s', so they add to no count.
        """
        import torch

        L = W.shape[0]
        said = (lab_r.unsqueeze(0) == classes).to(W.dtype)  # (L', *S): 1[D_r = s']
        joint = said.unsqueeze(1) * W[: L - 1].unsqueeze(0)  # (L', L-1, *S)
        num = box_sum(joint, window, nd)
        num = torch.cat([num, (said_box - num.sum(1)).unsqueeze(1)], dim=1)  # (L', L, *S)
        flat = joint.reshape(L, L - 1, -1).sum(-1, dtype=torch.float64)
        total = said.reshape(L, -1).sum(-1, dtype=torch.float64)
        flat = torch.cat([flat, (total - flat.sum(1)).unsqueeze(1)], 1)
        col = flat.sum(0, keepdim=True)
        eye = torch.eye(L, dtype=torch.float64, device=W.device)
        theta0 = torch.where(col > 0, flat / col.clamp_min(_TINY), eye)
        num = num.clamp_min(0.0)  # the subtraction may leave -1e-13
        den = num.sum(0, keepdim=True)  # = window count of 1[annotated] W_s
        prior = theta0.to(W.dtype).reshape((L, L) + (1,) * nd)
        if kappa > 0:
            local = (num + kappa * prior) / (den + kappa)
        else:  # no regularisation: fall back to θ_r^0 only where the window holds no mass
            local = torch.where(den > 0, num / den.clamp_min(_TINY), prior)
        return theta0, local

    def _rater_performance(self, lab_r, said_box, W, classes, window, kappa, nd):
        """θ_r^0 and θ_r,i(D_ri, s) ``(L, *S)``, the factor of the E-step."""
        theta0, local = self._local_theta(lab_r, said_box, W, classes, window, kappa, nd)
        idx = lab_r.clamp_min(0).unsqueeze(0).unsqueeze(0).expand((1,) + tuple(local.shape[1:]))
        return theta0, local.gather(0, idx).squeeze(0)

    def _rater_maps(self, lab, said_box, W, classes, window, kappa, nd) -> np.ndarray:
        """Local probability each rater is right, Σ_s W_s θ_r,i(s, s): float32 ``(R, *S)``."""
        import torch

        L = W.shape[0]
        R = lab.shape[0]
        maps = np.empty((R,) + tuple(W.shape[1:]), np.float32)
        diag = torch.arange(L, device=W.device)
        for r in range(R):
            if said_box[r] is None:
                maps[r] = 1.0 / L
                continue
            _, local = self._local_theta(lab[r], said_box[r], W, classes, window, kappa, nd)
            right = (local[diag, diag] * W).sum(0)
            maps[r] = right.clamp(0, 1).float().cpu().numpy()
        return maps

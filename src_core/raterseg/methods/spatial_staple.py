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

EM converges linearly here (each update shrinks the change by only ~0.8 on the demo
phantom), so by default the updates are driven by SQUAREM (Varadhan & Roland 2008), which
extrapolates along pairs of EM updates towards the same fixed point: about 2× fewer
updates (docs/BENCHMARKS.md, "Spatial STAPLE: SQUAREM acceleration").
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
        Tensor of ``x``'s shape and dtype. Cost O(N) whatever the window: per axis, one
        cumulative sum and the difference of two shifted slices of it. A window that
        holds only zeros sums to exactly 0 (equal prefix sums cancel), which the κ = 0
        fallback of spatial STAPLE relies on.
    """
    lo, hi = (window - 1) // 2, window // 2
    for ax in range(x.ndim - spatial_dims, x.ndim):
        n = x.shape[ax]
        a, b = min(lo, n - 1), min(hi, n - 1)  # a window wider than the axis sees all of it
        x = _cumsum_box(x, ax, a, b)
    return x


#: Elements per slice from which an outer-axis cumulative sum on the CPU runs slice by
#: slice (contiguous adds); below it the Python loop costs more than torch's strided cumsum.
_SLICEWISE_MIN = 1 << 12


def _cumsum(x, ax: int):
    """``torch.cumsum(x, ax)``. On the CPU along an outer axis with large slices, as a
    running sum over whole slices: torch's CPU cumsum there is strided, 5-7x slower."""
    import torch

    n = x.shape[ax]
    if x.device.type != "cpu" or ax == x.ndim - 1 or n < 2 or x.numel() // n < _SLICEWISE_MIN:
        return torch.cumsum(x, dim=ax)
    c = x.clone(memory_format=torch.contiguous_format)
    prev = c.select(ax, 0)
    for i in range(1, n):
        cur = c.select(ax, i)
        cur += prev
        prev = cur
    return c


def _cumsum_box(x, ax: int, a: int, b: int):
    """Sum over ``[i - a, i + b]`` (clipped to the axis) along ``ax``, from one cumulative
    sum ``c``: ``c[min(i + b, n - 1)] - c[i - a - 1]`` with ``c[-1] = 0``."""
    import torch

    n = x.shape[ax]
    c = _cumsum(x, ax)
    out = torch.empty_like(c)

    def part(lo: int, hi: int):  # out[lo:hi] along ax (hi exclusive)
        return out.narrow(ax, lo, hi - lo)

    def cs(lo: int, hi: int):
        return c.narrow(ax, lo, hi - lo)

    # four ranges of i, by which ends of the window are clipped
    end = c.narrow(ax, n - 1, 1)
    mid_lo, mid_hi = a + 1, n - b  # both ends inside
    if mid_lo < mid_hi:
        torch.sub(cs(mid_lo + b, mid_hi + b), cs(mid_lo - a - 1, mid_hi - a - 1),
                  out=part(mid_lo, mid_hi))
    lo_hi = min(a + 1, n - b)  # i in [0, lo_hi): nothing to subtract, right end inside
    if lo_hi > 0:
        part(0, lo_hi).copy_(cs(b, lo_hi + b))
    hi_lo = max(a + 1, n - b)  # i in [hi_lo, n): right end clipped, left end inside
    if hi_lo < n:
        torch.sub(end, cs(hi_lo - a - 1, n - a - 1), out=part(hi_lo, n))
    if n - b < a + 1:  # i in [n - b, a + 1): both ends clipped: the whole axis
        part(n - b, a + 1).copy_(end.expand_as(part(n - b, a + 1)))
    return out


@register_method("spatial_staple")
class SpatialStaple(FusionMethod):
    """Spatial STAPLE: STAPLE with each rater's confusion matrix estimated in local windows.

    Use it when a rater's quality changes across the image (careful in one region,
    careless in another). ``rater_maps`` is each rater's local probability of being
    right, Σ_s W_s θ_r,i(s, s) (θ_r,i from the final W); ``rater_confusion`` the
    whole-image matrices θ_r^0 of the last M-step (one E-step before the final W; the
    difference is below the tolerance at convergence). Raters marked -1 are left out of
    the likelihood and of the counts. A rater who annotated nothing gets chance (1/L) in
    ``rater_maps`` and a NaN confusion matrix; a class absent from W a NaN column.

    ``prior_weight`` sets κ = prior_weight × (voxels in a window). Keep it near 1: inside
    a window that holds a single class, "this is class A, and every rater is locally
    right" and "this is class B, and every rater is locally wrong" explain the labels
    equally well, and with a weak pull towards θ_r^0 (e.g. 0.1 with ``prior="global"``)
    EM can drift into the second, losing whole objects. ``prior="local"`` (class shares
    of W₀ in the window) also blocks that drift, at the cost of trusting the vote more.
    ``prior_weight=0`` (no pull at all) is also numerically fragile: a window count of
    exactly 0 gives a factor of 0, but float32 rounding can leave 1e-7 instead, which
    moves the log-likelihood a lot.

    ``acceleration="squarem"`` (default) reaches EM's fixed point in about half the EM
    updates; ``"none"`` runs plain EM. The stopping rule is the same (an update that moves
    no voxel by more than ``tolerance``), and ``max_iterations`` counts EM updates.

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
        acceleration: str = param("squarem", "squarem: extrapolated EM cycles (same fixed point, "
                                  "about 2x fewer EM updates); none: plain EM",
                                  choices=("squarem", "none"))

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
        lab = torch.as_tensor(stack.labels, device=dev)  # (R, *S) int16/int32
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
        theta0 = torch.eye(L, dtype=torch.float64, device=dev).repeat(R, 1, 1)
        empty = torch.zeros((R, 1, L), dtype=torch.bool, device=dev)  # columns with no mass
        # What EM needs of each rater that does not change (None: annotated nothing,
        # which leaves the identity in theta0 and no factor in the likelihood).
        fixed = [_RaterLabels.of(lab[r], classes, window, nd) for r in range(R)]
        any_full = any(f is not None and f.full for f in fixed)

        def em_update(W):
            """One M-step (θ_r,i and θ_r^0 from W) and E-step: the next W."""
            shared = _SharedSums.of(W, window, nd, any_full=any_full)
            loglik = log_prior.expand_as(W).clone()
            for r, f in enumerate(fixed):
                if f is None:
                    continue
                num, flat = _window_counts(f, W, shared, window, nd)
                theta0[r] = _whole_image_theta(flat)
                empty[r] = flat.sum(0, keepdim=True) <= 0
                log_factor = torch.log(_observed_factor(f, num, theta0[r], kappa).clamp_min(_TINY))
                loglik += log_factor if f.full else torch.where(f.annotated, log_factor, 0.0)
            return torch.softmax(loglik, dim=0)

        history: list[dict] = []
        max_it = int(cfg.max_iterations)

        def step(W):
            """One EM update, logged: the new W, its change and whether to stop."""
            W_new = em_update(W)
            change = float((W_new - W).abs().max())
            it = len(history) + 1
            history.append({"iteration": it, "change": change})
            if progress is not None:
                progress(TrainingEvent(it, max_it, f"spatial_staple: EM iteration {it}",
                                       {"change": change}))
            return W_new, change, change <= cfg.tolerance or it >= max_it

        if cfg.acceleration == "squarem":
            W = _squarem(step, W)
        else:
            W = _plain_em(step, W)
        maps = _rater_maps(fixed, W, window, kappa, nd, any_full=any_full)
        return finish_result(W.float().cpu().numpy(), stack, self.name, self.params_dict,
                             rater_confusion=theta0.masked_fill(empty, float("nan")).float().cpu().numpy(),
                             rater_maps=maps,
                             history=history)


#: SQUAREM's bounds on the step length |α|: the first cap, and the factor by which the cap
#: grows each time a step reaches it (Varadhan & Roland 2008, their defaults).
_SQUAREM_STEP_MAX0 = 1.0
_SQUAREM_STEP_GROWTH = 4.0
#: SQUAREM cycles without a new smallest change after which plain EM takes over.
_SQUAREM_PATIENCE = 3


def _plain_em(step, W):
    """EM updates from ``W`` until ``step`` says to stop; the last W."""
    done = False
    while not done:
        W, _, done = step(W)
    return W


def _squarem(step, W):
    """Run EM from ``W`` with SQUAREM (Varadhan & Roland, Scand. J. Stat. 35:335, 2008).

    ``step(W) -> (W_new, change, done)`` is one logged EM update. Each cycle takes two EM
    updates W → W1 → W2, jumps along the squared extrapolation
    ``W' = W − 2α·r + α²·v`` (r = W1 − W, v = W2 − 2·W1 + W, α = −‖r‖/‖v‖, scheme S3),
    moved back onto the simplex (clipped at 0, renormalised over classes), then applies one
    EM update to W' as its stabilising step. α = −1 gives W2, plain EM. The fixed points are
    EM's, and the stopping rule is unchanged (an EM update that moves no voxel by more than
    the tolerance); EM's linear convergence (~0.8 per iteration on the demo phantom) needs
    about 2× more updates to get there. When :data:`_SQUAREM_PATIENCE` cycles in a row bring
    no update smaller than the smallest before them, the jumps are not helping (e.g. a
    tolerance near float32 rounding, where they only stir the rounding noise) and plain EM
    takes over.
    """
    step_max = _SQUAREM_STEP_MAX0
    best, stalled = float("inf"), 0
    while True:
        W1, change1, done = step(W)
        if done:
            return W1
        W2, change2, done = step(W1)
        if done:
            return W2
        r = W1 - W
        v = W2 - W1 - r
        alpha = -float(r.norm() / v.norm().clamp_min(1e-30))
        alpha = max(min(alpha, -1.0), -step_max)
        if alpha == -step_max:
            step_max *= _SQUAREM_STEP_GROWTH
        W_jump = W.add(r, alpha=-2.0 * alpha).add_(v, alpha=alpha * alpha).clamp_min_(0.0)
        W_jump /= W_jump.sum(0, keepdim=True).clamp_min(_TINY)
        del W1, W2, r, v
        W, change3, done = step(W_jump)
        if done:
            return W
        cycle_best = min(change1, change2, change3)
        stalled = 0 if cycle_best < best else stalled + 1
        best = min(best, cycle_best)
        if stalled >= _SQUAREM_PATIENCE:
            return _plain_em(step, W)


@dataclass
class _RaterLabels:
    """One rater's labels as EM uses them; fixed over the iterations.

    Attributes:
        said: float32 ``(L', *S)`` 1[D_r = s'] (0 everywhere the rater left out).
        said_box: float32 ``(L', *S)`` window counts of ``said``.
        said_total: float64 ``(L',)`` whole-image counts of ``said``.
        annotated: bool ``(*S)``.
        full: whether the rater annotated every voxel.
    """

    said: object
    said_box: object
    said_total: object
    annotated: object
    full: bool

    @classmethod
    def of(cls, lab_r, classes, window: int, nd: int):
        """From the rater's labels ``(*S)``; None if it annotated nothing."""
        import torch

        annotated = lab_r >= 0
        if not bool(annotated.any()):
            return None
        said = (lab_r.unsqueeze(0) == classes).to(torch.float32)
        return cls(said=said, said_box=box_sum(said, window, nd),
                   said_total=said.reshape(said.shape[0], -1).sum(-1, dtype=torch.float64),
                   annotated=annotated, full=bool(annotated.all()))


@dataclass
class _SharedSums:
    """Sums of W (one EM iteration) shared by raters who annotated every voxel: for
    them Σ_s' 1[D_r = s'] W_s = W_s, so their last row of counts needs no box filter.

    Attributes:
        box: float32 ``(L-1, *S)`` window sums of W_s for s < L-1.
        total: float64 ``(L,)`` whole-image sums of W_s.

    Both None when no rater annotated every voxel (nothing would use them).
    """

    box: object
    total: object

    @classmethod
    def of(cls, W, window: int, nd: int, *, any_full: bool):
        import torch

        L = W.shape[0]
        if not any_full:
            return cls(box=None, total=None)
        return cls(box=box_sum(W[: L - 1], window, nd),
                   total=W.reshape(L, -1).sum(-1, dtype=torch.float64))


def _window_counts(f: _RaterLabels, W, shared: _SharedSums, window: int, nd: int):
    """Counts of the M-step for one rater: ``num[s', s] = Σ_{k∈B(i)} 1[D_rk = s'] W_sk``,
    float32 ``(L', L, *S)``, and the same over the whole image, float64 ``(L', L)``.

    Only rows s' < L'-1 (all rows if the rater left voxels out) and columns s < L-1 are
    box-filtered: the last column is ``said_box`` minus the others (Σ_s W_s = 1), and a
    rater who annotated every voxel has as last row the window sums of W minus the others.
    """
    import torch

    L = W.shape[0]
    rows = L - 1 if f.full else L
    joint = f.said[:rows].unsqueeze(1) * W[: L - 1].unsqueeze(0)  # (rows, L-1, *S)
    num = box_sum(joint, window, nd)
    flat = joint.reshape(rows, L - 1, -1).sum(-1, dtype=torch.float64)
    if f.full:
        num = torch.cat([num, (shared.box - num.sum(0)).unsqueeze(0)], 0)
        flat = torch.cat([flat, (shared.total[: L - 1] - flat.sum(0)).unsqueeze(0)], 0)
    num = torch.cat([num, (f.said_box - num.sum(1)).unsqueeze(1)], 1)
    flat = torch.cat([flat, (f.said_total - flat.sum(1)).unsqueeze(1)], 1)
    return num.clamp_min_(0.0), flat  # float32 subtractions may leave -1e-7


def _whole_image_theta(flat):
    """θ_r^0 ``(L', L)`` float64 from whole-image counts; an empty column is the identity's."""
    import torch

    col = flat.sum(0, keepdim=True)
    eye = torch.eye(flat.shape[0], dtype=flat.dtype, device=flat.device)
    return torch.where(col > 0, flat / col.clamp_min(_TINY), eye)


def _local(num_sel, den, prior_sel, kappa: float):
    """θ_r,i from window counts, regularised towards θ_r^0 with pseudo-count κ (κ = 0:
    θ_r^0 only where the window holds no mass)."""
    import torch

    if kappa > 0:
        return (num_sel + kappa * prior_sel) / (den + kappa)
    return torch.where(den > 0, num_sel / den.clamp_min(_TINY), prior_sel)


def _observed_factor(f: _RaterLabels, num, theta0, kappa: float):
    """θ_r,i(D_ri, s), float32 ``(L, *S)``: the rater's factor in the E-step."""
    L, nd = num.shape[1], num.ndim - 2
    prior = theta0.to(num.dtype).reshape((L, L) + (1,) * nd)
    # row D_ri of num and of θ_r^0 as Σ_s' 1[D_ri = s'] · row s' (faster on the CPU than a
    # gather along the first axis; where the rater left the voxel out, any value will do)
    num_sel = f.said[0] * num[0]
    prior_sel = f.said[0] * prior[0]
    for c in range(1, L):
        num_sel.addcmul_(f.said[c], num[c])
        prior_sel.addcmul_(f.said[c], prior[c])
    return _local(num_sel, num.sum(0), prior_sel, kappa)


def _rater_maps(fixed, W, window: int, kappa: float, nd: int, *, any_full: bool) -> np.ndarray:
    """Local probability each rater is right, Σ_s W_s θ_r,i(s, s): float32 ``(R, *S)``."""
    import torch

    L = W.shape[0]
    maps = np.empty((len(fixed),) + tuple(W.shape[1:]), np.float32)
    shared = _SharedSums.of(W, window, nd, any_full=any_full)
    diag = torch.arange(L, device=W.device)
    for r, f in enumerate(fixed):
        if f is None:
            maps[r] = 1.0 / L
            continue
        num, flat = _window_counts(f, W, shared, window, nd)
        theta0 = _whole_image_theta(flat).to(W.dtype)
        local = _local(num[diag, diag], num.sum(0), theta0[diag, diag].reshape((L,) + (1,) * nd),
                       kappa)
        maps[r] = (local * W).sum(0).clamp(0, 1).float().cpu().numpy()
    return maps

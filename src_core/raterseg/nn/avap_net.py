"""AVAP's network and losses (Guo et al., "Modeling Annotator Variation and Annotator
Preference for Multiple Annotations Medical Image Segmentation", section III).

Shapes: ``B`` batch, ``R`` raters, ``L`` classes (``L - 1`` foreground structures),
``W`` backbone width, ``s`` spatial (2D or 3D).

- Backbone ``F_img = F_B(x)`` (eq. 1): the project's MONAI ``BasicUNet`` trunk
  (``backbone="unet"``) or MONAI ``FlexibleUNet`` with a ResNet-34 encoder
  (``backbone="resnet34"``, the paper's choice, built with ``pretrained=False``).
- AVM (eq. 2-3): one branch per foreground class, each two blocks of two
  3×3 conv → ReLU → BN and a 1×1 conv to ``R + 1`` vote-count classes.
- APM (eq. 4-6): a controller φ (one linear layer, i.e. a 1×1 conv on a 1×1 map)
  maps ``GAP(F_img) ‖ V_m`` to the kernels and biases of three dynamic convolutions
  (3×3, 3×3, 1×1); ``P_m = BN(ReLU(BN(ReLU(F * ω1)) * ω2)) * ω3``. All R raters are
  evaluated in one pass with grouped convolutions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import MIN_SIZE, check_features, unet_trunk

__all__ = [
    "BACKBONES",
    "AVAPNetwork",
    "dice_ce_loss",
    "expected_fraction",
    "vote_count_target",
]

BACKBONES = ("unet", "resnet34")


def _pad_to(x: torch.Tensor, multiple: int, minimum: int) -> tuple[torch.Tensor, list[int], tuple]:
    """Pad ``x`` (replicate) so every spatial size is a multiple of ``multiple`` and at least
    ``minimum``; returns the padded tensor, the low-side pads and the original size."""
    spatial = tuple(x.shape[2:])
    target = [max(minimum, math.ceil(s / multiple) * multiple) for s in spatial]
    short = [t - s for t, s in zip(target, spatial)]
    if not any(short):
        return x, [0] * len(spatial), spatial
    pad = []
    for n in reversed(short):
        pad += [n // 2, n - n // 2]
    mode = "replicate" if all(s > 1 for s in spatial) else "constant"
    return F.pad(x, pad, mode=mode), [n // 2 for n in short], spatial


def _crop(x: torch.Tensor, low: list[int], spatial: tuple) -> torch.Tensor:
    if not any(low) and tuple(x.shape[2:]) == spatial:
        return x
    return x[(slice(None), slice(None)) + tuple(slice(a, a + s) for a, s in zip(low, spatial))]


class Backbone(nn.Module):
    """``F_img = F_B(x)`` (eq. 1): ``(B, C, *s)`` → ``(B, W, *s)`` at the input resolution.

    ``unet``: the BasicUNet trunk every learned method here shares (instance norm,
    ``W = features[5]``). ``resnet34``: MONAI ``FlexibleUNet`` (ResNet-34 encoder, five
    decoder blocks of widths ``reversed(features[:5])``, batch norm, no downloaded
    weights) without its segmentation head, ``W = features[0]``. Inputs are padded
    (replicate) to what the encoder needs and the features cropped back.
    """

    def __init__(self, kind: str, spatial_dims: int, in_channels: int, features: Sequence[int]) -> None:
        super().__init__()
        f = check_features(features)
        self.kind = kind
        if kind == "unet":
            self.net, self.width = unet_trunk(spatial_dims, in_channels, f)
            self.multiple, self.minimum = 1, MIN_SIZE
        elif kind == "resnet34":
            from monai.networks.nets import FlexibleUNet

            decoder = tuple(reversed(f[:5]))
            self.net = FlexibleUNet(in_channels=in_channels, out_channels=1, backbone="resnet34",
                                    pretrained=False, decoder_channels=decoder,
                                    spatial_dims=spatial_dims)
            self.net.segmentation_head = nn.Identity()
            self.width = decoder[-1]
            # five stride-2 stages; >= 64 leaves 2 voxels per axis for batch norm at batch 1
            self.multiple, self.minimum = 32, 64
        else:  # guarded by the method's Config choices
            raise ValueError(f"unknown backbone {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp, low, spatial = _pad_to(x, self.multiple, self.minimum)
        return _crop(self.net(xp), low, spatial)


class AVMBranch(nn.Sequential):
    """One AVM branch (fig. 2b): two blocks of (3×3 conv → ReLU → BN) ×2, then a 1×1 conv
    to ``R + 1`` vote-count classes (eq. 3)."""

    def __init__(self, spatial_dims: int, width: int, num_raters: int) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [conv(width, width, 3, padding=1), nn.ReLU(inplace=True), bn(width)]
        layers.append(conv(width, num_raters + 1, 1))
        super().__init__(*layers)


class APM(nn.Module):
    """Annotator preference modelling (eq. 4-6) for all R raters at once.

    The controller φ is one linear layer on ``GAP(F) ‖ V_m`` (eq. 5; V_m the one-hot
    rater code of eq. 4) giving, per image and rater, the weights and biases of
    ``ω1`` (W → c, 3×3), ``ω2`` (c → c, 3×3) and ``ω3`` (c → L, 1×1).

    ``forward(feat (B, W, *s))`` → logits ``(B, R·L, *s)`` (rater-major).
    """

    def __init__(self, spatial_dims: int, width: int, channels: int, num_classes: int,
                 num_raters: int) -> None:
        super().__init__()
        self.nd, self.W, self.c, self.L, self.R = spatial_dims, width, channels, num_classes, num_raters
        k = 3 ** spatial_dims
        self.shapes = [(channels, width, k), (channels, channels, k), (num_classes, channels, 1)]
        self.num_params = sum(o * i * kk + o for o, i, kk in self.shapes)
        self.controller = nn.Linear(width + num_raters, self.num_params)
        bn = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
        self.bn1, self.bn2 = bn(channels), bn(channels)

    def kernels(self, feat: torch.Tensor) -> torch.Tensor:
        """Controller output ``(B, R, num_params)``: φ(GAP(F) ‖ V_m) for m = 1..R."""
        b = feat.shape[0]
        gap = feat.flatten(2).mean(-1)  # (B, W)
        code = torch.eye(self.R, device=feat.device, dtype=feat.dtype)  # V_m, eq. 4
        inp = torch.cat([gap.unsqueeze(1).expand(b, self.R, self.W),
                         code.unsqueeze(0).expand(b, self.R, self.R)], dim=2)
        return self.controller(inp)

    def _split(self, params: torch.Tensor):
        """(B, R, P) → per layer (weight (B·R·out, in, k...), bias (B·R·out,))."""
        b, r = params.shape[:2]
        out, pos = [], 0
        for o, i, kk in self.shapes:
            w = params[:, :, pos:pos + o * i * kk]
            pos += o * i * kk
            bias = params[:, :, pos:pos + o]
            pos += o
            ks = (3,) * self.nd if kk > 1 else (1,) * self.nd
            out.append((w.reshape(b * r * o, i, *ks), bias.reshape(b * r * o)))
        return out

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.nd == 2 else F.conv3d
        b, spatial = feat.shape[0], feat.shape[2:]
        (w1, b1), (w2, b2), (w3, b3) = self._split(self.kernels(feat))
        # layer 1: every image's features against its R kernels (groups = B)
        h = conv(feat.reshape(1, b * self.W, *spatial), w1, b1, padding=1, groups=b)
        h = self.bn1(F.relu(h).reshape(b * self.R, self.c, *spatial))
        h = conv(h.reshape(1, b * self.R * self.c, *spatial), w2, b2, padding=1, groups=b * self.R)
        h = self.bn2(F.relu(h).reshape(b * self.R, self.c, *spatial))
        h = conv(h.reshape(1, b * self.R * self.c, *spatial), w3, b3, groups=b * self.R)
        return h.reshape(b, self.R * self.L, *spatial)


class AVAPNetwork(nn.Module):
    """Backbone + AVM (one branch per foreground class) + APM.

    ``forward(x (B, C, *s))`` → dict with ``avm`` logits ``(B, (L-1)·(R+1), *s)`` (branch-major)
    and ``apm`` logits ``(B, R·L, *s)``. Which of them are computed and which parts train
    depends on the stage (:meth:`set_stage`): stage 1 trains backbone + AVM and computes
    only ``avm``; stage 2 freezes backbone + AVM (no gradients; their batch-norm
    statistics are kept, as those modules stay in eval mode) and computes only ``apm``;
    stage 0 (after training, and after loading) computes both.
    """

    def __init__(self, backbone: str, spatial_dims: int, in_channels: int, features: Sequence[int],
                 num_classes: int, num_raters: int, apm_channels: int) -> None:
        super().__init__()
        self.num_classes, self.num_raters = num_classes, num_raters
        self.backbone = Backbone(backbone, spatial_dims, in_channels, features)
        width = self.backbone.width
        self.avm = nn.ModuleList([AVMBranch(spatial_dims, width, num_raters)
                                  for _ in range(num_classes - 1)])
        self.apm = APM(spatial_dims, width, apm_channels, num_classes, num_raters)
        self.stage = 0

    def set_stage(self, stage: int) -> None:
        """0: inference (everything computed, nothing frozen); 1: backbone + AVM train;
        2: APM trains with backbone + AVM frozen."""
        self.stage = stage
        for p in list(self.backbone.parameters()) + list(self.avm.parameters()):
            p.requires_grad_(stage != 2)
        for p in self.apm.parameters():
            p.requires_grad_(stage != 1)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.stage == 2:
            self.backbone.eval()
            self.avm.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        frozen = torch.no_grad() if self.stage == 2 else contextlib.nullcontext()
        with frozen:
            feat = self.backbone(x)
        out = {}
        if self.stage != 2:
            with frozen:
                out["avm"] = torch.cat([branch(feat) for branch in self.avm], dim=1)
        if self.stage != 1:
            out["apm"] = self.apm(feat)
        return out


# -- targets, outputs and losses -------------------------------------------------------

def vote_count_target(raters: torch.Tensor, annotated: torch.Tensor, cls: int,
                      num_raters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AVM target of one structure: a distribution over the vote count ``K ∈ {0..R}``.

    With all R raters present this is eq. (2), the one-hot of ``K = Σ_m y^m``. Where only
    ``n < R`` raters annotated and ``v`` of them marked the structure, the ``R - n``
    missing votes are imputed as independent votes with the observed fraction ``v / n``:
    ``K = v + Binomial(R - n, v / n)``. Its mean is ``R·v/n``, so the AVM's expected vote
    fraction ``E[K]/R`` still targets the fraction among the raters who annotated, the
    observed votes stay hard facts (``v ≤ K ≤ v + R - n``), and nothing is rounded.

    Args:
        raters: long ``(B, R, *s)``; annotated: bool ``(B, R, *s)``.
        cls: the structure (class index ≥ 1); num_raters: R.

    Returns:
        ``(target (B, R+1, *s) float, weight (B, *s) float)``; weight is 0 where no rater
        annotated (the target there is one-hot at 0 and must be ignored).
    """
    ann = annotated.to(torch.float32)
    votes = ((raters == cls).to(torch.float32) * ann).sum(1)  # v (B, *s)
    n = ann.sum(1)
    missing = num_raters - n
    p = torch.where(n > 0, votes / n.clamp_min(1), torch.zeros_like(votes))
    k = torch.arange(num_raters + 1, device=raters.device, dtype=torch.float32)
    k = k.view(1, -1, *([1] * (raters.ndim - 2)))
    j = k - votes.unsqueeze(1)  # imputed votes needed to reach K = k
    m, pp = missing.unsqueeze(1), p.unsqueeze(1)
    valid = (j >= 0) & (j <= m)
    jj = j.clamp(min=0)
    jj = torch.minimum(jj, m)
    log_pmf = (torch.lgamma(m + 1) - torch.lgamma(jj + 1) - torch.lgamma(m - jj + 1)
               + torch.xlogy(jj, pp) + torch.xlogy(m - jj, 1 - pp))
    target = torch.where(valid, log_pmf.exp(), torch.zeros_like(log_pmf))
    none = (n == 0).unsqueeze(1)
    target = torch.where(none, (k == 0).to(target.dtype).expand_as(target), target)
    return target, (n > 0).to(torch.float32)


def expected_fraction(avm_logits: torch.Tensor, num_classes: int, num_raters: int) -> torch.Tensor:
    """Class probabilities ``(B, L, *s)`` from AVM logits ``(B, (L-1)·(R+1), *s)``.

    Foreground class c gets ``E[K_c]/R = Σ_k k·softmax(P_c)_k / R`` (the paper's "output
    divided by the number of annotators"); background gets the rest. With L > 2 the
    branches are independent, so where their fractions sum above 1 they are scaled
    down to sum to 1 (background 0); for L = 2 this never happens.
    """
    b, spatial = avm_logits.shape[0], avm_logits.shape[2:]
    logits = avm_logits.reshape(b, num_classes - 1, num_raters + 1, *spatial)
    k = torch.arange(num_raters + 1, device=logits.device, dtype=logits.dtype)
    e = (torch.softmax(logits, dim=2) * k.view(1, 1, -1, *([1] * len(spatial)))).sum(2) / num_raters
    total = e.sum(1, keepdim=True)
    e = e / total.clamp_min(1.0)
    return torch.cat([(1 - e.sum(1, keepdim=True)).clamp_min(0), e], dim=1)


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (7)-(9): soft Dice (eq. 8, per class over the whole batch, averaged over the
    K classes) and cross-entropy (eq. 9, mean over weighted pixels), for soft targets.
    ε is added to numerator and denominator of the Dice (as MONAI's ``DiceLoss`` does),
    so a class absent from target and prediction costs 0 rather than 1.

    Args:
        logits: ``(B, K, *s)``; target: ``(B, K, *s)`` probabilities; weight: ``(B, *s)``
            pixel weights (0 where nothing was annotated).

    Returns:
        ``(dice_loss, ce_loss)`` scalars; both 0 when every weight is 0.
    """
    logp = F.log_softmax(logits, dim=1)
    w = weight.unsqueeze(1)
    total = weight.sum()
    ce = -(target * logp).sum(1)
    ce = (ce * weight).sum() / total.clamp_min(1.0)
    p = logp.exp() * w
    t = target * w
    dims = [0] + list(range(2, logits.ndim))
    inter = (p * t).sum(dims)
    denom = p.sum(dims) + t.sum(dims)
    dice = (1 - ((2 * inter + eps) / (denom + eps)).mean()) * (total > 0)
    return dice, ce

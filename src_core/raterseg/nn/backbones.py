"""Backbones shared by the learned methods: a MONAI U-Net trunk with several output heads.

The CM paper (Zhang et al. 2020, appendix B) uses one U-Net with 4 down-sampling
stages and instance normalisation whose last layer is replaced by separate
output heads (one for the true segmentation, one for the annotators). Every
learned method here builds on the same trunk so that comparisons are fair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..types import RaterSegError

__all__ = ["MIN_SIZE", "MultiHeadUNet", "check_features", "unet_trunk"]

#: Smallest edge the trunk takes without padding: 4 poolings by 2 must leave at least
#: 2 voxels per axis for instance normalisation.
MIN_SIZE = 32


def check_features(features: Sequence[int]) -> tuple[int, ...]:
    """Backbone widths as MONAI ``BasicUNet`` wants them (6 numbers).

    ``features`` is either the 5 encoder widths (the input block and 4 down-sampling
    stages; the last decoder block then has ``features[0]`` channels) or all 6 numbers
    of ``BasicUNet`` (the 6th is the last decoder block's width).

    Raises:
        RaterSegError: not 5 or 6 positive integers.
    """
    try:
        f = tuple(int(v) for v in features)
    except (TypeError, ValueError):
        raise RaterSegError(
            f"features: expected 5 or 6 positive integers (backbone widths), got {features!r}"
        ) from None
    if len(f) not in (5, 6) or min(f) < 1 or any(int(v) != v for v in features):
        raise RaterSegError(
            f"features: expected 5 or 6 positive integers (backbone widths), got {features!r}"
        )
    return f if len(f) == 6 else f + (f[0],)


def unet_trunk(spatial_dims: int, in_channels: int, features: Sequence[int],
               upsample: str = "deconv") -> tuple[nn.Module, int]:
    """MONAI ``BasicUNet`` (4 down-sampling stages, instance norm) without its last 1×1 conv.

    ``upsample``: MONAI's up-sampling mode (``"deconv"`` for every method; the others for
    ablations, benchmarks/upsample_lidc.py).

    Returns:
        ``(trunk, width)``: ``trunk(x)`` maps ``(B, in_channels, *s)`` to features
        ``(B, width, *s)`` at the input resolution (any size; odd sizes are padded by MONAI).
    """
    from monai.networks.nets import BasicUNet

    f = check_features(features)
    net = BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=1,
        features=f,
        act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm=("instance", {"affine": True}),
        upsample=upsample,
    )
    net.final_conv = nn.Identity()
    return net, f[5]


class MultiHeadUNet(nn.Module):
    """A U-Net trunk with named output heads.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C.
        features: backbone widths (see :func:`check_features`).
        heads: name → number of channels of a pixel-wise 1×1 convolution head.
        pooled_heads: name → number of channels of an image-level head (global average
            pooling of the trunk features, then a linear layer), broadcast over space.

    ``forward(x)`` with ``x`` ``(B, C, *s)`` returns a dict name → ``(B, K, *s)``.
    Image-level heads are returned as broadcast views (no copy).
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int],
                 heads: dict[str, int], pooled_heads: dict[str, int] | None = None) -> None:
        super().__init__()
        self.trunk, width = unet_trunk(spatial_dims, in_channels, features)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.heads = nn.ModuleDict({k: conv(width, n, kernel_size=1) for k, n in heads.items()})
        self.pooled_heads = nn.ModuleDict(
            {k: nn.Linear(width, n) for k, n in (pooled_heads or {}).items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # 4 poolings need at least 32 voxels per axis: pad small inputs, crop the outputs.
        spatial = tuple(x.shape[2:])
        short = [max(0, MIN_SIZE - s) for s in spatial]
        if any(short):
            pad = []
            for n in reversed(short):
                pad += [n // 2, n - n // 2]
            mode = "replicate" if all(s > 1 for s in spatial) else "constant"
            feat = self.trunk(torch.nn.functional.pad(x, pad, mode=mode))
            feat = feat[(slice(None), slice(None)) + tuple(
                slice(n // 2, n // 2 + s) for n, s in zip(short, spatial))]
        else:
            feat = self.trunk(x)
        out = {k: h(feat) for k, h in self.heads.items()}
        if len(self.pooled_heads):
            pooled = feat.flatten(2).mean(-1)
            spatial = feat.shape[2:]
            for k, h in self.pooled_heads.items():
                v = h(pooled)
                out[k] = v.reshape(v.shape + (1,) * len(spatial)).expand(*v.shape, *spatial)
        return out

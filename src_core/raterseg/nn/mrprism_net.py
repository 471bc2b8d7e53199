"""MrPrism's network and fusion algebra (Wu et al., "Multi-rater Prism", sections 3-4).

Shapes: ``B`` batch, ``R`` raters, ``L`` classes, ``s`` spatial (2D or 3D).

Fusion algebra (used by the network's recurrence and by the losses):

- :func:`confidences` — proposition 1: rater r's confidence is ``C_r = ln p̂_r`` with
  ``p̂_r`` DivP's probability map of rater r; eq. (1) normalises the confidences over
  the raters (a softmax of ``ln p̂``), so the weight of rater r for class c is
  ``w_{r,c} = p̂_{r,c} / Σ_{r'} p̂_{r',c}``, over the raters who annotated when a mask
  is given (missing raters get 0; the weights sum to 1 over the annotating raters).
- :func:`fuse` — eq. (1)/(4)/(5): ``F(V, w)_c = Σ_r w_{r,c} V_{r,c}`` for the foreground
  classes, the background taking the rest (binary: the authors' weighted mean of the
  foreground channel). With rater labels ``V = Y`` (one-hot) this is the fusion of the
  labels (eq. 4); with DivP's maps ``V = p̂`` and ``w`` from the same maps it is the
  *self-fusion* (eq. 5); with equal weights it is the mean label.

Network (:class:`MrPrismNet`), section 4 and the supplement's architecture table:

- encoder: the MONAI ``BasicUNet`` encoder shared with every learned method
  (:func:`raterseg.nn.backbones.unet_trunk`), run once per image;
- ConP (§4.1): the U-Net decoder (MONAI ``UpCat`` deconvolution stages) with an
  attention block inserted before each of its 4 up-sampling stages
  (:class:`ConPAttention`): the embedded confidence maps are the query, the
  segmentation features the key and value (eq. 7), with sine positional encodings,
  residual + LayerNorm around the attention and around a 2-layer MLP; the maps are
  embedded to each stage's size by a separable convolution
  (:class:`ConfidenceEmbedding`: a cascade of point-wise convs deepening channels and
  depth-wise strided convs down-sampling; He-initialised with zero biases and fed
  ``w − 1/R``, so equal confidences embed to 0 and a departure from them keeps its
  scale down to the /16 stage);
- DivP (§4.2): 4 multi-head self-attention blocks (``torch.nn.TransformerEncoderLayer``,
  post-norm as in the supplement's "MHA-Block") over patch tokens of ConP's mask, then one output head per rater (the R groups of L
  channels of the last projection), giving each rater's probability map;
- the recurrence (§3, §4.3.3): ``w⁰`` = equal confidences 1/R (plus the perturbation of
  eq. 14 while training); for t = 0..T-1: ConP(image, wᵗ) → Pᵗ; DivP(Pᵗ) → p̂ᵗ;
  ``wᵗ⁺¹ = confidences(p̂ᵗ)``. Between recurrences the confidences and DivP's input
  are detached, so the gradients of one recurrence do not reach the next (§4.3.3).

Attention layers are PyTorch's ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer``:
MONAI 1.6.1's ``CrossAttentionBlock``/``SABlock``/``TransformerBlock`` need ``einops``,
which is not a dependency of this project; MONAI's ``MLPBlock`` and U-Net blocks are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import MIN_SIZE, check_features, unet_trunk

__all__ = [
    "INIT_ALPHA",
    "INIT_BETA_MEAN",
    "ConPAttention",
    "ConfidenceEmbedding",
    "DivP",
    "MrPrismNet",
    "confidences",
    "fuse",
    "sincos_positions",
]

#: Eq. (14): the mean confidence α ~ U(0.1, 0.9) (one draw per batch, equal for every rater).
INIT_ALPHA = (0.1, 0.9)
#: Eq. (14): the per-element perturbation β ~ N(0, σ) (σ = ``init_noise``, 0.2 in §5.2.1).
INIT_BETA_MEAN = 0.0

_TINY = 1e-12


def confidences(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised confidences ``w_{r,c} = p̂_{r,c} / Σ_{r'} p̂_{r',c}`` (proposition 1, eq. 1).

    Args:
        probs: ``(B, R, L, *s)`` non-negative per-rater scores (DivP's probability maps,
            or eq. 14's raw confidences broadcast over L).
        mask: optional ``(B, R, *s)`` (bool or 0/1) — the raters who annotated; the others
            get weight 0.

    Returns:
        ``(B, R, L, *s)`` weights summing to 1 over the (annotating) raters; where every
        score is 0 the weights are equal over the annotating raters; 0 where nobody
        annotated.
    """
    m = torch.ones_like(probs[:, :, :1]) if mask is None else mask.unsqueeze(2).to(probs.dtype)
    q = probs * m
    total = q.sum(1, keepdim=True)
    even = m / m.sum(1, keepdim=True).clamp_min(1.0)
    return torch.where(total > _TINY, q / total.clamp_min(_TINY), even.expand_as(q))


def fuse(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The fusion of eqs. (1), (4), (5): ``F_c = Σ_r w_{r,c} V_{r,c}`` for every foreground
    class c ≥ 1, the background taking the rest, ``F_0 = 1 − Σ_{c≥1} F_c``.

    Binary, this is the authors' fusion of the foreground channel, a weighted mean of the
    raters' maps; with equal weights it is the mean label for any number of classes.
    Each ``F_c`` is a weighted mean in [0, 1]; should the foreground classes sum to more
    than 1 (several classes, disagreeing raters), they are rescaled to sum to 1 and the
    background is 0 — the normalisation over classes the paper asks of eq. (1).

    Args:
        values: ``(B, R, L, *s)`` — one-hot rater labels or DivP's probability maps.
        weights: ``(B, R, L, *s)`` from :func:`confidences`.

    Returns:
        ``(B, L, *s)`` class distribution (all background where no rater annotated).
    """
    fg = (weights[:, :, 1:] * values[:, :, 1:]).sum(1)  # (B, L-1, *s)
    total = fg.sum(1, keepdim=True)
    fg = fg / total.clamp_min(1.0)
    return torch.cat([(1.0 - total).clamp_min(0.0), fg], 1)


def sincos_positions(grid: Sequence[int], dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed sine/cosine positional encodings ``(1, N, dim)`` of a token grid (2D or 3D),
    as in DETR (the paper's positional encodings, [7]); any grid size, any ``dim``
    (each axis gets ``dim // (2·ndim)`` frequencies, the remaining channels are 0)."""
    nd = len(grid)
    nf = dim // (2 * nd)
    n = math.prod(grid)
    out = torch.zeros(n, dim, device=device, dtype=torch.float32)
    if nf > 0:
        freqs = 1.0 / (10000.0 ** (torch.arange(nf, device=device, dtype=torch.float32) / nf))
        axes = torch.meshgrid(*[torch.arange(g, device=device, dtype=torch.float32) for g in grid],
                              indexing="ij")
        parts = []
        for a in axes:
            ang = a.reshape(-1, 1) * freqs
            parts += [torch.sin(ang), torch.cos(ang)]
        enc = torch.cat(parts, 1)
        out[:, :enc.shape[1]] = enc
    return out.to(dtype).unsqueeze(0)


def _conv(spatial_dims: int):
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _deconv(spatial_dims: int):
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def _pad_to_multiple(x: torch.Tensor, k: int, mode: str = "constant") -> torch.Tensor:
    """Pad the spatial axes at their end up to a multiple of ``k``."""
    if k == 1:
        return x
    pad = []
    for s in reversed(x.shape[2:]):
        pad += [0, (-s) % k]
    if not any(pad):
        return x
    return F.pad(x, pad, mode=mode)


def _crop(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, *g) -> (B, N, C)


def _untokens(t: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _heads_dim(width: int, heads: int) -> int:
    return heads * max(1, math.ceil(width / heads))


class ConfidenceEmbedding(nn.Module):
    """Separable convolutions embedding the confidence maps ``(B, R·L, *s)`` for the ConP
    stages (§4.2, last paragraph; the supplement's "Separable Convs" stages): a cascade
    of stages, each a point-wise convolution deepening the channels at the current
    resolution and a depth-wise convolution (kernel = stride = 2) halving it, keeping the
    channels. ``forward`` returns the embeddings at /2, /4, /8 and /16 with the widths
    ``widths`` (those of the ConP stages there)."""

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        stages = []
        prev = in_channels
        for c in widths:
            stages.append(nn.Sequential(
                conv(prev, c, kernel_size=1), nn.LeakyReLU(0.1),
                conv(c, c, kernel_size=2, stride=2, groups=c)))
            prev = c
        self.stages = nn.ModuleList(stages)
        # He initialisation, zero biases: PyTorch's default (a uniform of bound 1/√fan_in,
        # i.e. a gain of 1/√3 per convolution) shrinks the confidence signal ~4x per stage,
        # and the biases swamp it: at the /16 stage a one-hot vs an equal confidence map
        # differed by 0.0008 on embeddings of size 0.24, and ConP could not "see" the
        # confidences (nor learn to: they got ~1e-4 of the gradient of the encoder).
        for stage in self.stages:
            point, _act, depth = stage
            nn.init.kaiming_normal_(point.weight, a=0.1, nonlinearity="leaky_relu")
            nn.init.kaiming_normal_(depth.weight, nonlinearity="linear")
            nn.init.zeros_(point.bias)
            nn.init.zeros_(depth.bias)

    def forward(self, w: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            w = stage(w)
            out.append(w)
        return out


class ConPAttention(nn.Module):
    """ConP's attention block (eq. 7 and the supplement's "ATT-Block"): confidence
    embedding as query, segmentation features as key and value.

    Both maps are cut into flattened patches of edge ``patch`` (a convolution with
    kernel = stride = patch, i.e. a linear map of each flattened patch, as in ViT [13]),
    sine positional encodings are added, then
    ``h = LN(E_tok + Att(q=E_tok + pos_E, k=F_tok + pos_F, v=F_tok))`` (eq. 7, multi-head
    dot-product attention; the residual is the query stream, as in a transformer decoder),
    ``h = LN(h + MLP(h))``
    (MONAI ``MLPBlock``, two linear maps keeping the width), and the tokens are mapped
    back to pixels (transposed convolution) and added to the features.

    ``forward(f, e)``: ``f``, ``e`` ``(B, channels, *s)`` → ``(B, channels, *s)``.
    """

    def __init__(self, spatial_dims: int, channels: int, patch: int, heads: int) -> None:
        super().__init__()
        from monai.networks.blocks import MLPBlock

        dim = _heads_dim(channels, heads)
        conv = _conv(spatial_dims)
        self.patch, self.dim = patch, dim
        self.embed_f = conv(channels, dim, kernel_size=patch, stride=patch)
        self.embed_e = conv(channels, dim, kernel_size=patch, stride=patch)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.out = _deconv(spatial_dims)(dim, channels, kernel_size=patch, stride=patch)

    def forward(self, f: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        spatial = f.shape[2:]
        tf = self.embed_f(_pad_to_multiple(f, self.patch))
        te = self.embed_e(_pad_to_multiple(e, self.patch))
        grid = tf.shape[2:]
        pos = sincos_positions(grid, self.dim, tf.device, tf.dtype)
        tf, te = _tokens(tf), _tokens(te)
        h = self.norm1(te + self.attn(te + pos, tf + pos, tf, need_weights=False)[0])
        h = self.norm2(h + self.mlp(h))
        return f + _crop(self.out(_untokens(h, grid)), spatial)


class DivP(nn.Module):
    """DivP (§4.2): ConP's mask ``P`` ``(B, L, *s)`` → each rater's logits ``(B, R, L, *s)``.

    A patch stem (kernel = stride = ``patch``; 4 in 2D as in the supplement, 128→32),
    ``depth`` multi-head self-attention blocks (``nn.TransformerEncoderLayer``: attention,
    add + norm, MLP, add + norm) on the tokens with sine positional encodings, a LayerNorm,
    and one output head per rater — the transposed convolution back to pixels has R
    groups of L channels, rater r's head being its r-th group. Each head gives a
    correction to ``log P``: ``logits_r = log P + Δ_r``. The heads are initialised at
    random, not to zero: identical heads would get identical confidences and identical
    gradients, and stay identical (the trivial solution the shuffle loss is meant to
    avoid, §4.3.2).
    """

    def __init__(self, spatial_dims: int, num_classes: int, num_raters: int, width: int,
                 depth: int, heads: int, patch: int) -> None:
        super().__init__()
        dim = _heads_dim(width, heads)
        self.patch, self.dim = patch, dim
        self.num_raters, self.num_classes = num_raters, num_classes
        self.stem = _conv(spatial_dims)(num_classes, dim, kernel_size=patch, stride=patch)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                       activation="gelu", batch_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # default (random) initialisation: heads that start equal get equal confidences
        # and equal gradients from eqs. (8)-(12) for ever (the trivial solution of §4.3.2)
        self.heads = _deconv(spatial_dims)(dim, num_raters * num_classes, kernel_size=patch,
                                           stride=patch)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        spatial = p.shape[2:]
        t = self.stem(_pad_to_multiple(p, self.patch, "replicate"))
        grid = t.shape[2:]
        t = _tokens(t) + sincos_positions(grid, self.dim, t.device, t.dtype)
        for block in self.blocks:
            t = block(t)
        delta = _crop(self.heads(_untokens(self.norm(t), grid)), spatial)
        delta = delta.reshape(p.shape[0], self.num_raters, self.num_classes, *spatial)
        return torch.log(p.float().clamp_min(1e-6)).unsqueeze(1).to(delta.dtype) + delta


class MrPrismNet(nn.Module):
    """Encoder + ConP + DivP run as MrPrism's recurrence (see the module docstring).

    ``forward(x)`` with ``x`` ``(B, C, *s)`` returns:

    - ``conp``: ``(B, T·L, *s)`` ConP's logits of each recurrence (t-major);
    - ``divp``: ``(B, T·R·L, *s)`` DivP's per-rater logits of each recurrence;
    - ``init_conf``: ``(B, R, *s)`` the raw initial confidences of eq. (14) (all 1 in
      eval mode: equal confidences), which the loss needs for eq. (15).

    In training mode the eq. (14) perturbation is drawn from the network's own seeded
    generator (one draw per batch), so training stays repeatable.
    """

    def __init__(self, spatial_dims: int, in_channels: int, features: Sequence[int],
                 num_classes: int, num_raters: int, recurrences: int = 3, heads: int = 4,
                 divp_width: int = 64, divp_depth: int = 4, init_noise: float = 0.2) -> None:
        super().__init__()
        f = check_features(features)
        self.spatial_dims, self.num_classes, self.num_raters = spatial_dims, num_classes, num_raters
        self.recurrences, self.init_noise = recurrences, init_noise
        self.unet, width = unet_trunk(spatial_dims, in_channels, f)  # encoder + UpCat stages
        rl = num_raters * num_classes
        # decoder inputs of the 4 up-sampling stages: x4 (/16), u4 (/8), u3 (/4), u2 (/2)
        stages = [(f[4], 16), (f[3], 8), (f[2], 4), (f[1], 2)]
        self.embed = ConfidenceEmbedding(spatial_dims, rl, [f[1], f[2], f[3], f[4]])
        # patches of 16/k voxels: every stage attends over the same /16 token grid
        self.attend = nn.ModuleList(ConPAttention(spatial_dims, c, 16 // k, heads) for c, k in stages)
        self.head = _conv(spatial_dims)(width, num_classes, kernel_size=1)
        # prior initialisation (as in RetinaNet): ConP starts at p(background) ≈ 0.95. 1 − SSIM
        # has almost no gradient where a flat background is predicted far from 0 (SSIM is ~0
        # there whatever the error), so a mask starting at 0.5 everywhere learns very slowly.
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[0] = math.log(0.95 * (num_classes - 1) / 0.05)
        self.divp = DivP(spatial_dims, num_classes, num_raters, divp_width, divp_depth, heads,
                         patch=4 if spatial_dims == 2 else 8)
        seed = int(torch.randint(0, 2**62, (1,)))  # drawn from the caller's seeded RNG
        self.generator = torch.Generator().manual_seed(seed)

    def initial_confidence(self, batch: int, spatial: Sequence[int], device) -> torch.Tensor:
        """Raw initial confidences ``(B, R, *s)``: eq. (14) ``clip(α + β, 0, 1)`` with
        α ~ U(0.1, 0.9) and β ~ N(0, init_noise) per rater and voxel, one draw shared by
        the batch, while training; 1 (equal confidences) otherwise."""
        R = self.num_raters
        if not self.training or self.init_noise == 0:
            return torch.ones(batch, R, *spatial, device=device)
        lo, hi = INIT_ALPHA
        alpha = lo + (hi - lo) * torch.rand((), generator=self.generator)
        beta = INIT_BETA_MEAN + self.init_noise * torch.randn(1, R, *spatial, generator=self.generator)
        c = (alpha + beta).clamp(0.0, 1.0)
        return c.to(device).expand(batch, R, *spatial)

    def conp(self, enc: tuple[torch.Tensor, ...], w: torch.Tensor) -> torch.Tensor:
        """ConP: encoder features and confidences ``(B, R, L, *s)`` → logits ``(B, L, *s)``."""
        x0, x1, x2, x3, x4 = enc
        u = self.unet
        # centred: equal confidences embed to 0, the departures from them carry the signal
        emb = self.embed((w - 1.0 / self.num_raters).flatten(1, 2))[::-1]  # /16, /8, /4, /2
        h = x4
        for i, (up, skip) in enumerate(((u.upcat_4, x3), (u.upcat_3, x2), (u.upcat_2, x1),
                                        (u.upcat_1, x0))):
            h = self.attend[i](h, emb[i])
            h = up(h, skip)
        return self.head(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The shared encoder's features ``(x0, …, x4)``, full size down to /16."""
        u = self.unet
        enc = [u.conv_0(x)]
        for down in (u.down_1, u.down_2, u.down_3, u.down_4):
            enc.append(down(enc[-1]))
        return tuple(enc)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        spatial = tuple(x.shape[2:])
        short = [max(0, MIN_SIZE - s) for s in spatial]
        if any(short):  # 4 poolings need 32 voxels per axis: pad, crop the outputs
            pad = []
            for n in reversed(short):
                pad += [n // 2, n - n // 2]
            mode = "replicate" if all(s > 1 for s in spatial) else "constant"
            x = F.pad(x, pad, mode=mode)
        enc = self.encode(x)
        b, full = x.shape[0], tuple(x.shape[2:])
        L = self.num_classes
        c0 = self.initial_confidence(b, full, x.device)
        w = confidences(c0.unsqueeze(2).expand(b, self.num_raters, L, *full))
        conp, divp = [], []
        for _ in range(self.recurrences):
            z = self.conp(enc, w.to(enc[0].dtype))
            y = self.divp(torch.softmax(z.float(), 1).detach())
            w = confidences(torch.softmax(y.float(), 2)).detach()
            conp.append(z)
            divp.append(y.flatten(1, 2))
        out = {"conp": torch.cat(conp, 1), "divp": torch.cat(divp, 1), "init_conf": c0}
        if any(short):
            sl = (slice(None), slice(None)) + tuple(slice(n // 2, n // 2 + s)
                                                    for n, s in zip(short, spatial))
            out = {k: v[sl] for k, v in out.items()}
        return out

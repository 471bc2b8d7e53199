"""Simulated raters and synthetic phantoms (numpy + scipy.ndimage; no torch).

Raters are made from a true label map by the operations the CM paper (Zhang et al.
2020, appendix A.1) takes from Morpho-MNIST: a faithful ("good") rater, over- and
under-segmentation (thickening / thinning), "wrong" segmentation (thickening plus
small fractures) and a "blank" rater; "flip" adds label noise. All morphology goes
through the signed Euclidean distance to each class, so a thickening of radius r is
exactly a dilation by a ball of radius r, in 2D and 3D alike.

``strength`` of each kind (None takes the default in :data:`DEFAULT_STRENGTH`):

- ``"good"``: amplitude (voxels, standard deviation) of a smooth random shift of the
  boundary; the mask is otherwise the truth.
- ``"over"`` / ``"under"``: radius in voxels of the dilation / erosion.
- ``"wrong"``: radius in voxels of the dilation; then ``fractures`` cuts of
  thickness ``max(1, strength / 2)`` voxels (lines in 2D, discs in 3D) are erased.
- ``"flip"``: probability that a voxel's label is replaced by another label.
- ``"blank"``: ignored; everything is background.

Every function takes ``seed`` and draws from ``numpy.random.default_rng``, so the
same seed gives the same output.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .types import MISSING, RaterSegError

__all__ = [
    "DEFAULT_STRENGTH",
    "KINDS",
    "drop_raters",
    "load_mnist",
    "phantom_2d",
    "phantom_3d",
    "sample_case",
    "simulate_rater",
    "simulate_raters",
    "split_quality_case",
]

KINDS = ("good", "over", "under", "wrong", "blank", "flip")
DEFAULT_STRENGTH = {"good": 0.5, "over": 2.0, "under": 2.0, "wrong": 2.0, "blank": 0.0,
                    "flip": 0.1}


def _check_truth(truth, num_classes: int | None) -> tuple[np.ndarray, int]:
    t = np.asarray(truth)
    if t.dtype == bool:
        t = t.astype(np.int16)
    if t.ndim not in (2, 3):
        raise RaterSegError(f"truth: expected a 2D or 3D label map, got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise RaterSegError(f"truth: expected integer class labels, got dtype {t.dtype}")
    if t.size and t.min() < 0:
        raise RaterSegError(f"truth: expected labels >= 0, got minimum {int(t.min())}")
    hi = int(t.max()) if t.size else 0
    if num_classes is None:
        num_classes = max(hi + 1, 2)
    elif int(num_classes) != num_classes or num_classes < 2 or hi >= num_classes:
        raise RaterSegError(
            f"num_classes: expected an integer >= 2 above every label (max {hi}), got {num_classes!r}"
        )
    return t, int(num_classes)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Inside ``mask``: distance to the nearest voxel outside (>= 1); outside: minus the
    distance to the nearest voxel inside (<= -1). The map of ``~mask`` is exactly the negative."""
    if not mask.any():
        return np.full(mask.shape, -np.inf)
    if mask.all():
        return np.full(mask.shape, np.inf)
    return np.where(mask, ndi.distance_transform_edt(mask), -ndi.distance_transform_edt(~mask))


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to unit standard deviation."""
    n = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return n / max(float(n.std()), 1e-12)


def _reshape(truth: np.ndarray, L: int, offset) -> np.ndarray:
    """Move the boundary between foreground and background outwards by ``offset`` voxels
    (a scalar or a field; negative shrinks). Every voxel takes the class with the largest
    shifted signed distance: foreground classes gain ``offset``, background loses it, so
    boundaries between two foreground classes stay put and labels stay valid."""
    if np.isscalar(offset) and offset > 0:
        # Closed ball: a voxel exactly ``offset`` away joins (skimage's disk/ball footprints).
        offset = offset + 1e-6
    d_fg = _signed_distance(truth > 0)
    if L == 2:  # the background's signed distance is exactly -d_fg: one transform, not two
        return (d_fg + offset > -d_fg - offset).astype(truth.dtype)
    best = -d_fg - offset
    out = np.zeros(truth.shape, truth.dtype)
    for c in range(1, L):
        d = _signed_distance(truth == c) + offset
        win = d > best
        out[win] = c
        best = np.where(win, d, best)
    return out


def _fractures(labels: np.ndarray, count: int, thickness: float, length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Erase ``count`` thin cuts (2D lines, 3D discs) centred on random foreground voxels."""
    fg = np.argwhere(labels > 0)
    if count <= 0 or fg.size == 0:
        return labels
    out = labels.copy()
    reach = int(np.ceil(length)) + 1
    for _ in range(count):
        centre = fg[rng.integers(len(fg))]
        normal = rng.standard_normal(labels.ndim)
        normal /= np.linalg.norm(normal)
        # Work in the box around the cut only.
        box = tuple(slice(max(0, c - reach), min(n, c + reach + 1))
                    for c, n in zip(centre, labels.shape))
        rel = np.stack(np.meshgrid(*[np.arange(b.start, b.stop) - c for b, c in zip(box, centre)],
                                   indexing="ij")).astype(np.float32)
        along = np.tensordot(normal, rel, axes=1)
        cut = (np.abs(along) <= thickness / 2) & ((rel ** 2).sum(0) <= length ** 2)
        out[box][cut] = 0
    return out


def simulate_rater(truth, kind: str, strength: float | None = None, seed: int = 0,
                   num_classes: int | None = None, *, fractures: int = 3) -> np.ndarray:
    """One simulated rater's labels from the true label map.

    Args:
        truth: int ``(*S)``, S 2D or 3D, labels 0..L-1.
        kind: one of :data:`KINDS` (see the module docstring for what each does).
        strength: the kind's amount (radius in voxels, boundary-noise amplitude or flip
            probability); None takes :data:`DEFAULT_STRENGTH`.
        seed: random seed.
        num_classes: L; max label + 1 (at least 2) when None.
        fractures: number of cuts for ``kind="wrong"``.

    Returns:
        int16 ``(*S)`` labels in 0..L-1.

    Raises:
        RaterSegError: unknown kind, negative strength, flip probability above 1, bad truth.
    """
    t, L = _check_truth(truth, num_classes)
    if kind not in KINDS:
        from .methods._registry import suggest

        raise RaterSegError(f"kind: expected one of {list(KINDS)}, got {kind!r}{suggest(kind, KINDS)}")
    s = DEFAULT_STRENGTH[kind] if strength is None else float(strength)
    if not np.isfinite(s) or s < 0 or (kind == "flip" and s > 1):
        want = "a probability in [0, 1]" if kind == "flip" else "a number >= 0"
        raise RaterSegError(f"strength: expected {want} for kind {kind!r}, got {strength!r}")
    rng = np.random.default_rng(seed)
    t = t.astype(np.int16)
    if kind == "blank":
        return np.zeros_like(t)
    if kind == "flip":
        flip = rng.random(t.shape) < s
        # A different label, uniformly among the other L-1.
        other = (t + rng.integers(1, L, size=t.shape)) % L
        return np.where(flip, other, t).astype(np.int16)
    if kind == "good":
        offset = s * _smooth_noise(t.shape, sigma=4.0, rng=rng) if s > 0 else 0.0
        return _reshape(t, L, offset)
    if kind == "under":
        return _reshape(t, L, -s)
    thick = _reshape(t, L, s)
    if kind == "over":
        return thick
    size = max(t.shape)
    return _fractures(thick, int(fractures), thickness=max(1.0, s / 2),
                      length=max(2.0, size / 8), rng=rng)


def simulate_raters(truth, kinds: Sequence[str] = ("good", "over", "under", "wrong", "blank"),
                    strength: float | Sequence[float | None] | None = None, seed: int = 0,
                    num_classes: int | None = None) -> np.ndarray:
    """Several simulated raters, one per entry of ``kinds``: int16 ``(R, *S)``.

    ``strength`` is None (each kind's default), one number for every kind but "blank",
    or one value per rater. Each rater draws from its own child of ``seed``.

    Raises:
        RaterSegError: empty ``kinds`` or a ``strength`` list of the wrong length.
    """
    if isinstance(kinds, str) or len(kinds) == 0:
        raise RaterSegError(f"kinds: expected a non-empty sequence of kinds, got {kinds!r}")
    if strength is None or np.isscalar(strength):
        strengths = [None if k == "blank" else strength for k in kinds]
    else:
        strengths = list(strength)
        if len(strengths) != len(kinds):
            raise RaterSegError(
                f"strength: expected one value per rater ({len(kinds)}), got {len(strengths)}"
            )
    seeds = np.random.SeedSequence(seed).spawn(len(kinds))
    return np.stack([
        simulate_rater(truth, k, s, seed=np.random.default_rng(ss).integers(2**31),
                       num_classes=num_classes)
        for k, s, ss in zip(kinds, strengths, seeds)
    ])


def drop_raters(raters, fraction: float | None = None, *, mode: str | None = None, seed: int = 0,
                batched: bool | None = None) -> np.ndarray:
    """Mark whole raters as missing (-1), keeping at least one rater per case.

    Args:
        raters: int ``(R, *S)`` (one case) or ``(N, R, *S)`` (a dataset).
        fraction: probability that each (case, rater) is dropped.
        mode: ``"one_per_case"`` keeps exactly one random rater per case (the CM paper's
            "one label per image" setting). Give ``fraction`` or ``mode``, not both.
        seed: random seed.
        batched: whether there is a leading case axis N. Inferred for 3 dimensions (one
            2D case) and 5 (a 3D dataset); required for 4, where ``(R, D, H, W)`` and
            ``(N, R, H, W)`` cannot be told apart.

    Returns:
        A copy of ``raters`` (int16) with dropped raters set to -1.

    Raises:
        RaterSegError: neither or both of fraction/mode, fraction outside [0, 1),
            ambiguous or wrong number of dimensions.
    """
    arr = np.asarray(raters)
    if batched is None:
        if arr.ndim == 4:
            raise RaterSegError(
                f"batched: raters of shape {arr.shape} may be one 3D case (R, D, H, W) or a "
                "2D dataset (N, R, H, W); pass batched=True or batched=False"
            )
        batched = arr.ndim == 5
    lead = 2 if batched else 1
    if arr.ndim not in (lead + 2, lead + 3):
        layout = "(N, R, *S)" if batched else "(R, *S)"
        raise RaterSegError(f"raters: expected {layout} with S 2D or 3D, got shape {arr.shape}")
    if (fraction is None) == (mode is None):
        raise RaterSegError("fraction/mode: expected exactly one of fraction=... or mode='one_per_case'")
    if mode is not None and mode != "one_per_case":
        raise RaterSegError(f"mode: expected 'one_per_case', got {mode!r}")
    if fraction is not None and not (0 <= fraction < 1):
        raise RaterSegError(f"fraction: expected a number in [0, 1), got {fraction!r}")
    out = arr.astype(np.int16, copy=True)
    view = out if batched else out[None]
    N, R = view.shape[:2]
    rng = np.random.default_rng(seed)
    if mode == "one_per_case":
        keep = np.zeros((N, R), bool)
        keep[np.arange(N), rng.integers(R, size=N)] = True
    else:
        keep = rng.random((N, R)) >= fraction
        none = ~keep.any(axis=1)
        keep[np.flatnonzero(none), rng.integers(R, size=int(none.sum()))] = True
    view[~keep] = MISSING
    return out


def _phantom(shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 8:
        raise RaterSegError(f"shape: expected 2 or 3 sizes, each >= 8, got {shape!r}")
    if int(num_classes) != num_classes or num_classes < 2:
        raise RaterSegError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    rng = np.random.default_rng(seed)
    nd = len(shape)
    # Normalised coordinates in [-1, 1] per axis.
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    score = np.full(shape, -np.inf)
    n_blobs = int(rng.integers(2, 4))
    for _ in range(n_blobs):
        centre = rng.uniform(-0.45, 0.45, nd)
        radii = rng.uniform(0.18, 0.32, nd) if nd == 2 else rng.uniform(0.28, 0.45, nd)
        rot, _ = np.linalg.qr(rng.standard_normal((nd, nd)))
        rel = np.tensordot(rot.T, grid - centre.reshape((-1,) + (1,) * nd), axes=1)
        # 1 at the centre, 0 on the ellipsoid's surface.
        score = np.maximum(score, 1.0 - np.sqrt(((rel / radii.reshape((-1,) + (1,) * nd)) ** 2).sum(0)))
    # Low-frequency deformation makes blobs rather than perfect ellipsoids.
    score = score + 0.12 * _smooth_noise(shape, sigma=max(shape) / 10, rng=rng)
    # Nested classes: class c where the score passes the c-th threshold (a core inside a rim).
    thresholds = np.linspace(0.0, 0.55, num_classes)[: num_classes - 1]
    truth = np.zeros(shape, np.int16)
    for c, th in enumerate(thresholds, start=1):
        truth[score > th] = c
    means = np.linspace(0.25, 0.75, num_classes)
    means[1:] += rng.uniform(-0.05, 0.05, num_classes - 1)
    image = means[truth]
    image = ndi.gaussian_filter(image, 1.0)  # partial-volume blur at edges
    image = image + 0.06 * _smooth_noise(shape, sigma=4.0, rng=rng)  # bias-like texture
    image = image + 0.05 * rng.standard_normal(shape)  # acquisition noise
    return np.clip(image, 0.0, 1.0).astype(np.float32), truth


def phantom_2d(shape: tuple[int, int] = (128, 128), num_classes: int = 2,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 2D phantom: smooth blobs (classes nested inside each other) on a noisy image.

    Returns:
        ``(image, truth)``: float32 ``(H, W)`` in [0, 1] whose mean intensity differs per
        class, with blur, smooth texture and noise; int16 ``(H, W)`` labels 0..L-1.

    Raises:
        RaterSegError: a shape that is not 2D with sides >= 8, or num_classes < 2.
    """
    if len(tuple(shape)) != 2:
        raise RaterSegError(f"shape: expected (H, W), got {shape!r}")
    return _phantom(tuple(shape), num_classes, seed)


def phantom_3d(shape: tuple[int, int, int] = (64, 128, 128), num_classes: int = 2,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3D phantom of deformed ellipsoids, like :func:`phantom_2d`: ``(image, truth)``
    float32 ``(D, H, W)`` and int16 ``(D, H, W)``.

    Raises:
        RaterSegError: a shape that is not 3D with sides >= 8, or num_classes < 2.
    """
    if len(tuple(shape)) != 3:
        raise RaterSegError(f"shape: expected (D, H, W), got {shape!r}")
    return _phantom(tuple(shape), num_classes, seed)


#: Rater behaviours of :func:`sample_case`, in order (cycled beyond five raters).
SAMPLE_KINDS = ("good", "over", "under", "wrong", "flip")


def sample_case(dims: int = 2, num_raters: int = 4, seed: int = 0, num_classes: int = 2,
                shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom with raters of distinct behaviours, for sample data and the demo.

    Raters follow :data:`SAMPLE_KINDS` (good, over, under, wrong, flip, good, ...), with
    radii scaled to the phantom's size (3 voxels at 128).

    Returns:
        ``(image, raters, truth)``: float32 ``(*S)``, int16 ``(R, *S)``, int16 ``(*S)``;
        S defaults to (128, 128) in 2D and (64, 128, 128) in 3D.

    Raises:
        RaterSegError: dims not 2 or 3, num_raters < 1.
    """
    if dims not in (2, 3):
        raise RaterSegError(f"dims: expected 2 or 3, got {dims!r}")
    if int(num_raters) != num_raters or num_raters < 1:
        raise RaterSegError(f"num_raters: expected an integer >= 1, got {num_raters!r}")
    if shape is None:
        shape = (128, 128) if dims == 2 else (64, 128, 128)
    image, truth = _phantom(tuple(shape), num_classes, seed) if len(shape) == dims else (None, None)
    if image is None:
        raise RaterSegError(f"shape: expected {dims} sizes for dims={dims}, got {shape!r}")
    scale = max(shape) / 128
    # at least one voxel of thickening/thinning: below ~43 voxels the scaled amounts round
    # to nothing and the over/under/wrong raters would equal the truth
    biased = max(1.0, 3.0 * scale)
    amount = {"good": 1.0 * scale, "over": biased, "under": biased, "wrong": biased, "flip": 0.08}
    kinds = [SAMPLE_KINDS[i % len(SAMPLE_KINDS)] for i in range(int(num_raters))]
    raters = simulate_raters(truth, kinds, [amount[k] for k in kinds], seed=seed + 1,
                             num_classes=num_classes)
    return image, raters, truth


def _read_idx(path: Path, n: int | None) -> np.ndarray:
    """Read (the first ``n`` items of) an idx file, gzipped or not, as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise RaterSegError(f"path: {str(path)!r} is not an idx file of unsigned bytes")
            ndim = head[3]
            dims = list(np.frombuffer(f.read(4 * ndim), dtype=">u4").astype(int))
            if len(dims) != ndim:
                raise RaterSegError(f"path: {str(path)!r} is truncated (idx header)")
            if n is not None:
                dims[0] = min(dims[0], int(n))
            count = int(np.prod(dims))
            data = np.frombuffer(f.read(count), dtype=np.uint8)
    except (OSError, EOFError) as err:
        raise RaterSegError(f"path: could not read {str(path)!r} as an idx file: {err}") from None
    if data.size != count:
        raise RaterSegError(f"path: {str(path)!r} is truncated: expected {count} bytes of data")
    return data.reshape(dims)


def load_mnist(path: str | os.PathLike, n: int | None = None,
               split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits and their masks (intensity > 0.5, as in the CM paper).

    Args:
        path: a folder holding ``{split}-images-idx3-ubyte(.gz)``, or that file itself.
        n: read only the first ``n`` images (all when None).
        split: ``"t10k"`` or ``"train"`` (file-name prefix when ``path`` is a folder).

    Returns:
        ``(images, truth)``: float32 ``(N, 28, 28)`` in [0, 1] and int16 ``(N, 28, 28)`` 0/1.

    Raises:
        RaterSegError: missing file, not an idx image file, n < 1.
    """
    p = Path(path)
    if p.is_dir():
        cands = [p / f"{split}-images-idx3-ubyte.gz", p / f"{split}-images-idx3-ubyte"]
        found = [c for c in cands if c.exists()]
        if not found:
            raise RaterSegError(f"path: no {split}-images-idx3-ubyte(.gz) in folder {str(p)!r}")
        p = found[0]
    elif not p.exists():
        raise RaterSegError(f"path: {str(p)!r} does not exist")
    if n is not None and (int(n) != n or n < 1):
        raise RaterSegError(f"n: expected an integer >= 1 or None, got {n!r}")
    raw = _read_idx(p, n)
    if raw.ndim != 3:
        raise RaterSegError(f"path: expected an idx file of images (N, H, W), got shape {raw.shape}")
    images = raw.astype(np.float32) / 255.0
    return images, (images > 0.5).astype(np.int16)


def split_quality_case(seed: int = 0, size: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A 2D case for spatially varying rater quality (what spatial STAPLE is for): rater 0
    is nearly perfect on the left half (boundary noise 0.5) and over-segments by 6 pixels
    on the right; raters 1-3 are middling everywhere (under by 2, over by 2, 10 % flips).

    Returns:
        ``(raters, truth)``: int16 ``(4, size, size)`` and ``(size, size)``.
    """
    _, truth = phantom_2d((size, size), seed=seed)
    half = size // 2
    a = simulate_rater(truth, "good", 0.5, seed=1)
    a[:, half:] = simulate_rater(truth, "over", 6)[:, half:]
    others = [simulate_rater(truth, "under", 2), simulate_rater(truth, "over", 2),
              simulate_rater(truth, "flip", 0.1, seed=6)]
    return np.stack([a] + others).astype(np.int16), truth

"""Core data types: the validated rater stack, results, progress events and errors.

Everything here is numpy-only so that readers, sample data and the CLI's
argument parsing never pay for importing torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MISSING",
    "FusionResult",
    "RaterSegError",
    "RaterStack",
    "TrainingEvent",
    "as_rater_stack",
    "check_image",
]

#: Label value meaning "this rater did not annotate here".
MISSING = -1


class RaterSegError(ValueError):
    """A user mistake: the message names the argument, what was expected and what came."""


@dataclass
class TrainingEvent:
    """Progress of long work (EM iterations, training epochs).

    ``step`` counts from 1 to ``total``; ``metrics`` holds numbers such as the
    epoch's loss or the EM update size.
    """

    step: int
    total: int
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FusionResult:
    """What every method returns (numpy arrays on the CPU).

    Shapes for one case with ``L`` classes, ``R`` raters and spatial shape ``S``;
    ``predict`` on a batch adds a leading ``N`` to every array field except
    ``rater_confusion``.

    Attributes:
        truth: int ``(*S)`` estimated true labels.
        probabilities: float32 ``(L, *S)`` p(true class).
        uncertainty: float32 ``(*S)`` entropy of ``probabilities`` divided by log(L), in [0, 1].
        disagreement: float32 ``(*S)`` observed disagreement among the raters who
            annotated the voxel: 1 - (share of the most common label); 0 where
            fewer than two raters annotated or raters were not given.
        rater_confusion: float32 ``(R, L, L)``, ``[r, i, j] = p(rater r says i | truth j)``
            (columns sum to 1; NaN where nothing was observed: a rater who annotated no
            voxel of the case, or a class that is never the truth), or None where a
            method does not model raters.
        rater_maps: float32 ``(R, *S)`` per-rater reliability in [0, 1], or None.
        rater_estimates: float32 ``(R, L, *S)`` each rater's modelled segmentation, or None.
        method: the method's registered name.
        params: the method's full configuration.
        history: one dict per EM iteration or epoch.
    """

    truth: np.ndarray
    probabilities: np.ndarray
    uncertainty: np.ndarray
    disagreement: np.ndarray
    rater_confusion: np.ndarray | None = None
    rater_maps: np.ndarray | None = None
    rater_estimates: np.ndarray | None = None
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.probabilities.shape[-1 - self.truth.ndim])

    def replace(self, **changes: Any) -> FusionResult:
        return dataclasses.replace(self, **changes)


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


@dataclass(frozen=True)
class RaterStack:
    """Validated rater labels.

    Attributes:
        labels: int16/int32 array ``(R, *S)`` (one case) or ``(N, R, *S)`` (a dataset);
            ``-1`` marks voxels a rater did not annotate. Never aliases the caller's array.
        num_classes: number of classes L (labels are ``0..L-1``).
        batched: whether there is a leading case axis N.
    """

    labels: np.ndarray
    num_classes: int
    batched: bool = False

    @property
    def num_raters(self) -> int:
        return int(self.labels.shape[1 if self.batched else 0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape[2 if self.batched else 1 :])

    @property
    def annotated(self) -> np.ndarray:
        """bool, same shape as ``labels``: where a rater gave a label."""
        return self.labels >= 0

    @property
    def has_missing(self) -> bool:
        return bool((self.labels < 0).any())


#: The most classes inferred from the labels (num_classes=None). A larger label is more
#: often an object id or a sparse atlas label than a class; one probability map per class
#: up to it could exhaust memory, so it needs an explicit ``num_classes``.
MAX_INFERRED_CLASSES = 256


#: The largest value of 8-bit images. Labels going up to exactly 255 of which fewer than half
#: occur are grey levels (0/255 masks, anti-aliased or resampled edges), not 256 classes.
GREY_LEVEL_MAX = 255


def infer_num_classes(hi: int, present: np.ndarray | None, voxels: int, argname: str) -> int:
    """L = largest label + 1 (at least 2), refusing labels that do not look like classes.

    Args:
        hi: the largest label.
        present: bool ``(hi + 1,)``, which labels occur; only needed (and only looked at)
            when ``hi == GREY_LEVEL_MAX``; None skips that check.
        voxels: voxels of one rater's labels over all cases (for the memory estimate).

    Raises:
        RaterSegError: more than :data:`MAX_INFERRED_CLASSES` classes, or labels up to 255
            of which fewer than half occur (an 8-bit image's grey levels).
    """
    num_classes = max(int(hi) + 1, 2)
    if num_classes > MAX_INFERRED_CLASSES:
        gib = num_classes * voxels * 4 / 2**30
        raise RaterSegError(
            f"{argname}: the largest label is {hi}, so fusion would make {num_classes} "
            f"probability maps ({gib:.1f} GiB in float32). Relabel the classes to 0..L-1 "
            f"(object ids are not classes), or pass num_classes={num_classes} to go ahead")
    if present is not None and hi == GREY_LEVEL_MAX:
        values = np.flatnonzero(present)
        if 2 * len(values) < num_classes:
            shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
            hint = ("this is a 0/255 mask: use labels 0/1 (divide by 255)"
                    if set(values.tolist()) <= {0, 255} else
                    "grey levels of an 8-bit image (anti-aliased or resampled edges) need a "
                    "threshold; classes need relabelling to 0..L-1")
            raise RaterSegError(
                f"{argname}: the labels go up to 255 but only {len(values)} values occur "
                f"({shown}), so fusion would make 256 probability maps for {len(values)} "
                f"classes: {hint}; or pass num_classes=256 to go ahead")
    return num_classes


def labels_present(arr: np.ndarray, hi: int, chunk: int = 1 << 20) -> np.ndarray:
    """bool ``(hi + 1,)``: which labels 0..hi occur in ``arr`` (-1 ignored), counted a
    chunk at a time (no full-size temporaries)."""
    flat = arr.reshape(-1)
    present = np.zeros(hi + 1, bool)
    for s in range(0, flat.size, chunk):
        c = flat[s:s + chunk]
        present |= np.bincount(c[c >= 0].astype(np.intp), minlength=hi + 1)[: hi + 1] > 0
    return present


def _copy_as(arr: np.ndarray, dtype) -> np.ndarray:
    """``arr.astype(dtype)`` (always a copy), converted on several threads when large."""
    if not arr.flags.c_contiguous or arr.size < (1 << 20):
        return arr.astype(dtype, copy=True)
    from ._threads import in_threads

    src, out = arr.reshape(-1), np.empty(arr.shape, dtype)
    dst = out.reshape(-1)

    def convert(lo: int, hi: int) -> None:
        dst[lo:hi] = src[lo:hi]

    in_threads(src.size, convert)
    return out


def as_rater_stack(
    raters: Any,
    num_classes: int | None = None,
    *,
    batched: bool = False,
    argname: str = "raters",
) -> RaterStack:
    """Check rater labels and return a :class:`RaterStack` (a copy; the input is untouched).

    Args:
        raters: int array-like ``(R, *S)`` (or ``(N, R, *S)`` with ``batched``), or a
            sequence of R arrays of the same shape. Bool arrays count as labels 0/1.
        num_classes: L; inferred as max label + 1 (at least 2) when None.

    Raises:
        RaterSegError: no raters, float labels, labels < -1 or >= ``num_classes``,
            wrong number of dimensions, or a case where no rater annotated anything.
    """
    if raters is None:
        raise RaterSegError(f"{argname}: expected one label map per rater, got None")
    if isinstance(raters, (list, tuple)):
        if len(raters) == 0:
            raise RaterSegError(f"{argname}: expected at least one rater, got an empty list")
        arrays = [np.asarray(a) for a in raters]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise RaterSegError(
                f"{argname}: expected every rater's label map to have the same shape, "
                f"got shapes {[a.shape for a in arrays]}"
            )
        arr = np.stack(arrays, axis=1 if batched else 0)
    else:
        arr = np.asarray(raters)
    lead = 2 if batched else 1
    layout = "(N, R, *S)" if batched else "(R, *S)"
    if arr.ndim not in (lead + 2, lead + 3):
        raise RaterSegError(
            f"{argname}: expected an array {layout} with S 2D or 3D, got {_describe(arr)}"
        )
    if arr.shape[lead - 1] == 0:
        raise RaterSegError(f"{argname}: expected at least one rater, got {_describe(arr)}")
    if arr.dtype == bool:
        arr = arr.astype(np.int16)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise RaterSegError(
            f"{argname}: expected integer class labels (0..L-1, -1 for missing), "
            f"got {_describe(arr)}"
        )
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < MISSING:
        raise RaterSegError(
            f"{argname}: expected labels >= -1 (-1 = rater did not annotate), got minimum {lo}"
        )
    if num_classes is None:
        present = labels_present(arr, hi) if hi == GREY_LEVEL_MAX else None
        voxels = arr[0].size if not batched else arr[0, 0].size * arr.shape[0]
        num_classes = infer_num_classes(hi, present, voxels, argname)
    else:
        if int(num_classes) != num_classes or num_classes < 2:
            raise RaterSegError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        num_classes = int(num_classes)
        if hi >= num_classes:
            raise RaterSegError(
                f"{argname}: expected labels in 0..{num_classes - 1} (num_classes={num_classes}), "
                f"got a label {hi}"
            )
    dtype = np.int16 if num_classes < 32000 else np.int32
    labels = _copy_as(arr, dtype)
    # A case needs at least one rater who annotated something.
    if batched:
        any_ann = (labels >= 0).any(axis=tuple(range(1, labels.ndim)))
    else:
        any_ann = labels.size > 0 and hi >= 0  # max label: no full-size temporary
    if not np.all(any_ann):
        bad = np.flatnonzero(~np.atleast_1d(any_ann))
        where = f"case(s) {bad.tolist()[:10]}" if batched else "this case"
        raise RaterSegError(
            f"{argname}: expected at least one rater to annotate each case, but every rater "
            f"is -1 (missing) in {where}"
        )
    return RaterStack(labels=labels, num_classes=num_classes, batched=batched)


def check_image(
    image: Any,
    spatial_shape: tuple[int, ...],
    *,
    batched: bool = False,
    argname: str = "image",
) -> np.ndarray:
    """Return ``image`` as float32 ``(C, *S)`` (or ``(N, C, *S)``), a copy.

    Accepts ``(*S)`` / ``(C, *S)`` (or ``(N, *S)`` / ``(N, C, *S)`` with ``batched``).

    Raises:
        RaterSegError: spatial shape differs from the raters', non-numeric data, NaN or inf.
    """
    if image is None:
        raise RaterSegError(f"{argname}: expected an image array, got None")
    arr = np.asarray(image)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise RaterSegError(f"{argname}: expected a numeric array, got {_describe(arr)}")
    nsp = len(spatial_shape)
    lead = 1 if batched else 0
    if arr.shape[lead:] == tuple(spatial_shape):
        arr = np.expand_dims(arr, lead)
    if arr.ndim != lead + 1 + nsp or arr.shape[lead + 1 :] != tuple(spatial_shape):
        want = ("(N, C, " if batched else "(C, ") + ", ".join(map(str, spatial_shape)) + ")"
        raise RaterSegError(
            f"{argname}: expected shape {want} or without the channel axis, matching the "
            f"raters' spatial shape {tuple(spatial_shape)}, got {_describe(arr)}"
        )
    out = arr.astype(np.float32, copy=True)
    if not np.isfinite(out).all():
        raise RaterSegError(f"{argname}: contains NaN or infinite values")
    return out

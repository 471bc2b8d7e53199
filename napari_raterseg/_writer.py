"""Writers: a Labels or Image layer to NIfTI or TIFF, atomically.

The file is written to a temporary name beside the target and renamed over it
(:func:`raterseg.io.write_array`), so an interrupted save never leaves a
half-written file. NIfTI output keeps the geometry (affine, header) of the file
the layer — or the image it was fused from — was read from, as long as the layer
still has that file's voxel spacing; otherwise the layer's ``scale`` becomes the
voxel size. Labels stay integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._reader import IO_META_KEY

#: Endings the writers accept (the manifest lists the same).
EXTENSIONS = (".nii.gz", ".nii", ".tif", ".tiff")


def _io_meta(layer_meta: dict, ndim: int) -> dict:
    """The ``meta`` for ``write_array``: the source file's geometry when it still fits."""
    scale = tuple(float(s) for s in (layer_meta.get("scale") or (1.0,) * ndim))
    if layer_meta.get("rgb") and len(scale) == ndim - 1:
        scale = (*scale, 1.0)  # an RGB(A) layer's colour axis is last and has no scale
    source = dict((layer_meta.get("metadata") or {}).get(IO_META_KEY) or {})
    spacing = tuple(float(s) for s in (source.get("spacing") or ()))
    n = min(3, ndim, len(spacing))
    rgb = {"rgb": True} if layer_meta.get("rgb") else {}  # a TIFF is then written in colour
    if n and source.get("affine") is not None and np.allclose(spacing[-n:], scale[-n:]):
        return {"affine": source["affine"], "header": source.get("header"),
                "spacing": scale, **rgb}
    return {"spacing": scale, **rgb}


def _write(path: str, data: Any, meta: dict, labels: bool) -> list[str]:
    from raterseg.io import write_array

    if not str(path).lower().endswith(EXTENSIONS):
        return []
    arr = np.asarray(data)
    if labels and arr.dtype == bool:
        arr = arr.astype(np.uint8)
    write_array(path, arr, _io_meta(meta or {}, arr.ndim))
    return [str(path)]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write a Labels layer (int array) to ``.nii``/``.nii.gz``/``.tif``/``.tiff``.

    Returns:
        ``[path]``, or ``[]`` for an ending this writer does not handle.

    Raises:
        RaterSegError: the file could not be written.
    """
    return _write(path, data, meta, labels=True)


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Write an Image layer to ``.nii``/``.nii.gz``/``.tif``/``.tiff`` (see :func:`write_labels`)."""
    return _write(path, data, meta, labels=False)

"""Writers: a Labels or Image layer to NIfTI or TIFF, atomically; several layers at once
to a folder of NIfTI files, one per layer (:func:`write_layers`).

The file is written to a temporary name beside the target and renamed over it
(:func:`raterseg.io.write_array`), so an interrupted save never leaves a
half-written file. NIfTI output keeps the geometry (affine, header) of the file
the layer — or the image it was fused from — was read from, as long as the layer
still has that file's voxel spacing; otherwise the layer's ``scale`` becomes the
voxel size. Labels stay integers.
"""

from __future__ import annotations

import re
from pathlib import Path
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


_UNSAFE_CHARS = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
#: Names Windows refuses for a file, whatever its ending.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10))}
_MAX_NAME_BYTES = 120  # well below 255 with the ending and the temporary file's additions


def safe_file_name(name: str) -> str:
    """A layer name as a file name (without ending) that every common file system takes:
    path separators, ``: * ? " < > |`` and control characters become ``_``; leading dots
    (hidden files) and trailing dots or spaces go; Windows device names (``CON``, ...) get
    a leading ``_``; long names are cut. Spaces and brackets stay: ``img truth [staple]``."""
    safe = _UNSAFE_CHARS.sub("_", str(name)).strip().lstrip(".").rstrip(". ")
    safe = safe.encode("utf-8")[:_MAX_NAME_BYTES].decode("utf-8", "ignore").rstrip(". ")
    if not safe:
        return "layer"
    return f"_{safe}" if safe.split(".")[0].upper() in _RESERVED else safe


def _folder_for(path: str) -> Path:
    """The folder :func:`write_layers` writes into: ``path`` without a ``.nii.gz`` /
    ``.nii`` ending (a folder named ``results.nii.gz`` would pass for a NIfTI file)."""
    p = Path(path)
    for suffix in (".nii.gz", ".nii"):
        if p.name.lower().endswith(suffix) and len(p.name) > len(suffix):
            return p.with_name(p.name[: -len(suffix)])
    return p


def write_layers(path: str, layers: list[tuple[Any, dict, str]]) -> list[str]:
    """Write Labels and Image layers into the folder ``path`` (a ``.nii.gz`` / ``.nii``
    ending is dropped: ``results.nii.gz`` → ``results/``), one ``.nii.gz`` per layer named
    after the layer (:func:`safe_file_name`), each as :func:`write_labels` /
    :func:`write_image` write it: atomically, with the geometry of the file the layer (or
    the image it was fused from) came from. Files of the same names are replaced; other
    files in the folder are left alone.

    Args:
        path: the folder (created if needed).
        layers: napari layer-data tuples ``(data, meta, layer_type)``.

    Returns:
        The written file paths, in the order of ``layers``.

    Raises:
        RaterSegError: ``path`` is a file (or cannot be created or written); two layers
            whose names give the same file name; a layer that is not Labels or Image;
            a failed write. Everything but a failed write is checked before any file is
            written.
    """
    from raterseg import RaterSegError
    from raterseg.io import check_output_folder

    folder = _folder_for(path)
    targets: list[Path] = []
    seen: dict[str, str] = {}
    for _, meta, kind in layers:
        name = str((meta or {}).get("name", ""))
        if kind not in ("labels", "image"):
            raise RaterSegError(f"layers: expected Labels or Image layers (saved as NIfTI), "
                                f"got the {kind} layer '{name}'")
        file_name = f"{safe_file_name(name)}.nii.gz"
        key = file_name.casefold()  # 'Truth' and 'truth' are one file on macOS and Windows
        if key in seen:
            raise RaterSegError(f"layers: '{seen[key]}' and '{name}' would both be saved as "
                                f"'{file_name}'; rename one of the layers")
        seen[key] = name
        targets.append(folder / file_name)
    check_output_folder(folder, "path")
    for target in targets:
        if target.is_dir():
            raise RaterSegError(f"path: expected '{target.name}' in '{folder}' to be a file "
                                "(or absent), got a folder")
    written: list[str] = []
    for (data, meta, kind), target in zip(layers, targets):
        written += _write(str(target), data, meta, labels=kind == "labels")
    return written

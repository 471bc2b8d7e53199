"""Readers: NIfTI, TIFF, PNG, NPY/NPZ, case folders and the LIDC-IDRI-slices layout.

Thin wrappers over :mod:`raterseg.io` / :mod:`raterseg.datasets`: they turn the
arrays into napari layer-data tuples, the file's voxel spacing into the layers'
``scale``, and keep the file's geometry (NIfTI affine and header) in
``metadata["raterseg_io"]`` so the writer can save results back in the same space.

Each ``get_*_reader(path)`` returns a reader function for paths it handles and
None otherwise, as npe2 expects. Reading never executes anything in a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Where readers keep the file's meta (affine, header, spacing) in layer metadata.
IO_META_KEY = "raterseg_io"

#: File-name fragments that mark an integer file as a label map.
_LABEL_HINTS = ("mask", "label", "seg", "rater", "truth", "annot", "manual")
_MAX_LABELS = 32

LayerData = tuple[Any, dict, str]
ReaderFunction = Callable[[Any], list[LayerData]]

_NIFTI = (".nii", ".nii.gz")
_TIFF = (".tif", ".tiff")
_NUMPY = (".npy", ".npz")
_PNG = (".png",)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _single_path(path: Any) -> str | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None


def _paths(path: Any) -> list[str]:
    return [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else [os.fspath(path)]


def _all_end_with(path: Any, suffixes: Sequence[str]) -> bool:
    if isinstance(path, (list, tuple)) and not path:
        return False
    try:
        paths = _paths(path)
    except TypeError:
        return False
    return all(p.lower().endswith(tuple(suffixes)) and not os.path.isdir(p) for p in paths)


def _stem(path: str) -> str:
    name = Path(path).name
    for suf in (".nii.gz", ".nii", ".tiff", ".tif", ".npz", ".npy"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def labels_or_none(arr: np.ndarray, name: str = "") -> np.ndarray | None:
    """The label map in an array read from a file (as :func:`as_labels` gives it), or None
    when the array is an image.

    Bool arrays are labels. Integer arrays with values in ``-1..255`` are labels when
    the file name says so (``mask``, ``label``, ``seg``, ``rater``, …) or when they hold
    at most 32 distinct values (a CT or an 8-bit photo holds many more). Float arrays
    (ITK tools often save masks as float32) are labels when every value is a whole number
    (up to float round-off, as the core reads label files: 0.99999994 is 1) in ``-1..255``
    and the file name says so, or when they hold only 0 and 1 or only 0 and 255 (a binary
    mask, whatever the file is called).
    """
    if arr.dtype == bool:
        return as_labels(arr)
    hinted = any(h in name.lower() for h in _LABEL_HINTS)
    if arr.size == 0:
        return None
    if arr.dtype.kind == "f":
        from raterseg import RaterSegError
        from raterseg.datasets import LABEL_ROUNDOFF, is_0_255_mask, rounded_labels

        # a sample first: a scan (fractional values) is told apart without full-size copies
        flat = arr.reshape(-1)
        sample = flat[:: max(1, flat.size // 65536)]
        if not (np.abs(sample - np.round(sample)) <= LABEL_ROUNDOFF).all():
            return None
        try:
            arr = rounded_labels(arr, "labels")  # rounded once, here
        except RaterSegError:  # fractional or non-finite values: an image
            return None
        binary = (arr.max() == 1 and bool(((arr == 0) | (arr == 1)).all())) or is_0_255_mask(arr)
        if not (hinted or binary):
            return None
    elif not np.issubdtype(arr.dtype, np.integer):
        return None
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -1 or hi > 255:
        return None
    if not hinted:
        step = max(1, arr.size // 1_000_000)  # a sample is enough to see many values
        if np.unique(arr.reshape(-1)[::step]).size > _MAX_LABELS:
            return None
    return as_labels(arr.astype(np.int16) if arr.dtype.kind == "f" else arr)


def as_labels(arr: np.ndarray) -> np.ndarray:
    """A label map read from a file as the core reads rater files
    (:func:`raterseg.datasets.read_labels`): bool → 0/1, a mask holding only 0 and 255
    (any dtype) → 0/1 (taken as classes 0..255 it would fuse into 256-class maps),
    whole-number floats (up to float round-off: a float32 0.99999994 is 1) → int16.
    Other integer arrays are returned as they are.

    Raises:
        RaterSegError: float values that are not whole numbers (0.5, NaN).
    """
    from raterseg.datasets import is_0_255_mask, rounded_labels

    if arr.dtype == bool:
        # a copy, not a view: Pillow's bool arrays (1-bit PNGs) hold True as the byte 255
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        arr = rounded_labels(arr, "labels").astype(np.int16)
    if is_0_255_mask(arr):
        return arr // 255
    return arr


UNANNOTATED_RGBA = (0.5, 0.5, 0.5, 0.45)  # -1 in a Labels layer: grey, mostly see-through


def unannotated_grey(labels: np.ndarray, kwargs: dict) -> dict:
    """``kwargs`` for a Labels layer of ``labels``, with a colormap that shows -1 (a voxel
    the rater left unannotated; in a chunked truth, undecided) as a faint grey veil.

    napari's default colormap colours -1 like any label (pink), so an unannotated region
    would look drawn; transparent, it would look like background. Every other label keeps
    napari's default colour (the cyclic map of 49 colours a Labels layer starts with).
    ``kwargs`` is returned as it is when ``labels`` has no negative value."""
    if labels.size == 0 or int(labels.min()) >= 0:
        return kwargs
    from napari.utils.colormaps import label_colormap

    top = max(int(labels.max()), 0)
    cyclic = label_colormap(49, 0.5, background_value=0)  # a Labels layer's default
    rgba = cyclic.map(np.arange(1, top + 2))
    colours = {k + 1: tuple(c) for k, c in enumerate(rgba[:-1])}
    # labels painted later, above the largest, get one colour
    colormap = {None: tuple(rgba[-1]), -1: UNANNOTATED_RGBA, 0: "transparent", **colours}
    return {**kwargs, "colormap": colormap}


def _scale(meta: dict, ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in (meta.get("spacing") or ()))
    spacing = (1.0,) * max(0, ndim - len(spacing)) + spacing
    return spacing[-ndim:] if ndim else ()


def _array_layer(arr: np.ndarray, meta: dict, name: str) -> LayerData:
    """One image or labels layer for an array read from a file; a colour image (an RGB
    TIFF, read channels first) is an RGB image layer, channels last as napari shows them."""
    if meta.get("channels_moved_first") and arr.ndim >= 3 and arr.shape[0] in (3, 4):
        return np.moveaxis(arr, 0, -1), {"name": name, "rgb": True,
                                         "scale": _scale(meta, arr.ndim - 1),
                                         "metadata": {IO_META_KEY: meta}}, "image"
    kwargs = {"name": name, "scale": _scale(meta, arr.ndim), "metadata": {IO_META_KEY: meta}}
    labels = labels_or_none(arr, name)
    if labels is not None:
        return labels, unannotated_grey(labels, kwargs), "labels"
    return arr, kwargs, "image"


def _png_colours(path: str, layer: LayerData) -> LayerData:
    """An indexed-colour (palette) PNG that is not a label map, in its colours.

    The core reads a palette PNG as its colour indices (an indexed mask's classes); for a
    photo saved with a palette (a quantised PNG) the indices would show as grey noise, so
    it becomes an RGB(A) image as napari's own reader shows it."""
    if layer[2] != "image" or layer[1].get("rgb"):
        return layer
    from PIL import Image

    with Image.open(path) as img:
        if img.mode not in ("P", "PA"):
            return layer
        has_alpha = img.mode == "PA" or "transparency" in img.info or (
            img.palette is not None and img.palette.mode == "RGBA")
        rgb = np.array(img.convert("RGBA" if has_alpha else "RGB"))
    kwargs = dict(layer[1], rgb=True)
    return rgb, kwargs, "image"


def read_files(path: Any) -> list[LayerData]:
    """Read NIfTI / TIFF / PNG / NPY files (one layer each) and NPZ archives (see
    :func:`read_npz`). A PNG mask (0/255 or 0/1) is a Labels layer (0/1), as the core
    reads it; a photo is an image (RGB in colour).

    Raises:
        RaterSegError: a file that is not what its name says.
    """
    from raterseg.io import read_array

    layers: list[LayerData] = []
    for p in _paths(path):
        if p.lower().endswith(".npz"):
            layers.extend(read_npz(p))
            continue
        arr, meta = read_array(p)
        layer = _array_layer(arr, meta, _stem(p))
        if meta.get("format") == "png":
            layer = _png_colours(p, layer)
        layers.append(layer)
    return layers


def _rater_layers(raters: np.ndarray, names: Sequence[str], scale: tuple[float, ...],
                  meta: dict) -> list[LayerData]:
    """One Labels layer per rater, named after the rater; ``raters`` is ``(R, *S)``."""
    return [(raters[r], unannotated_grey(
                raters[r], {"name": str(names[r]), "scale": scale,
                            "metadata": {IO_META_KEY: meta, "rater": str(names[r])}}),
             "labels") for r in range(raters.shape[0])]


def read_npz(path: str) -> list[LayerData]:
    """An ``.npz``: a multi-rater archive becomes one image and one Labels layer per rater.

    Rater arrays are ``raters`` or ``masks``: ``(R, *S)`` beside an ``image(s)`` of shape
    ``S``, or ``(N, R, *S)`` beside ``images`` ``(N, *S)`` (a dataset such as LIDC's
    ``lidc_dev.npz``; each rater layer is then ``(N, *S)``, cases stacked like slices).
    Any other array becomes its own image or labels layer.
    """
    from raterseg.io import read_array, read_npz

    keys = list(read_npz(path))  # the names only (reading the first array for them read it twice)
    arrays = {k: read_array(path, key=k) for k in keys}
    stem = _stem(path)
    image_key = next((k for k in ("images", "image") if k in arrays), None)
    rater_key = next((k for k in ("raters", "masks") if k in arrays), None)
    layers: list[LayerData] = []
    used: set[str] = set()
    if rater_key is not None:
        raters, meta = arrays[rater_key]
        if raters.dtype.kind == "f":
            from raterseg.datasets import rounded_labels

            # rounded here, for a message that names the array; as_labels then gets integers
            raters = rounded_labels(raters, f"{rater_key} ('{path}')").astype(np.int16)
        raters = as_labels(raters)
        img = arrays[image_key][0] if image_key else None
        if img is not None and raters.ndim == img.ndim + 1 and raters.shape[2:] == img.shape[1:] \
                and raters.shape[0] == img.shape[0] and raters.shape[1:] != img.shape:
            raters = np.moveaxis(raters, 1, 0)  # (N, R, *S) -> (R, N, *S)
        if img is None or raters.shape[1:] == img.shape:
            names = [f"{stem} rater {r}" for r in range(raters.shape[0])]
            if "rater_names" in arrays and len(arrays["rater_names"][0]) == raters.shape[0]:
                names = [str(n) for n in arrays["rater_names"][0]]
                used.add("rater_names")
            if img is not None:
                layers.append((img, {"name": f"{stem} {image_key}",
                                     "scale": _scale(meta, img.ndim)}, "image"))
                used.add(image_key)
            layers.extend(_rater_layers(raters, names, _scale(meta, raters.ndim - 1), meta))
            used.add(rater_key)
    for k in keys:
        if k in used:
            continue
        arr, meta = arrays[k]
        if np.issubdtype(arr.dtype, np.number) or arr.dtype == bool:
            layers.append(_array_layer(arr, meta, f"{stem} {k}"))
    return layers


def read_case_folder(path: Any) -> list[LayerData]:
    """A case folder or an LIDC nodule folder: the image (if any), then one Labels layer per
    rater named after the rater. Voxel spacing becomes every layer's ``scale``.

    Raises:
        RaterSegError: see :func:`raterseg.io.read_case`.
    """
    from raterseg.io import read_case

    case = read_case(_single_path(path))
    nsp = case.raters.ndim - 1
    meta = dict(case.meta)
    scale = _scale(meta, nsp)
    layers: list[LayerData] = []
    name = case.name or Path(_single_path(path)).name
    if case.image is not None:
        img_scale = (1.0,) * (case.image.ndim - nsp) + scale
        layers.append((case.image, {"name": name, "scale": img_scale,
                                    "metadata": {IO_META_KEY: meta}}, "image"))
    layers.extend(_rater_layers(case.raters, case.rater_names, scale, meta))
    return layers


def _is_lidc_nodule(p: Path) -> bool:
    return (p / "images").is_dir() and any(e.is_dir() for e in p.glob("mask-*"))


def is_lidc_folder(path: Any) -> bool:
    """An LIDC-IDRI-slices nodule folder, or a patient folder with exactly one nodule."""
    p = _single_path(path)
    if p is None or not os.path.isdir(p):
        return False
    p = Path(p)
    if _is_lidc_nodule(p):
        return True
    return sum(1 for e in p.iterdir() if e.is_dir() and _is_lidc_nodule(e)) == 1


def is_case_folder(path: Any) -> bool:
    """A folder holding ``rater*`` files or folders (and optionally an ``image.*``)."""
    p = _single_path(path)
    if p is None or not os.path.isdir(p):
        return False
    return any(e.name.lower().startswith("rater") for e in Path(p).iterdir())


# -- npe2 reader contributions ---------------------------------------------------------


def get_nifti_reader(path: Any) -> ReaderFunction | None:
    """``.nii`` / ``.nii.gz`` files; the header's voxel size becomes the layer scale."""
    return read_files if _all_end_with(path, _NIFTI) else None


def get_tiff_reader(path: Any) -> ReaderFunction | None:
    """``.tif`` / ``.tiff`` files (ImageJ z-spacing becomes the layer scale)."""
    return read_files if _all_end_with(path, _TIFF) else None


def _is_png(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_PNG_SIGNATURE)) == _PNG_SIGNATURE
    except OSError:
        return False


def get_png_reader(path: Any) -> ReaderFunction | None:
    """``.png`` files (2D): a mask (0/255 or 0/1, or few values) → a Labels layer, a photo or
    scan → an image (RGB in colour). Files that do not hold a PNG are left to other
    readers."""
    if not _all_end_with(path, _PNG):
        return None
    return read_files if all(_is_png(p) for p in _paths(path)) else None


def get_numpy_reader(path: Any) -> ReaderFunction | None:
    """``.npy`` (one array) and ``.npz`` (multi-rater archives, see :func:`read_npz`)."""
    return read_files if _all_end_with(path, _NUMPY) else None


def get_lidc_reader(path: Any) -> ReaderFunction | None:
    """An LIDC-IDRI-slices nodule folder → a volume and one Labels layer per radiologist."""
    return read_case_folder if is_lidc_folder(path) else None


def get_case_reader(path: Any) -> ReaderFunction | None:
    """A case folder (``image.*`` plus ``rater*.*`` files or ``rater*/`` folders)."""
    return read_case_folder if is_case_folder(path) else None

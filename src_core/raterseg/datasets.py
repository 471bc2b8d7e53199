"""Dataset layouts: case folders, the LIDC-IDRI slice layout, cohorts and ``.npz`` datasets.

A **case folder** holds one image and its raters::

    case/
      image.nii.gz                 (optional; any ending in raterseg.io.SUFFIXES)
      rater1.nii.gz  rater2.nii.gz (files named rater*.* / rater_*.*), or
      rater1/ rater2/              (folders with one label file, or 2D slices
                                    slice-0.png, slice-1.png, ... stacked along D)

Raters are ordered naturally by name (``rater2`` before ``rater10``).

The **LIDC-IDRI-slices** layout (Probabilistic U-Net line of work)::

    LIDC-IDRI-0003/nodule-1/images/slice-K.png
    LIDC-IDRI-0003/nodule-1/mask-0/slice-K.png ... mask-3/slice-K.png   (0/255)

A **cohort** is a folder of case folders and/or LIDC patient folders.

An **.npz dataset** holds ``images`` ``(N, C?, *S)`` and ``raters`` ``(N, R, *S)``, or
LIDC's ``images`` uint8 ``(N, 128, 128)``, ``masks`` bool ``(N, 4, 128, 128)`` and ``ids``.

Label files: bool masks and uint8 masks holding only 0 and 255 (in any format) become
0/1; float files whose values are whole numbers (up to a float round-off of 1e-3, as a
scaled NIfTI gives them) become integers; a NIfTI label map (x, y, z, 1) is the volume
(x, y, z); JPEG labels and colour images are refused (lossy compression changes labels; a
colour has no class number).
The same holds for the raters of an .npz dataset.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .io import SUFFIXES, file_format, is_supported, read_array, read_npz
from .types import RaterSegError

__all__ = [
    "Case",
    "Dataset",
    "case_files",
    "find_cases",
    "iter_cohort",
    "load_cohort",
    "load_npz_dataset",
    "natural_key",
    "read_case",
    "read_labels",
    "read_lidc_nodule",
    "rounded_labels",
    "scan_cohort",
    "split_by_patient",
]

_IMAGE_STEMS = ("image", "images", "img")


@dataclass
class Case:
    """One case read from disk.

    Attributes:
        image: float32 ``(*S)`` or ``(C, *S)``, or None when the folder has no image.
        raters: int16 ``(R, *S)``; -1 where a rater did not annotate.
        rater_names: R names (file or folder names without their ending).
        meta: the image's (else the first rater's) ``meta`` from :func:`raterseg.io.read_array`,
            plus ``rater_paths``; pass it to :func:`raterseg.io.write_result` to keep the geometry.
            An image without geometry (TIFF, .npy, PNG) beside NIfTI raters gives way to the
            first rater's ``meta`` (its affine), with the image's path as ``image_path``.
        name: the case's name (folder name; ``patient/nodule-N`` for LIDC).
    """

    image: np.ndarray | None
    raters: np.ndarray
    rater_names: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""


class Dataset(NamedTuple):
    """Arrays of a dataset: ``images`` ``(N, C?, *S)``, ``raters`` int ``(N, R, *S)``,
    ``ids`` (N,) strings or None."""

    images: np.ndarray
    raters: np.ndarray
    ids: np.ndarray | None


def natural_key(name: str) -> list:
    """Sort key putting ``rater2`` before ``rater10`` and ``slice-9`` before ``slice-10``."""
    # separators are ignored so that rater_1, rater-2 and rater3 sort as one sequence
    return [int(t) if t.isdigit() else re.sub(r"[_\-\s]", "", t.lower())
            for t in re.split(r"(\d+)", str(name))]


def _stem(path: Path) -> str:
    name = path.name
    low = name.lower()
    for suf in SUFFIXES:
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def distinct_names(paths: Sequence[str | os.PathLike], names: list[str],
                    sep: str = "/") -> list[str]:
    """``names`` (one per path) made distinct: names that several files share become their
    parent folder's name (alice/mask.nii.gz, bob/mask.nii.gz: alice, bob), else
    ``parent<sep>name``, else the same with more of the folders above (site A and B's
    case00/image.nii.gz: ``A<sep>case00``), else get a number (``name_2``). A folder (a
    case folder, named by itself) always keeps its name after its parents': site A/case00
    and B/case00 are ``A<sep>case00``, ``B<sep>case00`` (A and B would name whole sites)."""
    def shared(ns: list[str]) -> set[str]:
        return {n for n in ns if ns.count(n) > 1}

    clash = shared(names)
    if not clash:
        return list(names)
    above = [Path(os.path.abspath(p)).parent.parts[1:] for p in paths]  # folder names
    folders = [Path(p).is_dir() for p in paths]

    def trial(depth: int, with_name: bool) -> list[str]:
        return [sep.join([*up[-depth:], *([n] if with_name or folder else [])])
                if n in clash and up else n for n, up, folder in zip(names, above, folders)]

    for depth in (1, 2, 3):
        for with_name in (False, True):
            names_tried = trial(depth, with_name)
            if not shared(names_tried):
                return names_tried
    out: list[str] = []
    for n in names:
        name, k = n, 2
        while name in out or (name != n and name in names):
            name, k = f"{n}_{k}", k + 1
        out.append(name)
    return out


def _entries(folder: Path) -> list[Path]:
    return sorted((e for e in folder.iterdir() if not e.name.startswith(".")),
                  key=lambda e: natural_key(e.name))


def _check_folder(folder: str | os.PathLike, argname: str) -> Path:
    p = Path(folder)
    if not p.exists():
        raise RaterSegError(f"{argname}: no such folder '{p}'")
    if not p.is_dir():
        raise RaterSegError(f"{argname}: expected a folder, got the file '{p}'")
    return p


# -- labels ----------------------------------------------------------------------------


def check_same_grid(named_metas: Sequence[tuple[str, dict]], argname: str) -> None:
    """Files with a voxel-to-world affine (NIfTI) must share it, to a thousandth of a voxel:
    otherwise equal array indices are different places (a flipped axis, a shift) and fusing
    voxel by voxel is wrong. raterseg does not resample; SimpleITK's STAPLE filters refuse
    such inputs too.

    Raises:
        RaterSegError: ``argname``, naming the two files (for ``image`` / ``--image``, the
            image against a rater: either can be resampled).
    """
    ref: tuple[str, np.ndarray] | None = None
    for name, meta in named_metas:
        if meta.get("affine") is None:
            continue
        affine = np.asarray(meta["affine"], dtype=np.float64)
        if ref is None:
            ref = (name, affine)
            continue
        voxel = float(np.linalg.norm(ref[1][:3, :3], axis=0).min()) or 1.0
        diff = float(np.abs(affine - ref[1]).max())
        if diff > 1e-3 * voxel:
            what = "the image or the labels" if argname.lstrip("-") == "image" else "the labels"
            raise RaterSegError(
                f"{argname}: '{name}' lies on another voxel grid than '{ref[0]}' (their NIfTI "
                f"affines differ by up to {diff:.3g}); resample {what} onto one grid first")


def _as_labels(arr: np.ndarray, meta: dict, argname: str) -> np.ndarray:
    """Rater labels as int16 (int32 for >= 32000 classes), with the conversions above."""
    where = f"{argname} ('{meta.get('path', '?')}')"
    fmt = meta.get("format")
    if fmt == "jpeg":
        raise RaterSegError(f"{where}: expected a lossless label file (PNG, TIFF, NIfTI, NPY); "
                            "JPEG compression changes labels")
    if meta.get("channels_moved_first"):
        raise RaterSegError(f"{where}: expected a label map with one value per pixel, got a "
                            f"colour image ({arr.shape[0]} channels); save the mask as a "
                            "grayscale or indexed (palette) image")
    return _integer_labels(arr, where)


#: Label files: a float value this close to a whole number is that number. Scaled or float
#: files hold labels up to float round-off: a uint8 0/255 mask with ``scl_slope`` 1/255
#: reads as 1.0000000591 (the slope is stored as float32), a float32 label 0.99999994.
LABEL_ROUNDOFF = 1e-3


def rounded_labels(arr: np.ndarray, where: str) -> np.ndarray:
    """A float label array with its values rounded to whole numbers (integer arrays are
    returned as they are).

    Raises:
        RaterSegError: a value that is not finite or farther than :data:`LABEL_ROUNDOFF`
            from a whole number (``where``: "expected integer class labels, got the value
            0.5").
    """
    if arr.dtype.kind != "f":
        return arr
    whole = np.round(arr)
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(arr - whole) <= LABEL_ROUNDOFF)  # NaN and inf fail the comparison
    if bad.any():
        raise RaterSegError(f"{where}: expected integer class labels, got the value "
                            f"{arr.flat[int(np.argmax(bad))]}")
    return whole


def is_0_255_mask(arr: np.ndarray) -> bool:
    """Whether ``arr`` (any numeric dtype) holds only 0 and 255 (and -1, not annotated), with
    some 255: a binary mask as image tools save it (uint8 PNG/TIFF, but also int16 or float
    NIfTI from Slicer or ITK), which taken as classes 0..255 would make 256-class
    probability maps. ``arr // 255`` maps it to 0/1, keeping -1."""
    if not arr.size or arr.max() != 255:
        return False
    return only_0_255(arr)


def only_0_255(arr: np.ndarray) -> bool:
    """Whether every value of ``arr`` is 0, 255 or -1 (:func:`is_0_255_mask` without
    asking for a 255: a slab of a mask file may hold none)."""
    return bool(((arr == 0) | (arr == 255) | (arr == -1)).all())


def _integer_labels(arr: np.ndarray, where: str) -> np.ndarray:
    """bool → 0/1, a 0/255 mask → 0/1, whole-number floats (to :data:`LABEL_ROUNDOFF`)
    → integers; int16 (int32
    for >= 32000 classes). Refuses fractional or non-finite values, non-numeric dtypes and
    values below -1."""
    if arr.dtype == bool:
        return arr.astype(np.int16)
    if arr.dtype.kind == "f":
        arr = rounded_labels(arr, where)
    elif arr.dtype.kind not in "iu":
        raise RaterSegError(f"{where}: expected integer class labels, got dtype {arr.dtype}")
    if is_0_255_mask(arr):  # PNG, TIFF and NIfTI masks alike, whatever the dtype
        arr = arr // 255
    hi = float(arr.max()) if arr.size else 0.0
    lo = float(arr.min()) if arr.size else 0.0
    if lo < -1:
        raise RaterSegError(f"{where}: expected labels >= -1 (-1 = not annotated), got {lo:g}")
    return arr.astype(np.int16 if hi < 32000 else np.int32)


def _read_slices(files: list[Path], argname: str) -> tuple[np.ndarray, dict]:
    arrays, metas = [], []
    for f in files:
        a, m = read_array(f, argname=argname)
        if a.ndim != 2:
            raise RaterSegError(f"{argname}: expected 2D slices in '{f.parent}', got shape "
                                f"{a.shape} in '{f.name}'")
        arrays.append(a)
        metas.append(m)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise RaterSegError(f"{argname}: expected slices of one shape in '{files[0].parent}', "
                            f"got shapes {sorted(shapes)}")
    meta = dict(metas[0], path=str(files[0].parent), slices=[f.name for f in files],
                spacing=(1.0, *metas[0]["spacing"]))
    return np.stack(arrays), meta


def _read_any(path: Path, argname: str, labels: bool = False) -> tuple[np.ndarray, dict]:
    """A file, a folder holding one file, or a folder of 2D slices. ``labels``: an
    ``.npz`` holding an image and raters gives its raters (:func:`raterseg.io.npz_key`)."""
    if not path.is_dir():
        return read_array(path, argname=argname, labels=labels)
    files = [e for e in _entries(path) if e.is_file() and is_supported(e)]
    if not files:
        raise RaterSegError(f"{argname}: expected label or image files in the folder '{path}', "
                            f"found none with an ending in {', '.join(SUFFIXES)}")
    if len(files) == 1:
        return read_array(files[0], argname=argname, labels=labels)
    return _read_slices(files, argname)


def read_labels(path: str | os.PathLike, argname: str = "raters") -> tuple[np.ndarray, dict]:
    """One rater's label map from a file or a folder (one file, or 2D slices stacked along D).

    A NIfTI file of shape (x, y, z, 1) (a 4th axis of one volume) reads as (x, y, z), i.e.
    the array ``(z, y, x)``.

    Returns:
        ``(labels, meta)``: int16 ``(*S)`` and the file's ``meta``.

    Raises:
        RaterSegError: unreadable file, non-integer labels, JPEG labels.
    """
    p = Path(path)
    if not p.exists():
        raise RaterSegError(f"{argname}: no such file or folder '{p}'")
    arr, meta = _read_any(p, argname, labels=True)
    if meta.get("format") == "nifti" and arr.ndim > 3 and arr.shape[0] == 1:
        # a NIfTI (x, y, z, 1) (reads as (1, z, y, x)): one volume, as tools save label maps
        while arr.ndim > 3 and arr.shape[0] == 1:
            arr = arr[0]
        meta = dict(meta, spacing=tuple(meta["spacing"])[-arr.ndim:])
    return _as_labels(arr, meta, argname), meta


def read_image(path: str | os.PathLike, argname: str = "image") -> tuple[np.ndarray, dict]:
    """An image as float32 from a file or a folder of 2D slices, with its ``meta``."""
    p = Path(path)
    if not p.exists():
        raise RaterSegError(f"{argname}: no such file or folder '{p}'")
    arr, meta = _read_any(p, argname)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise RaterSegError(f"{argname}: expected numeric data in '{p}', got dtype {arr.dtype}")
    return arr.astype(np.float32), meta


#: Said where NIfTI files meet files without geometry whose shapes are each other's reverse.
AXES_HINT = ("axes reversed? raterseg reads NIfTI (x, y, z) as arrays (z, y, x); save .npy "
             "from nibabel with .T")


def axes_reversed(items: Sequence[tuple[tuple[int, ...], dict]]) -> bool:
    """Whether, among ``(shape, meta)`` items, a NIfTI file and a file without NIfTI
    geometry have shapes that are each other's reverse (an array saved from nibabel
    without ``.T``)."""
    nifti = {tuple(s) for s, m in items if m.get("format") == "nifti"}
    other = {tuple(s) for s, m in items if m.get("format") != "nifti"}
    return any(len(a) > 1 and a != b and a == b[::-1] for a in nifti for b in other)


def _stack_raters(labels: list[np.ndarray], names: list[str], folder: Path,
                  metas: Sequence[dict] = ()) -> np.ndarray:
    shapes = [a.shape for a in labels]
    if len(set(shapes)) != 1:
        listing = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        hint = f" ({AXES_HINT})" if axes_reversed(list(zip(shapes, metas))) else ""
        raise RaterSegError(f"raters: expected every rater in '{folder}' to have the same "
                            f"shape, got {listing}{hint}")
    dtype = np.int32 if any(a.dtype == np.int32 for a in labels) else np.int16
    return np.stack(labels).astype(dtype, copy=False)


def _match_image(image: np.ndarray, raters: np.ndarray, where: str) -> np.ndarray:
    """Raters, with a singleton D axis dropped when the image is 2D (tools such as 3D
    Slicer save 2D label maps as NIfTI volumes one slice deep).

    Raises:
        RaterSegError: the image's shape is neither ``S`` nor ``(C, *S)``.
    """
    S = raters.shape[1:]
    if len(S) == 3 and S[0] == 1 and image.shape[-2:] == S[1:] and image.ndim <= 3 \
            and image.shape != S:
        raters, S = raters[:, 0], S[1:]
    if image.shape != S and image.shape[1:] != S:
        channels = "(C, " + ", ".join(str(n) for n in S) + ")"
        raise RaterSegError(f"image ('{where}'): expected shape {S} or {channels} to match the "
                            f"raters, got {image.shape} (array order: a NIfTI file's (x, y, z) "
                            "is read as (z, y, x))")
    return raters


# -- case folders ----------------------------------------------------------------------


def _is_lidc_nodule(p: Path) -> bool:
    return (p / "images").is_dir() and any(p.glob("mask-*"))


def outputs_geometry(image_meta: dict, rater_meta: dict, ndim: int) -> dict:
    """The ``meta`` whose geometry a case's outputs carry: the image's, unless its file has
    none (TIFF, .npy, PNG) and the raters' (NIfTI) has; then the raters' affine and header
    (the image's would be 1 mm at the origin), with the spacing of the ``ndim`` spatial
    axes and the image's path as ``image_path``."""
    if image_meta.get("affine") is not None or rater_meta.get("affine") is None:
        return image_meta
    return {**rater_meta, "image_path": image_meta.get("path"),
            "spacing": tuple(rater_meta["spacing"])[-ndim:]}


def read_case(folder: str | os.PathLike) -> Case:
    """Read a case folder (layout in the module docstring); an LIDC nodule folder works too.

    Raises:
        RaterSegError: no raters, several image files, raters or image of different
            shapes, unreadable or non-label files.
    """
    p = _check_folder(folder, "folder")
    if _is_lidc_nodule(p) or any(p.glob("nodule-*")):
        return read_lidc_nodule(p)
    entries = _entries(p)
    image_paths, rater_paths = _case_paths(entries)
    if not rater_paths:
        raise RaterSegError(
            f"folder: expected rater files (rater*.nii.gz, rater_*.png, ...) or rater*/ folders "
            f"in '{p}', found none among {[e.name for e in entries][:20]}"
        )
    if len(image_paths) > 1:
        raise RaterSegError(f"folder: expected at most one image in '{p}', got "
                            f"{[e.name for e in image_paths]}")
    names = [_stem(e) for e in rater_paths]
    if len(set(names)) != len(names):
        raise RaterSegError(f"folder: two raters share a name in '{p}': {names}")
    labels, metas = zip(*(read_labels(e) for e in rater_paths))
    raters = _stack_raters(list(labels), names, p, metas)
    check_same_grid([(str(e), m) for e, m in zip(rater_paths, metas)], "raters")
    image, meta = None, dict(metas[0])
    if image_paths:
        image, image_meta = read_image(image_paths[0])
        raters = _match_image(image, raters, str(image_paths[0]))
        check_same_grid([(str(rater_paths[0]), metas[0]), (str(image_paths[0]), image_meta)],
                        "image")
        meta = outputs_geometry(image_meta, meta, raters.ndim - 1)
    meta["rater_paths"] = [str(e) for e in rater_paths]
    return Case(image=image, raters=raters, rater_names=names, meta=meta, name=p.name)


def _case_paths(entries: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(image paths, rater paths)`` among a case folder's entries: files with a supported
    ending, or folders, named ``image.*`` (``images``, ``img``) and ``rater*``."""
    image_paths = [e for e in entries if _stem(e).lower() in _IMAGE_STEMS
                   and (e.is_dir() or is_supported(e))]
    rater_paths = [e for e in entries if e.name.lower().startswith("rater")
                   and (e.is_dir() or is_supported(e))]
    return image_paths, rater_paths


def case_files(folder: str | os.PathLike) -> list[Path]:
    """The files :func:`read_case` reads for the case folder ``folder`` (and the files a
    rater added to it would be read from), in a fixed order: the image and rater files,
    the files with a supported ending inside ``image/`` and ``rater*/`` folders; for an
    LIDC nodule (or a patient folder of nodules), those of ``images/`` and ``mask-*/``.
    Never raises for a missing or unreadable folder (returns what it could list)."""
    p = Path(folder)

    def inside(d: Path) -> list[Path]:
        try:
            return [e for e in _entries(d) if e.is_file() and is_supported(e)]
        except OSError:
            return []

    try:
        if _is_lidc_nodule(p) or any(p.glob("nodule-*")):
            nodules = [p] if _is_lidc_nodule(p) else \
                [e for e in _entries(p) if e.is_dir() and _is_lidc_nodule(e)]
            return [f for n in nodules
                    for d in [n / "images", *sorted((e for e in n.glob("mask-*") if e.is_dir()),
                                                    key=lambda e: natural_key(e.name))]
                    for f in inside(d)]
        image_paths, rater_paths = _case_paths(_entries(p))
    except OSError:
        return []
    return [f for e in image_paths + rater_paths for f in (inside(e) if e.is_dir() else [e])]


def _slice_number(path: Path) -> int:
    nums = re.findall(r"\d+", _stem(path))
    if not nums:
        raise RaterSegError(f"folder: expected slice files named slice-K.png, got '{path}'")
    return int(nums[-1])


def read_lidc_nodule(folder: str | os.PathLike) -> Case:
    """Read one nodule of the LIDC-IDRI-slices layout.

    Args:
        folder: ``<patient>/nodule-N`` (with ``images/`` and ``mask-0..mask-3/``), or a
            patient folder holding exactly one nodule.

    Returns:
        :class:`Case` with ``image`` float32 ``(K, H, W)`` (slices sorted by K),
        ``raters`` int16 ``(R, K, H, W)`` (0/1; -1 where a mask folder lacks a slice),
        ``rater_names`` ``["mask-0", ...]``, ``name`` ``"<patient>/nodule-N"``.

    Raises:
        RaterSegError: not this layout, several nodules, no slices, unreadable PNGs.
    """
    p = _check_folder(folder, "folder")
    if not _is_lidc_nodule(p):
        nodules = [e for e in _entries(p) if e.is_dir() and _is_lidc_nodule(e)]
        if len(nodules) != 1:
            found = [e.name for e in nodules]
            raise RaterSegError(
                f"folder: expected an LIDC nodule folder (images/ and mask-*/) or a patient "
                f"folder with one nodule, got '{p}' with {len(found)} nodules {found[:10]}"
            )
        p = nodules[0]
    slices = sorted((e for e in (p / "images").iterdir()
                     if e.is_file() and not e.name.startswith(".") and is_supported(e)),
                    key=_slice_number)
    if not slices:
        raise RaterSegError(f"folder: expected slice-K.png files in '{p / 'images'}', found none")
    image, meta = _read_slices(slices, "folder")
    mask_dirs = sorted((e for e in p.glob("mask-*") if e.is_dir()), key=lambda e: natural_key(e.name))
    raters = np.full((len(mask_dirs),) + image.shape, -1, dtype=np.int16)
    for r, d in enumerate(mask_dirs):
        for k, s in enumerate(slices):
            f = d / s.name
            if f.exists():
                m, _ = read_array(f, argname="folder")
                if m.shape != image.shape[1:]:
                    raise RaterSegError(f"folder: expected {image.shape[1:]} masks, got "
                                        f"{m.shape} in '{f}'")
                raters[r, k] = m > 0
    meta.update(format="lidc-slices", path=str(p), rater_paths=[str(d) for d in mask_dirs])
    return Case(image=image.astype(np.float32), raters=raters,
                rater_names=[d.name for d in mask_dirs], meta=meta,
                name=f"{p.parent.name}/{p.name}")


# -- cohorts ---------------------------------------------------------------------------


def _looks_like_case(p: Path) -> bool:
    """Whether ``p`` holds rater label files (``rater*`` with an ending in
    :data:`~raterseg.io.SUFFIXES`) or ``rater*/`` folders holding such files: a
    ``raters.csv``, ``rater_notes.txt`` or ``raters_docs/`` beside the cases does not make
    a cohort folder one case."""
    return any(not e.is_dir() or any(f.is_file() and is_supported(f) for f in _entries(e))
               for e in _case_paths(_entries(p))[1])


def _why_not_a_case(p: Path) -> str:
    """Why the sub-folder ``p`` of a cohort is no case (for :func:`scan_cohort`)."""
    try:
        names = [e.name + ("/" if e.is_dir() else "") for e in _entries(p)]
    except OSError as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if not names:
        return "empty folder"
    listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return f"no rater* label files or rater*/ folders (found {listing})"


def scan_cohort(folder: str | os.PathLike,
                argname: str = "folder") -> tuple[list[Path], list[tuple[Path, str]]]:
    """:func:`find_cases`, and the sub-folders of ``folder`` that are no case.

    Returns:
        ``(cases, ignored)``: the case folders, in natural order, and ``(folder, reason)``
        for each sub-folder of ``folder`` that holds no case (no rater* label files: an
        image alone, masks named ``seg1.nii.gz``, an empty folder, ...). Hidden folders
        (``.name``) are neither.

    Raises:
        RaterSegError: ``folder`` (named ``argname``) is missing or holds no case (the
            message names the ignored folders and why).
    """
    p = _check_folder(folder, argname)
    if _is_lidc_nodule(p) or _looks_like_case(p):
        return [p], []
    found: list[Path] = []
    ignored: list[tuple[Path, str]] = []
    for e in _entries(p):
        if not e.is_dir():
            continue
        if _is_lidc_nodule(e) or _looks_like_case(e):
            found.append(e)
            continue
        nodules = [n for n in _entries(e) if n.is_dir() and _is_lidc_nodule(n)]
        if nodules:
            found.extend(nodules)
        else:
            ignored.append((e, _why_not_a_case(e)))
    if not found:
        why = "".join(f"; '{d.name}': {r}" for d, r in ignored[:5])
        raise RaterSegError(
            f"{argname}: expected a cohort (folders each holding image.* and rater* files, or "
            f"LIDC patient/nodule-N folders) in '{p}', found no case{why}"
        )
    return found, ignored


def find_cases(folder: str | os.PathLike, argname: str = "folder") -> list[Path]:
    """Case folders of a cohort, in natural order: case folders, LIDC nodule folders
    (also inside patient folders), or ``folder`` itself when it is one case. A case
    folder holds ``rater*`` label files or ``rater*/`` folders; :func:`scan_cohort` also
    lists the sub-folders that are no case, and why.

    Raises:
        RaterSegError: ``folder`` (named ``argname``) is missing or holds no case.
    """
    return scan_cohort(folder, argname)[0]


def iter_cohort(folder: str | os.PathLike) -> Iterator[Case]:
    """Read the cases of a cohort one at a time (see :func:`find_cases`)."""
    root = Path(folder)
    for case_dir in find_cases(root):
        case = read_case(case_dir)
        if case.meta.get("format") != "lidc-slices":
            case.name = str(case_dir.relative_to(root)) if case_dir != root else case_dir.name
        yield case


def load_cohort(folder: str | os.PathLike) -> list[Case]:
    """Every case of a cohort as a list (see :func:`iter_cohort` to stream them)."""
    return list(iter_cohort(folder))


# -- .npz datasets ---------------------------------------------------------------------


def load_npz_dataset(path: str | os.PathLike, argname: str = "path") -> Dataset:
    """Read an ``.npz`` dataset (never unpickles).

    Keys: ``images`` ``(N, C?, *S)`` and ``raters`` int ``(N, R, *S)`` (or LIDC's ``masks``
    bool ``(N, R, *S)``, returned as int8 0/1 raters); ``ids`` optional. Images keep their
    stored dtype (LIDC's uint8 uses a quarter of the memory of float32).

    Args:
        argname: how messages name ``path`` (``raterseg train`` calls it ``DATA``).

    Raises:
        RaterSegError: missing keys, N or spatial shapes that disagree, non-integer raters.
    """
    p = Path(path)
    if file_format(p, argname) != "npz":
        raise RaterSegError(f"{argname}: expected an .npz file, got '{p}'")
    keys = list(read_npz(p, argname=argname))
    img_key = next((k for k in ("images", "image") if k in keys), None)
    rat_key = next((k for k in ("raters", "masks", "labels") if k in keys), None)
    if img_key is None or rat_key is None:
        raise RaterSegError(f"{argname}: expected arrays 'images' and 'raters' (or 'masks') in "
                            f"'{p}', got keys {keys}")
    arrays = read_npz(p, [img_key, rat_key] + (["ids"] if "ids" in keys else []),
                      argname=argname)
    images, raters, ids = arrays[img_key], arrays[rat_key], arrays.get("ids")
    if raters.dtype == bool:
        raters = raters.astype(np.int8)
    elif raters.dtype.kind == "f" or raters.dtype == np.uint8:  # as for label files
        raters = _integer_labels(raters, f"{argname}: {rat_key!r} in '{p}'")
        if raters.size and -1 <= raters.min() and raters.max() < 128:
            raters = raters.astype(np.int8)  # the memory of the stored uint8
    elif raters.dtype.kind not in "iu":
        raise RaterSegError(f"{argname}: expected integer labels under {rat_key!r} in '{p}', "
                            f"got dtype {raters.dtype}")
    n = raters.shape[0]
    S = raters.shape[2:]
    if raters.ndim not in (4, 5):
        raise RaterSegError(f"{argname}: expected {rat_key!r} of shape (N, R, *S) with S 2D or "
                            f"3D in '{p}', got {raters.shape}")
    if images.shape[0] != n or (images.shape[1:] != S and images.shape[2:] != S):
        raise RaterSegError(f"{argname}: expected 'images' of shape ({n}, C?, *{S}) to match "
                            f"{rat_key!r} {raters.shape} in '{p}', got {images.shape}")
    if ids is not None and ids.shape != (n,):
        raise RaterSegError(f"{argname}: expected 'ids' of shape ({n},) in '{p}', got "
                            f"{ids.shape}")
    return Dataset(images=images, raters=raters, ids=ids)


def split_by_patient(ids: Sequence[str], fractions: Sequence[float] = (0.7, 0.1, 0.2),
                     seed: int = 0) -> tuple[np.ndarray, ...]:
    """Split case indices so that no patient is in two parts.

    The patient is the part of an id before the first "/" (LIDC:
    ``"LIDC-IDRI-0001/nodule-0/slice-3.png"`` → ``"LIDC-IDRI-0001"``). Patients are
    shuffled with ``seed`` and dealt out so each part gets its fraction of the
    patients (largest remainders first, and at least one patient for every non-zero
    fraction when there are enough patients).

    Returns:
        One sorted int index array per fraction (e.g. train, validation, test).

    Raises:
        RaterSegError: fractions negative or not summing to 1, no ids.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise RaterSegError(f"fractions: expected non-negative numbers summing to 1, "
                            f"got {tuple(fractions)}")
    ids = [str(i) for i in np.asarray(ids).reshape(-1)]
    if not ids:
        raise RaterSegError("ids: expected at least one id, got none")
    patient_of = [i.split("/", 1)[0] for i in ids]
    patients = sorted(set(patient_of), key=natural_key)
    order = np.random.default_rng(seed).permutation(len(patients))
    P = len(patients)
    counts = np.floor(fr * P).astype(int)
    rest = P - counts.sum()
    for j in np.argsort(-(fr * P - counts), kind="stable")[:rest]:
        counts[j] += 1
    for j in np.flatnonzero((fr > 0) & (counts == 0)):  # keep every wanted part non-empty
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[j] += 1
    part_of_patient = {}
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for part in range(len(fr)):
        for k in order[bounds[part]:bounds[part + 1]]:
            part_of_patient[patients[k]] = part
    which = np.array([part_of_patient[pt] for pt in patient_of])
    return tuple(np.flatnonzero(which == part) for part in range(len(fr)))

"""File formats: read and write label maps, images and fusion results.

Formats, chosen by the file name's ending:

========================  ==============================================================
``.nii``, ``.nii.gz``     NIfTI-1/2 (nibabel). Array axes are the **reverse** of the
                          NIfTI axes: a volume stored as (x, y, z) reads as (D, H, W) =
                          (z, y, x); a 4D (x, y, z, t) file reads as (t, z, y, x),
                          channels first. This is the axis order of SimpleITK's
                          ``GetArrayFromImage``, of TIFF stacks and of numpy, so a volume
                          read from NIfTI and from TIFF agree. No reorientation: the voxels
                          stay in the file's orientation; ``meta["affine"]`` and
                          ``meta["header"]`` keep the geometry and ``write_array`` writes it
                          back, so read → write → read is exact.
``.tif``, ``.tiff``       TIFF (tifffile), axes as stored: (H, W), (D, H, W), ...;
                          RGB TIFFs (interleaved samples) as PNG colour: grey in RGB
                          reads as one channel, other colour images channels first
                          (C, H, W); RGB in separate planes stays (C, H, W). Files that
                          tifffile wrote with its defaults (any (..., 3|4) array is "RGB"
                          there) are read as stored, except a uint8 (H, W, 3|4) read as
                          an image (a photo). Spacing: the
                          XResolution/YResolution tags for (y, x) (cm units in mm; dpi
                          ignored; ImageJ files in their own unit, with ImageJ's z spacing).
``.npy``                  numpy, read with ``allow_pickle=False``.
``.npz``                  numpy archive; the array under ``key``, else the first of
                          :data:`NPZ_IMAGE_KEYS` then :data:`NPZ_LABEL_KEYS` (with
                          ``labels=True``: label keys first, then the first array that is
                          not an image), else the first array.
``.png``, ``.jpg``        2D images (Pillow); colour images become channels first
                          (3 or 4, H, W); RGB files whose channels are equal read as (H, W).
========================  ==============================================================

Reading never executes anything the file contains (no pickle). Writing goes to a
temporary file in the target folder which is then renamed over the target, so a
crash never leaves a half-written file under the final name. Every failure a
user can cause raises :class:`~raterseg.types.RaterSegError` naming the path.

Case folders and dataset layouts (:func:`read_case`, :func:`read_lidc_nodule`)
live in :mod:`raterseg.datasets` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import csv
import io as _pyio
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .types import FusionResult, RaterSegError

if TYPE_CHECKING:  # resolved lazily by __getattr__ at the end of this module
    from .datasets import Case, read_case, read_image, read_labels, read_lidc_nodule

__all__ = [
    "NPZ_IMAGE_KEYS",
    "NPZ_LABEL_KEYS",
    "SUFFIXES",
    "Case",
    "file_format",
    "is_supported",
    "npz_data_keys",
    "npz_key",
    "read_array",
    "read_case",
    "read_image",
    "read_labels",
    "read_lidc_nodule",
    "read_npz",
    "write_array",
    "write_result",
]

#: File endings understood by :func:`read_array` / :func:`write_array`, and their format.
SUFFIXES: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".tiff": "tiff",
    ".tif": "tiff",
    ".npy": "npy",
    ".npz": "npz",
    ".png": "png",
    ".jpeg": "jpeg",
    ".jpg": "jpeg",
}
#: ``.npz`` keys of an image, and of label maps (raters), in the order they are chosen.
NPZ_IMAGE_KEYS = ("images", "image", "img")
NPZ_LABEL_KEYS = ("raters", "labels", "label", "masks", "mask", "seg", "segmentation")


def npz_key(keys: Sequence[str], *, labels: bool = False,
            arrays: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> str:
    """The array :func:`read_array` reads from an ``.npz`` holding ``keys`` when no ``key``
    is given: an image key, then the first array that is not a label (an archive holding
    ``vol`` and ``masks`` is read as its image ``vol``); with ``labels`` a label key, then
    the first array that is not an image (an archive holding ``image`` and ``raters`` is
    read as its raters). Else the first array. With ``arrays`` (each key's shape and
    dtype), side arrays (:func:`npz_data_keys`) are passed over while another exists.

    Raises:
        RaterSegError: ``keys`` is empty.
    """
    if not keys:
        raise RaterSegError("key: expected at least one array in the archive, got none")
    if arrays is not None:
        keys = npz_data_keys(keys, arrays) or list(keys)
    if labels:
        order = [*NPZ_LABEL_KEYS, *(k for k in keys if k not in NPZ_IMAGE_KEYS)]
    else:
        order = [*NPZ_IMAGE_KEYS, *(k for k in keys if k not in NPZ_LABEL_KEYS)]
    return next((k for k in order if k in keys), keys[0])


def npz_data_keys(keys: Sequence[str],
                  arrays: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[str]:
    """The keys that hold images or label maps rather than side data: numeric arrays of at
    least 2 dimensions and at least 1/16 the size of the largest (names, ids, a spacing or
    a 4×4 affine stored beside a volume are side data)."""
    def size(k: str) -> int:
        return int(np.prod(arrays[k][0]))

    numeric = [k for k in keys if k in arrays and len(arrays[k][0]) >= 2
               and (np.issubdtype(arrays[k][1], np.number) or arrays[k][1] == bool)]
    largest = max((size(k) for k in numeric), default=0)
    return [k for k in numeric if size(k) * 16 >= largest]


def npz_headers(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype in an ``.npz`` archive, from the headers alone (no data
    read, nothing unpickled); arrays whose header cannot be read are left out."""
    import zipfile

    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(str(path)) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as fh:
                    try:
                        version = np.lib.format.read_magic(fh)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(fh)
                    except ValueError:
                        continue
                out[name[:-4]] = (tuple(shape), np.dtype(dtype))
    except (OSError, zipfile.BadZipFile):
        return {}
    return out


def _suffix(path: str | os.PathLike) -> str | None:
    name = Path(path).name.lower()
    for suf in SUFFIXES:  # longest first: ".nii.gz" before ".nii"
        if name.endswith(suf):
            return suf
    return None


def is_supported(path: str | os.PathLike) -> bool:
    """Whether ``path``'s ending is one of :data:`SUFFIXES`."""
    return _suffix(path) is not None


def file_format(path: str | os.PathLike, argname: str = "path") -> str:
    """The format name ("nifti", "tiff", "npy", "npz", "png", "jpeg") for ``path``.

    Raises:
        RaterSegError: the ending is not one of :data:`SUFFIXES`.
    """
    suf = _suffix(path)
    if suf is None:
        raise RaterSegError(
            f"{argname}: expected a file ending in one of {', '.join(SUFFIXES)}, got '{path}'"
        )
    return SUFFIXES[suf]


# -- reading ---------------------------------------------------------------------------


def read_array(path: str | os.PathLike, *, key: str | None = None, labels: bool = False,
               argname: str = "path") -> tuple[np.ndarray, dict[str, Any]]:
    """Read one array from a file.

    Args:
        path: a file whose ending is in :data:`SUFFIXES` (see the module docstring for
            each format's axis order).
        key: for ``.npz``, the array to read (default: :func:`npz_key`).
        labels: for ``.npz`` without ``key``, prefer label keys (``raters``, ``labels``,
            ``masks``, ...) over image keys.

    Returns:
        ``(array, meta)``. ``meta`` is a dict with ``path``, ``format``, ``spacing`` (one
        float per array axis, 1.0 where unknown) and, for NIfTI, ``affine`` (4×4) and
        ``header`` (a nibabel header copy); for ``.npz`` the chosen ``key`` and all ``keys``.

    Raises:
        RaterSegError: missing file, unknown ending, or a file that is not what its name
            says (corrupt, wrong format, pickled objects).
    """
    p = Path(path)
    fmt = file_format(p, argname)
    if not p.exists():
        raise RaterSegError(f"{argname}: no such file '{p}'")
    if p.is_dir():
        raise RaterSegError(f"{argname}: expected a {fmt} file, got the folder '{p}'")
    readers = {"nifti": _read_nifti, "tiff": lambda p: _read_tiff(p, labels),
               "png": _read_2d, "jpeg": _read_2d,
               "npy": lambda p: _read_npy(p, argname),
               "npz": lambda p: _read_npz(p, key, argname, labels)}
    try:
        arr, meta = readers[fmt](p)
    except RaterSegError:
        raise
    except Exception as err:  # noqa: BLE001 - any parser failure: not what its name says
        raise RaterSegError(
            f"{argname}: '{p}' is not a readable {fmt} file as its name says ({_reason(err)})"
        ) from None
    meta = {"path": str(p), "format": fmt, **meta}
    meta.setdefault("spacing", (1.0,) * arr.ndim)
    return arr, meta


def _reason(err: BaseException) -> str:
    """One line describing a library's exception (some span many lines)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _check_magic(p: Path, magics: tuple[bytes, ...], what: str) -> None:
    with open(p, "rb") as fh:
        head = fh.read(8)
    if not head.startswith(magics):
        raise ValueError(f"it does not start like {what} (first bytes {head!r})")


def _read_nifti(p: Path):
    import nibabel as nib

    img = nib.load(str(p))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"nibabel reads it as {type(img).__name__}, not NIfTI")  # noqa: TRY004
    data = np.asanyarray(img.dataobj)  # applies scl_slope / scl_inter when set
    arr = np.ascontiguousarray(data.T)  # (x, y, z, ...) -> (..., z, y, x)
    zooms = tuple(float(z) for z in img.header.get_zooms())[: data.ndim]
    zooms = zooms + (1.0,) * (data.ndim - len(zooms))
    return arr, {"affine": np.array(img.affine, dtype=np.float64),
                 "header": img.header.copy(), "spacing": tuple(reversed(zooms))}


#: TIFF ResolutionUnit → millimetres per unit (1 = none: the resolution is pixels per
#: whatever unit, taken as it is; 4 and 5 are tifffile's millimetre and micrometre).
#: Inch (2, also the default when the tag is absent) is left out: image editors write
#: 72/96/300 dpi, a print setting rather than a pixel size, and masks and images saved by
#: different programs would then disagree in scale (as PNG's pHYs, it is ignored).
_TIFF_UNIT_MM = {1: 1.0, 3: 10.0, 4: 1.0, 5: 1e-3}
#: TIFF Photometric values of colour images: RGB, and YCbCr (JPEG-compressed RGB, which
#: tifffile decodes to RGB).
_TIFF_COLOUR = (2, 6)


def _tiff_pixel_size(page, imagej: bool) -> tuple[float, float] | None:
    """``(y, x)`` pixel size from the XResolution / YResolution tags (pixels per unit);
    None without usable tags or in inches (dots per inch). In millimetres for centimetre
    units; in the file's own unit for ImageJ files (whose z spacing is in that unit) and
    for unit "none"."""
    tags = page.tags
    try:
        sizes = []
        for name in ("YResolution", "XResolution"):
            num, den = tags[name].value
            sizes.append(float(den) / float(num))
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    factor = 1.0 if imagej else _TIFF_UNIT_MM.get(unit)
    if factor is None or not all(np.isfinite(v) and v > 0 for v in sizes):
        return None
    return sizes[0] * factor, sizes[1] * factor


def _read_tiff(p: Path, labels: bool = False):
    import tifffile

    with tifffile.TiffFile(str(p)) as tif:
        arr = np.asarray(tif.asarray())
        meta: dict[str, Any] = {}
        page = tif.pages[0]
        axes = tif.series[0].axes if tif.series else ""
        ij = tif.imagej_metadata or {}
        shaped = (tif.shaped_metadata or ({},))[0] or {}
        json_spacing = shaped.get("spacing")  # written by write_array, one entry per axis
        if not (isinstance(json_spacing, list) and len(json_spacing) == arr.ndim and all(
                isinstance(v, (int, float)) and v > 0 for v in json_spacing)):
            json_spacing = None
        # Interleaved colour samples (as scanners, Fiji and image editors write RGB) are
        # read as PNG colour is: grey in RGB is one channel, else channels first (C, *S).
        # A file of tifffile's own "shaped" kind is colour only when write_array marked it
        # so, or when an image (not labels) is read and it holds one uint8 picture
        # (H, W, 3|4), a photo: tifffile stores any array (..., 3|4) as RGB by default,
        # and a label file like that is a mask or volume whose last axis is 3 or 4. RGB in
        # separate planes is left (C, H, W) as stored (tifffile writes any (3|4, H, W)
        # array so, too).
        samples_last = (int(getattr(page, "photometric", 0) or 0) in _TIFF_COLOUR
                        and axes.endswith("S") and len(axes) == arr.ndim)
        photo = not labels and arr.ndim == 3 and arr.dtype == np.uint8 and len(tif.pages) == 1
        colour = samples_last and (tif.shaped_metadata is None or bool(shaped.get("rgb"))
                                   or photo)
        if colour:
            arr, meta = _colour_planes(arr)
            if json_spacing is not None:  # written for (..., C): the samples axis has none
                json_spacing = ([1.0] if meta.get("channels_moved_first") else []) + \
                    json_spacing[:-1]
        if json_spacing is not None:
            meta["spacing"] = tuple(float(v) for v in json_spacing)
        else:
            spatial = arr.ndim - (1 if meta.get("channels_moved_first") else 0)
            spacing = [1.0] * arr.ndim
            found = False
            if "spacing" in ij and spatial >= 3:
                spacing[-3] = float(ij["spacing"])
                found = True
            pixel = _tiff_pixel_size(page, bool(ij)) if spatial >= 2 else None
            if pixel is not None:
                if samples_last and not colour:  # (..., y, x, samples) kept as stored
                    spacing[-3:-1] = pixel
                else:
                    spacing[-2:] = pixel
                found = True
            if found:
                meta["spacing"] = tuple(spacing)
    return arr, meta


def _colour_planes(arr: np.ndarray) -> tuple[np.ndarray, dict]:
    """A colour image ``(..., C)`` (samples last) as raterseg reads it: an opaque RGB(A)
    image whose three channels are equal is grey ``(...)``; any other colour image is
    channels first ``(C, ...)``."""
    if arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        opaque = arr.shape[-1] == 3 or bool((arr[..., 3] == arr[..., 3].max()).all())
        if opaque and (rgb == rgb[..., :1]).all():
            return np.ascontiguousarray(rgb[..., 0]), {"gray_from_rgb": True}
    return np.ascontiguousarray(np.moveaxis(arr, -1, 0)), {"channels_moved_first": True}


def _read_npy(p: Path, argname: str = "path"):
    _check_magic(p, (b"\x93NUMPY",), "an .npy file")
    try:
        arr = np.load(str(p), allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise RaterSegError(
                f"{argname}: '{p}' holds Python objects (pickle); expected a plain numeric array "
                "(raterseg never unpickles files)"
            ) from None
        raise
    return arr, {}


def read_npz(path: str | os.PathLike, keys: list[str] | None = None, *,
             argname: str = "path") -> dict[str, np.ndarray]:
    """Several arrays of an ``.npz`` archive in one pass (never unpickles).

    Args:
        keys: names to read; None lists the archive's names and reads nothing
            (the dict then maps each name to None).

    Raises:
        RaterSegError: missing file, not a valid archive, an unknown key, pickled objects.
    """
    p = Path(path)
    if not p.is_file():
        raise RaterSegError(f"{argname}: no such file '{p}'")
    try:
        _check_magic(p, (b"PK\x03\x04", b"PK\x05\x06"), "an .npz (zip) archive")
        with np.load(str(p), allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")  # noqa: TRY004
            names = list(z.files)
            if keys is None:
                return dict.fromkeys(names)
            for k in keys:
                if k not in names:
                    from .methods._registry import suggest

                    raise RaterSegError(f"key: expected one of {names} in '{p}', got {k!r}"
                                        f"{suggest(k, names)}")
            return {k: z[k] for k in keys}
    except RaterSegError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise RaterSegError(
                f"{argname}: '{p}' holds Python objects (pickle); expected plain numeric "
                "arrays (raterseg never unpickles files)"
            ) from None
        raise RaterSegError(f"{argname}: '{p}' is not a readable npz file as its name says "
                            f"({_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - zip/zlib/OS errors of a damaged archive
        raise RaterSegError(f"{argname}: '{p}' is not a readable npz file as its name says "
                            f"({_reason(err)})") from None


def _read_npz(p: Path, key: str | None, argname: str = "path", labels: bool = False):
    keys = list(read_npz(p, argname=argname))
    if not keys:
        raise RaterSegError(f"{argname}: expected at least one array in '{p}', got none")
    if key is None:  # the headers are read only where there is a choice to make
        key = keys[0] if len(keys) == 1 else npz_key(keys, labels=labels,
                                                      arrays=npz_headers(p))
    return read_npz(p, [key], argname=argname)[key], {"key": key, "keys": keys}


_PIL_FORMATS = {".png": ("PNG",), ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO")}


def _read_2d(p: Path):
    from PIL import Image

    with Image.open(p) as img:
        wanted = _PIL_FORMATS[_suffix(p) or ""]
        if img.format not in wanted:
            raise ValueError(f"it holds a {img.format} image, not {wanted[0]}")
        arr = np.array(img)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return _colour_planes(arr)
    if arr.ndim == 3 and arr.shape[-1] == 2:  # gray + alpha
        arr = np.ascontiguousarray(arr[..., 0])
    if arr.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {arr.shape}")
    return arr, {}


# -- writing ---------------------------------------------------------------------------


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask can only
    be read by setting it, which races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_folder(output: str | os.PathLike, argname: str) -> Path:
    """``output`` as a folder that exists or can be created, and can be written; for
    checking before any work, so that a mistake costs no fusion or training time.

    Raises:
        RaterSegError: it is a file, a file is in the way, or the folder is not writable.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise RaterSegError(f"{argname}: expected a folder, got the file '{out}'")
    folder = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "not a folder" if not folder.is_dir() else "not writable"
        raise RaterSegError(f"{argname}: expected a folder that can be created and written, "
                            f"got '{out}' ('{folder}' is {why})")
    return out


def _file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would leave: the existing file's, else 0o666
    less the umask (mkstemp creates its files 0o600, private to the user)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same ending); rename it over ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suf = _suffix(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suf}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode(path))
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _storable(arr: np.ndarray) -> np.ndarray:
    """Labels stay integers: bool -> uint8; int64/uint64 -> the smallest int type that fits."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize == 8:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for t in (np.uint8, np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return arr.astype(t)
    if arr.dtype.kind == "f" and arr.dtype.itemsize == 2:
        return arr.astype(np.float32)
    return arr


def _tiff_keywords(arr: np.ndarray, meta: dict) -> dict:
    """tifffile keywords: greyscale, or colour (samples last) for ``meta["rgb"]`` (a napari
    RGB layer) with 3 or 4 samples; ``meta["spacing"]`` kept in full in the JSON
    description (read back by :func:`_read_tiff`) and as the resolution tags of the (y, x)
    axes other software reads (pixels per unit, ResolutionUnit none: raterseg does not know
    the spacing's unit)."""
    rgb = bool(meta.get("rgb")) and arr.ndim >= 3 and arr.shape[-1] in (3, 4)
    out: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack",
                           "metadata": {"rgb": True} if rgb else {}}
    spacing = [float(v) for v in (meta.get("spacing") or ())]
    if rgb and len(spacing) == arr.ndim - 1:
        spacing.append(1.0)  # the samples axis
    if len(spacing) != arr.ndim or not all(v > 0 for v in spacing) or arr.ndim < 2:
        return out
    y, x = (spacing[-3], spacing[-2]) if rgb else (spacing[-2], spacing[-1])
    out["metadata"]["spacing"] = spacing
    out.update(resolution=(1.0 / x, 1.0 / y), resolutionunit=1)
    return out


def write_array(path: str | os.PathLike, array: Any, meta: dict | None = None, *,
                argname: str = "path") -> Path:
    """Write ``array`` to ``path`` atomically; the format follows the file's ending.

    Args:
        path: target file (its folder is created if needed).
        array: numeric array, axes as :func:`read_array` returns them (NIfTI: reversed).
        meta: the ``meta`` of a file read with :func:`read_array`; NIfTI output keeps its
            affine and header (with the data type set to ``array``'s, so labels stay
            integers). Without it NIfTI gets a diagonal affine from ``meta["spacing"]``
            if given, else the identity. TIFF keeps ``meta["spacing"]`` (one entry per
            axis) in its description and the (y, x) ones as resolution tags; it is
            greyscale, or colour (samples last) when ``meta["rgb"]`` is set.

    Returns:
        The written path.

    Raises:
        RaterSegError: unknown ending, an array the format cannot hold, or a failed write.
    """
    p = Path(path)
    fmt = file_format(p, argname)
    arr = np.asarray(array)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise RaterSegError(f"array: expected a numeric array, got dtype {arr.dtype}")
    arr = _storable(arr)
    meta = meta or {}
    try:
        with _atomic(p) as tmp:
            if fmt == "nifti":
                _write_nifti(tmp, arr, meta)
            elif fmt == "tiff":
                import tifffile

                # photometric RGB only when asked: an array (D, H, 3) is three columns
                tifffile.imwrite(str(tmp), arr, **_tiff_keywords(arr, meta))
            elif fmt == "npy":
                with open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
            elif fmt == "npz":
                with open(tmp, "wb") as fh:
                    np.savez_compressed(fh, **{meta.get("key") or "array": arr})
            else:
                _write_2d(tmp, arr, fmt)
    except RaterSegError:
        raise
    except Exception as err:  # noqa: BLE001 - disk full, permissions, unstorable dtype
        raise RaterSegError(f"{argname}: could not write '{p}' ({_reason(err)})") from None
    return p


def _write_nifti(tmp: Path, arr: np.ndarray, meta: dict) -> None:
    import nibabel as nib

    data = arr.T  # (..., z, y, x) -> (x, y, z, ...)
    header = meta.get("header")
    affine = meta.get("affine")
    if affine is None:
        sp = list(reversed(meta.get("spacing") or ()))[:3]
        affine = np.diag([*(float(s) for s in sp), *([1.0] * (3 - len(sp))), 1.0])
    if header is not None and not isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        header = None
    header = header.copy() if header is not None else nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data, np.asarray(affine, dtype=np.float64), header=header)
    img.header.set_data_dtype(data.dtype)
    nib.save(img, str(tmp))


def _write_2d(tmp: Path, arr: np.ndarray, fmt: str) -> None:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    elif arr.ndim != 2:
        raise RaterSegError(f"array: a {fmt} file holds (H, W) or (3|4, H, W), got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        top = 255 if fmt == "jpeg" else 65535
        if lo < 0 or hi > top:
            raise RaterSegError(f"array: a {fmt} file holds values 0..{top}, got {lo}..{hi}")
        arr = arr.astype(np.uint8 if hi <= 255 or fmt == "jpeg" else np.uint16)
    elif arr.dtype != np.uint8:
        raise RaterSegError(f"array: a {fmt} file holds integers, got dtype {arr.dtype}; "
                            "use .tif, .npy or .nii.gz for floating-point data")
    if arr.dtype == np.uint16 and arr.ndim == 3:
        raise RaterSegError(f"array: a colour {fmt} file holds 8-bit values, got up to {hi}")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG" if fmt == "png" else "JPEG")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _write_text(path: Path, text: str, argname: str = "path") -> None:
    """Write ``text`` to ``path`` atomically.

    Raises:
        RaterSegError: the file could not be written (read-only folder, disk full, ...).
    """
    try:
        with _atomic(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as err:
        raise RaterSegError(f"{argname}: could not write '{path}' ({_reason(err)})") from None


def default_rater_names(n: int) -> list[str]:
    """``rater1`` ... ``raterN``: the names of raters that come without one."""
    return [f"rater{r + 1}" for r in range(n)]


def rater_confusion_csv(cm: Any, names: Sequence[str]) -> str:
    """The text of ``rater_confusion.csv``: one row (rater, said, true, probability) per
    entry of each rater's confusion matrix ``cm[r, said, true] = p(said | true)``."""
    cm = np.asarray(cm)
    buf = _pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rater", "said", "true", "probability"])
    for r in range(cm.shape[0]):
        for i in range(cm.shape[1]):
            for j in range(cm.shape[2]):
                w.writerow([names[r], i, j, f"{float(cm[r, i, j]):.6g}"])
    return buf.getvalue()


#: The description file of a chunked result (:func:`raterseg.fuse_chunked`), which
#: :func:`write_result` (``summary.json``) never writes beside.
CHUNKED_META = "fusion.json"


def write_result(outdir: str | os.PathLike, result: FusionResult, meta: dict | None = None,
                 prefix: str = "", *, rater_names: list[str] | None = None,
                 suffix: str = ".nii.gz") -> dict[str, Path]:
    """Write a one-case :class:`FusionResult` into ``outdir`` (each file atomically).

    Files (``<prefix><name><suffix>``; arrays in :func:`write_array`'s axis convention):
    ``truth`` int16 ``(*S)``, ``probabilities`` float32 ``(L, *S)``, ``uncertainty`` and
    ``disagreement`` float32 ``(*S)``, ``rater_maps`` ``(R, *S)`` and ``rater_estimates``
    ``(R, L, *S)`` when the method gives them, ``rater_confusion.csv`` (rater, said, true,
    p(said | true)) and ``summary.json`` (method, parameters, shapes, class volumes,
    rater confusion matrices, history).

    Args:
        meta: ``meta`` of the input (e.g. the image or a rater file) so that NIfTI
            outputs keep its affine and header.
        rater_names: names for the CSV and JSON (default ``rater1``, ``rater2``, ...).
        suffix: file ending of the arrays (any in :data:`SUFFIXES` that holds their shape).

    Writing into a folder that holds an earlier result replaces it: files of the same
    ``prefix`` and ``suffix`` that this result does not have (an earlier method's
    ``rater_maps``, say) are removed, so two results of the same prefix and suffix never
    mix (a result written with another suffix, e.g. ``.tif``, is left as it is). A folder
    holding a chunked result (:data:`CHUNKED_META`) is refused: the two would share
    ``rater_confusion.csv`` and leave two methods' arrays side by side.

    Returns:
        ``{name: path}`` of every file written.

    Raises:
        RaterSegError: ``outdir`` is a file or holds a chunked result, ``rater_names``
            does not give one name per rater, the arrays are in NIfTI's (x, y, z) order
            rather than ``meta``'s file's (z, y, x) (checked before anything is written),
            or a write failed.
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise RaterSegError(f"outdir: expected a folder, got the file '{out}'")
    if (out / CHUNKED_META).is_file():
        raise RaterSegError(
            f"outdir: '{out}' holds a chunked fusion result ({CHUNKED_META}); write this one "
            "to another folder, or remove that result first (the two would mix)")
    cm = result.rater_confusion
    n_r = next((a.shape[0] for a in (cm, result.rater_maps, result.rater_estimates)
                if a is not None), None)
    if rater_names is not None and n_r is not None and len(rater_names) != n_r:
        raise RaterSegError(f"rater_names: expected {n_r} names (one per rater of the result), "
                            f"got {len(rater_names)}: {list(rater_names)}")
    _check_axis_order(np.shape(result.truth), meta)
    written: dict[str, Path] = {}
    for name in _RESULT_FIELDS:
        arr = getattr(result, name)
        if arr is not None:
            written[name] = write_array(out / f"{prefix}{name}{suffix}", arr, meta,
                                        argname="outdir")
    names = list(rater_names) if rater_names is not None else default_rater_names(n_r or 0)
    if cm is not None:
        written["rater_confusion"] = out / f"{prefix}rater_confusion.csv"
        _write_text(written["rater_confusion"], rater_confusion_csv(cm, names), "outdir")
    truth = np.asarray(result.truth)
    labels, counts = np.unique(truth, return_counts=True)
    # every class, 0 where none was fused (a script reads class_voxels["2"] of each case);
    # -1 (undecided) only where some voxel is
    class_voxels = dict.fromkeys(range(int(result.probabilities.shape[0])), 0)
    class_voxels.update((int(k), int(v)) for k, v in zip(labels, counts))
    summary = {
        "method": result.method,
        "params": result.params,
        "num_classes": int(result.probabilities.shape[0]),
        "spatial_shape": list(truth.shape),
        "source": (meta or {}).get("path"),  # the file whose geometry the outputs carry
        "spacing": (meta or {}).get("spacing"),
        "class_voxels": class_voxels,
        "rater_names": names,
        "rater_confusion": cm,
        "history": result.history,
        "files": {k: v.name for k, v in written.items()},
    }
    written["summary"] = out / f"{prefix}summary.json"
    _write_text(written["summary"], json.dumps(_jsonable(summary), indent=2) + "\n", "outdir")
    # an earlier result's files that this one does not replace (written last, so that a
    # failed write leaves the earlier result whole)
    stale = [out / f"{prefix}{name}{suffix}" for name in _RESULT_FIELDS if name not in written]
    if "rater_confusion" not in written:
        stale.append(out / f"{prefix}rater_confusion.csv")
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return written


#: The arrays of a :class:`FusionResult` that :func:`write_result` writes, in order.
_RESULT_FIELDS = ("truth", "probabilities", "uncertainty", "disagreement", "rater_maps",
                  "rater_estimates")


def _check_axis_order(shape: tuple[int, ...], meta: dict | None) -> None:
    """Refuse arrays in a NIfTI file's own (x, y, z) order written with that file's meta:
    raterseg's arrays are (z, y, x), so the written file would be transposed against its
    affine and no longer overlay the image (arrays from nibabel's ``get_fdata`` need ``.T``).

    Raises:
        RaterSegError: the shape is the file's (x, y, z) shape and not its reverse.
    """
    header = (meta or {}).get("header")
    if header is None or not hasattr(header, "get_data_shape") or len(shape) < 2:
        return
    stored = tuple(int(n) for n in header.get_data_shape())[: len(shape)]
    if shape == stored and shape != stored[::-1]:
        raise RaterSegError(
            f"result: expected arrays of shape {stored[::-1]} (z, y, x) for the NIfTI geometry "
            f"of '{meta.get('path', '?')}', got {shape}, its (x, y, z) order: raterseg's arrays "
            "are NIfTI's reversed (as read_array returns them); transpose arrays from nibabel "
            "with .T before fusing")


_FROM_DATASETS = ("Case", "read_case", "read_image", "read_labels", "read_lidc_nodule")


def __getattr__(name: str) -> Any:
    # Dataset layouts live in raterseg.datasets (which imports this module's readers);
    # ``raterseg.io.read_case`` etc. resolve lazily to avoid a circular import.
    if name in _FROM_DATASETS:
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Fusion of volumes too big for memory: read in slabs, histogram, fit, gather, write.

Methods with a global model (``majority_vote``, ``mean``, ``staple``; see
:class:`~raterseg.methods._patterns.PatternMethod`) see a voxel only through its pattern
of rater labels. So a volume can be fused in streaming passes over slabs along its first
axis, holding one slab at a time:

1. (only when ``num_classes`` is not given) the label range, to infer L;
2. the histogram of rater-label patterns, merged over slabs (and every slab's labels
   checked), then the method's fit on that histogram;
3. per slab, each voxel's pattern looked up in the fitted tables and the outputs
   written with plain file writes (no memory map grows the process's memory).

The histogram, its pattern order and the fit are exactly those of the in-memory path,
so the results are identical to ``raterseg.fuse`` on the same labels.

Inputs are read lazily: ``.npy`` files (slabs read from the file), NIfTI files (through
nibabel's array proxy; as everywhere in raterseg, a NIfTI volume ``(x, y, z)`` is the
array ``(z, y, x)``, so its slabs are contiguous runs of the file), or any array-like
that supports slicing (``np.memmap``, zarr, h5py). Outputs (``truth``, ``probabilities``,
``uncertainty``, ``disagreement``) are ``.npy`` files, or uncompressed ``.nii`` files with
the first rater's geometry, plus ``rater_confusion.csv`` (as :func:`raterseg.io.write_result`
writes it) and ``fusion.json`` (method, parameters, rater names, voxels per fused class,
rater confusion matrices, history); each is written to a temporary name and renamed when complete. A
previous result in the folder stays whole until every new file is complete; then its
``fusion.json`` is removed, the new files renamed into place and the new ``fusion.json``
written last, so an interruption never leaves a mix that :func:`load_chunked` accepts.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import check_same_grid, only_0_255, rounded_labels
from .io import CHUNKED_META, _jsonable, _write_text, check_output_folder, rater_confusion_csv
from .types import (
    GREY_LEVEL_MAX,
    MISSING,
    FusionResult,
    RaterSegError,
    TrainingEvent,
    infer_num_classes,
    labels_present,
)

__all__ = ["CHUNK_VOXELS", "fuse_chunked"]

#: Default voxels per slab (8 Mi): about 300 MB of working memory for 5 binary raters.
CHUNK_VOXELS = 1 << 23

#: Output files, in the order of :data:`raterseg.methods._patterns.VOXEL_FIELDS`.
OUTPUT_NAMES = ("truth", "probabilities", "uncertainty", "disagreement")
#: Output formats: file ending of each array.
FORMATS = {"npy": ".npy", "nii": ".nii"}
META_FILE = CHUNKED_META
#: Each rater's confusion matrix against the fused truth, in raterseg fuse's CSV layout.
CONFUSION_FILE = "rater_confusion.csv"


# -- inputs ---------------------------------------------------------------------------------
class _Source:
    """One rater's label map ``(*S)`` in C order, read a slab along the first axis at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str
    #: Files may hold labels as floats (checked to be whole numbers up to round-off, and
    #: rounded, slab by slab), as
    #: :func:`raterseg.io.read_labels` reads them; array-likes must be integers, as in
    #: :func:`raterseg.fuse`.
    float_ok = False
    #: Files holding only 0 and 255 are binary masks and read as 0/1, as everywhere in
    #: raterseg (:func:`raterseg.datasets.read_labels`); set by the first pass.
    divisor = 1

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError


class _ArraySource(_Source):
    """Any array-like with ``shape``, ``dtype`` and slicing; ``index`` = rater of ``(R, *S)``."""

    def __init__(self, arr: Any, name: str, index: int | None = None) -> None:
        self.arr, self.index, self.name = arr, index, name
        shape = tuple(int(s) for s in arr.shape)
        self.shape = shape[1:] if index is not None else shape
        try:
            self.dtype = np.dtype(arr.dtype)
        except TypeError:  # e.g. a torch tensor: the dtype numpy reads it as
            self.dtype = np.asarray(arr[tuple(slice(0, 1) for _ in shape)]).dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        key = slice(start, stop) if self.index is None else (self.index, slice(start, stop))
        return np.asarray(self.arr[key])


class _NiftiSource(_Source):
    """A NIfTI file through nibabel's proxy, seen as ``(z, y, x)`` (:mod:`raterseg.io`'s
    convention): a slab of z is a contiguous run of the file. Values are read as nibabel
    (and :mod:`raterseg.io`) reads them, scl_slope/scl_inter applied. A file of shape
    (x, y, z, 1) is the volume (x, y, z)."""

    float_ok = True

    def __init__(self, img: Any, name: str) -> None:
        self.proxy, self.name, self.path = img.dataobj, name, Path(name)
        self.header = img.header
        self.affine = np.asarray(img.affine, np.float64)
        file_shape = tuple(int(s) for s in self.proxy.shape)
        # a label map saved as (x, y, z, 1) (one volume of a 4th axis) is the volume
        # (x, y, z), as read_labels reads it
        spatial = len(file_shape)
        while spatial > 3 and file_shape[spatial - 1] == 1:
            spatial -= 1
        self.extra = len(file_shape) - spatial  # trailing singleton axes, indexed with 0
        self.shape = tuple(reversed(file_shape[:spatial]))
        # nibabel moves the scaling from the header into the proxy when it loads a file
        scaled = (getattr(self.proxy, "slope", 1.0), getattr(self.proxy, "inter", 0.0)) != (1.0, 0.0)
        self.dtype = np.dtype(np.float64) if scaled else np.dtype(img.get_data_dtype())
        if not name.lower().endswith(".gz"):  # a short file is seen now, not slabs later
            end = int(getattr(self.proxy, "offset", 0)) + math.prod(self.shape) * \
                np.dtype(img.get_data_dtype()).itemsize
            size = os.path.getsize(name)
            if size < end:
                self._damaged(f"{end} bytes expected, the file has {size}")

    def _damaged(self, why: str):
        raise RaterSegError(f"raters: '{self.name}' is not a readable NIfTI file as its name "
                            f"says ({why})")

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            key = (slice(None),) * (len(self.shape) - 1) + (slice(start, stop),) \
                + (0,) * self.extra
            return np.asarray(self.proxy[key]).T
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # damaged data
            self._damaged(f"{type(exc).__name__}: {exc}")


class _NpySource(_Source):
    """A ``.npy`` file read with seeks (no memory map), ``index`` = rater of an (R, *S) file."""

    float_ok = True

    def __init__(self, path: Path, index: int | None = None) -> None:
        self.path, self.index = path, index
        self.name = str(path) if index is None else f"{path}[{index}]"
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            except ValueError as exc:
                raise RaterSegError(f"raters: {path} is not a valid .npy file ({exc})") from None
            self.offset = f.tell()
        if dtype.hasobject:
            raise RaterSegError(f"raters: {path} holds Python objects; expected integer labels")
        self.dtype, self.fortran = dtype, bool(fortran)
        self.file_shape = tuple(shape)
        self.shape = self.file_shape[1:] if index is not None else self.file_shape

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fortran:  # slabs of the first axis are strided: let a memory map pick them out
            arr = np.load(self.path, mmap_mode="r")
            return _ArraySource(arr, self.name, self.index).read(start, stop)
        plane = math.prod(self.shape[1:])
        n = (stop - start) * plane
        first = start * plane + (0 if self.index is None else self.index * math.prod(self.shape))
        with open(self.path, "rb") as f:
            f.seek(self.offset + first * self.dtype.itemsize)
            flat = np.fromfile(f, dtype=self.dtype, count=n)
        if flat.size != n:
            raise RaterSegError(f"raters: {self.path} is truncated (expected {n} more values)")
        return flat.reshape((stop - start,) + self.shape[1:])


def _source_from_path(path: Path, where: str) -> list[_Source]:
    name = path.name.lower()
    if not path.exists():
        raise RaterSegError(f"{where}: file not found: {path}")
    if name.endswith(".npy"):
        src = _NpySource(path)
        return [src]
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        try:
            img = nib.load(str(path), keep_file_open=True)
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            raise RaterSegError(f"{where}: cannot read {path} as NIfTI ({exc})") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise RaterSegError(f"{where}: {path} is not a NIfTI image")
        return [_NiftiSource(img, str(path))]
    raise RaterSegError(
        f"{where}: expected .npy or .nii/.nii.gz files for chunked fusion, got "
        f"{'the folder' if path.is_dir() else 'the file'} '{path}'")


def _open_raters(raters: Any) -> list[_Source]:
    """One :class:`_Source` per rater from paths, array-likes, or one ``(R, *S)`` array-like."""
    if raters is None:
        raise RaterSegError("raters: expected one label map per rater, got None")
    if isinstance(raters, (str, os.PathLike)):
        path = Path(raters)
        srcs = _source_from_path(path, "raters")
        src = srcs[0]
        if isinstance(src, _NpySource) and len(src.shape) in (3, 4):
            return [_NpySource(path, r) for r in range(src.shape[0])]
        raise RaterSegError(
            f"raters: a single file must hold an (R, *S) .npy array with S 2D or 3D, got {path} "
            f"with shape {src.shape}; give one file per rater otherwise")
    if isinstance(raters, (list, tuple)):
        if not raters:
            raise RaterSegError("raters: expected at least one rater, got an empty list")
        out: list[_Source] = []
        for i, item in enumerate(raters):
            if isinstance(item, (str, os.PathLike)):
                out.extend(_source_from_path(Path(item), f"raters[{i}]"))
            elif hasattr(item, "shape") and hasattr(item, "dtype") and hasattr(item, "__getitem__"):
                out.append(_ArraySource(item, f"raters[{i}]"))
            else:
                raise RaterSegError(
                    f"raters[{i}]: expected a path or an array-like label map, got {type(item).__name__}")
        return out
    if hasattr(raters, "shape") and hasattr(raters, "dtype") and hasattr(raters, "__getitem__"):
        if len(raters.shape) not in (3, 4):
            raise RaterSegError(
                f"raters: expected an array (R, *S) with S 2D or 3D, got shape {tuple(raters.shape)}")
        return [_ArraySource(raters, f"raters[{r}]", r) for r in range(int(raters.shape[0]))]
    raise RaterSegError(
        f"raters: expected paths, a list of array-likes or an (R, *S) array-like, got "
        f"{type(raters).__name__}")


def _check_sources(srcs: list[_Source]) -> tuple[int, ...]:
    """The common spatial shape; checks shapes and dtypes."""
    shapes = {s.shape for s in srcs}
    if len(shapes) != 1:
        raise RaterSegError(
            "raters: expected every rater's label map to have the same shape, got shapes "
            f"{[s.shape for s in srcs]}")
    shape = srcs[0].shape
    if len(shape) not in (2, 3):
        raise RaterSegError(f"raters: expected 2D or 3D label maps, got shape {shape}")
    if 0 in shape:
        raise RaterSegError(f"raters: expected non-empty label maps, got shape {shape}")
    for s in srcs:
        if not (np.issubdtype(s.dtype, np.integer) or s.dtype == bool
                or (s.float_ok and s.dtype.kind == "f")):
            raise RaterSegError(
                f"raters: expected integer class labels (0..L-1, -1 for missing), got dtype "
                f"{s.dtype} in {s.name}")
    return shape


# -- outputs --------------------------------------------------------------------------------
class _Out:
    """One output ``(K?, *S)`` in C order behind a header (``.npy``, or ``.nii`` whose
    ``(x, y, z, K)`` Fortran-order data are the same bytes), written slab by slab with
    seeks to a temporary file that :meth:`commit` renames."""

    def __init__(self, path: Path, lead: tuple[int, ...], shape: tuple[int, ...], dtype,
                 nifti: _NiftiSource | None) -> None:
        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.dtype = np.dtype(dtype)
        self.K, self.N = math.prod(lead), math.prod(shape)
        self.f = open(self.tmp, "wb")  # noqa: SIM115 - closed by commit() or abort()
        try:
            if nifti is None:
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype),
                          "fortran_order": False, "shape": tuple(lead) + tuple(shape)}
                np.lib.format.write_array_header_1_0(self.f, header)
            else:
                self.f.write(_nifti_header(nifti, tuple(reversed(shape)) + tuple(lead), self.dtype))
            self.offset = self.f.tell()
            self.f.truncate(self.offset + self.K * self.N * self.dtype.itemsize)
        except BaseException:
            self.abort()
            raise

    def write(self, block: np.ndarray, start: int) -> None:
        """``block`` ``(K, n)`` (or ``(n,)``): a slab's voxels from flat index ``start``."""
        b = np.asarray(block, self.dtype).reshape(self.K, -1)
        for k in range(self.K):
            self.f.seek(self.offset + (k * self.N + start) * self.dtype.itemsize)
            self.f.write(np.ascontiguousarray(b[k]).tobytes())

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


def _nifti_header(src: _NiftiSource, shape_xyz: tuple[int, ...], dtype: np.dtype) -> bytes:
    """Header bytes (with the empty extension flag) for data right after it, keeping the
    rater file's geometry (affine, voxel sizes, units)."""
    import nibabel as nib

    hdr = src.header.copy()
    hdr.set_data_dtype(dtype)
    hdr.set_data_shape(shape_xyz)
    hdr.set_slope_inter(1.0, 0.0)
    if len(shape_xyz) > 3:
        zooms = list(hdr.get_zooms()[:3]) + [1.0] * (len(shape_xyz) - 3)
        hdr.set_zooms(zooms)
    head = len(hdr.binaryblock) + 4
    offset = -(-head // 16) * 16
    hdr["vox_offset"] = offset
    # single file (the NIfTI-2 header is a subclass of the NIfTI-1 one)
    hdr["magic"] = b"n+2" if isinstance(hdr, nib.Nifti2Header) else b"n+1"
    return hdr.binaryblock + b"\x00" * (offset - len(hdr.binaryblock))


def _output_paths(out_dir: Path) -> list[Path]:
    """Every file a result in ``out_dir`` may have, in either format."""
    return [*(out_dir / f"{k}{e}" for k in OUTPUT_NAMES for e in FORMATS.values()),
            out_dir / META_FILE]


def _check_not_outputs(srcs: list[_Source], out_dir: Path) -> None:
    """Refuse rater files (or memory maps of them) that an output would replace."""
    targets = {p.resolve() for p in _output_paths(out_dir)}
    for s in srcs:
        path = getattr(s, "path", None) or getattr(getattr(s, "arr", None), "filename", None)
        if path is not None and Path(path).resolve() in targets:
            raise RaterSegError(
                f"output_dir: writing to {out_dir} would replace the rater file {path}; "
                "expected an output folder that holds no rater file named like an output")


def _previous_files(out_dir: Path) -> list[Path]:
    """The output files a previous result's ``fusion.json`` lists (only names of outputs)."""
    try:
        listed = json.loads((out_dir / META_FILE).read_text())["files"].values()
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return []
    known = {p.name for p in _output_paths(out_dir)} - {META_FILE}
    return [out_dir / n for n in listed if isinstance(n, str) and n in known]


def _check_disk_space(out_dir: Path, shape: tuple[int, ...], L: int) -> None:
    """Refuse outputs bigger than the free space (they are sparse until written, so a full
    disk would otherwise show only in the middle of the last pass): truth int16/int32,
    probabilities float32 ``(L, *S)``, uncertainty and disagreement float32."""
    import shutil

    need = math.prod(shape) * ((2 if L < 32000 else 4) + 4 * L + 4 + 4)
    where = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise RaterSegError(
            f"output_dir: the outputs for {math.prod(shape)} voxels and {L} classes need "
            f"{need / 2**30:.2f} GiB, but {where} has {free / 2**30:.2f} GiB free (is the "
            "largest label, which sets the number of classes, what you expect?)")


# -- the three passes -----------------------------------------------------------------------
def _slabs(shape: tuple[int, ...], chunk_voxels: int):
    """``(start, stop, first voxel)`` of each slab of whole planes along the first axis."""
    plane = math.prod(shape[1:])
    step = max(1, chunk_voxels // max(plane, 1))
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step), start * plane


def _read_slab(srcs: list[_Source], start: int, stop: int, dtype,
               num_classes: int | None) -> tuple[np.ndarray, int]:
    """Labels of a slab, ``(R, n)`` of ``dtype``, each rater's range checked before the
    cast; and the largest label seen."""
    out, hi = None, 0
    for r, s in enumerate(srcs):
        a = _read_checked(s, start, stop)
        if s.divisor != 1:
            a = a // s.divisor
        hi = max(hi, _check_range(a, num_classes)[1])
        if out is None:
            out = np.empty((len(srcs), a.size), dtype)
        out[r] = a.reshape(-1)
    return out, hi


def _read_checked(s: _Source, start: int, stop: int) -> np.ndarray:
    """A slab of one rater, whose float values (a file's labels stored as floats, or
    scaled) are checked to be whole numbers up to float round-off and rounded, as
    :func:`raterseg.datasets.read_labels` reads them (a 0/255 mask with scl_slope 1/255
    reads as 1.0000000591, which a cast would make 1 or 0 by chance)."""
    return rounded_labels(s.read(start, stop), f"raters ('{s.name}')")


def _scan_labels(srcs: list[_Source], slabs: list, report) -> int:
    """First pass over every rater: each file's label range, checked; marks files holding
    only 0 and 255 (and -1) as 0/1 masks (``divisor``). Returns the largest label as read
    after that mapping."""
    hi = [-1] * len(srcs)
    mask_like = [s.float_ok for s in srcs]  # array-likes are taken as given, as by fuse
    for i, (a, b, _) in enumerate(slabs):
        for r, s in enumerate(srcs):
            lab = _read_checked(s, a, b)
            hi[r] = max(hi[r], _check_range(lab, None)[1])
            if mask_like[r]:
                mask_like[r] = only_0_255(lab)
        report("checking labels,", i)
    for r, s in enumerate(srcs):
        if mask_like[r] and hi[r] == 255:
            s.divisor = 255
            hi[r] = 1
    return max(hi)


def _labels_present(srcs: list[_Source], slabs: list, hi: int) -> np.ndarray:
    """bool ``(hi + 1,)``: which labels occur (a further pass, only for labels up to 255)."""
    present = np.zeros(hi + 1, bool)
    for a, b, _ in slabs:
        for s in srcs:
            lab = _read_checked(s, a, b)
            present |= labels_present(lab // s.divisor if s.divisor != 1 else lab, hi)
    return present


def _check_range(lab: np.ndarray, num_classes: int | None) -> tuple[int, int]:
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo < MISSING:
        raise RaterSegError(
            f"raters: expected labels >= -1 (-1 = rater did not annotate), got minimum {lo}")
    if num_classes is not None and hi >= num_classes:
        raise RaterSegError(
            f"raters: expected labels in 0..{num_classes - 1} (num_classes={num_classes}), "
            f"got a label {hi}")
    return lo, hi


def _merge(pats: np.ndarray | None, counts: np.ndarray | None, new_pats: np.ndarray,
           new_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union of two pattern histograms ``(R, P)``, columns in lexicographic order (the
    order of :func:`~raterseg.methods._patterns.pattern_histogram`)."""
    if pats is not None:
        new_pats = np.concatenate([pats, new_pats], axis=1)
        new_counts = np.concatenate([counts, new_counts])
    uniq, inverse = np.unique(new_pats, axis=1, return_inverse=True)
    merged = np.zeros(uniq.shape[1], np.int64)
    np.add.at(merged, inverse.reshape(-1), new_counts)  # int64: exact at any size
    return uniq, merged


class _Lookup:
    """Global pattern number of each of a slab's patterns (all of which must be in the table:
    a pattern the histogram pass did not see means the raters changed between passes)."""

    def __init__(self, pats: np.ndarray, base: int) -> None:
        self.base = base
        R = pats.shape[0]
        self.coded = R * math.log2(base) < 62
        if self.coded:
            self.keys = self._codes(pats)  # ascending: lexicographic order = code order
        else:
            self.table = {tuple(col): i for i, col in enumerate(pats.T.tolist())}

    def _codes(self, pats: np.ndarray) -> np.ndarray:
        code = np.zeros(pats.shape[1], np.int64)
        for row in pats:
            code = code * self.base + (row.astype(np.int64) + 1)
        return code

    def __call__(self, pats: np.ndarray) -> np.ndarray:
        if self.coded:
            codes = self._codes(pats)
            g = np.searchsorted(self.keys, codes)
            if len(g) and (g.max() >= len(self.keys) or (self.keys[g] != codes).any()):
                self._changed()
            return g
        try:
            return np.array([self.table[tuple(c)] for c in pats.T.tolist()], np.int64)
        except KeyError:
            self._changed()

    @staticmethod
    def _changed():
        raise RaterSegError("raters: a label pattern appeared that the histogram pass did not "
                            "see; expected the raters to stay the same while they are fused "
                            "(a file changed between passes?)")


def check_chunkable(method: Any) -> None:
    """Raise :class:`RaterSegError` unless ``method`` (a created method) can run in slabs."""
    from .api import create
    from .methods._patterns import PatternMethod
    from .methods._registry import available_methods

    if not isinstance(method, PatternMethod):
        ok = [n for n in available_methods() if isinstance(create(n), PatternMethod)]
        raise RaterSegError(
            f"method: chunked fusion needs a method with a global model ({', '.join(ok)}), "
            f"got {method.name!r}")


def fuse_chunked(raters: Any, output_dir: str | os.PathLike, method: str = "staple",
                 num_classes: int | None = None, device: Any = None, seed: int = 0,
                 chunk_voxels: int = CHUNK_VOXELS, output_format: str | None = None,
                 progress=None, **params: Any) -> FusionResult:
    """Fuse a case too big for memory, reading it in slabs and writing the outputs to disk.

    Results are identical to :func:`raterseg.fuse` on the same labels; peak memory is
    about ``chunk_voxels`` × (2·R + 4·L + 12) bytes plus the (small) pattern tables.

    Args:
        raters: one path per rater (``.npy``, ``.nii``, ``.nii.gz``), one ``.npy`` path
            holding ``(R, *S)``, a list of array-likes ``(*S)`` (``np.load(..., mmap_mode="r")``,
            nibabel ``img.dataobj``, zarr, h5py), or one ``(R, *S)`` array-like. -1 = missing.
            Files may store labels as floats (or scaled NIfTI) if the values are whole
            numbers, as :func:`raterseg.io.read_labels` accepts; array-likes must be integers.
        output_dir: folder for ``truth`` int16 ``(*S)``, ``probabilities`` float32
            ``(L, *S)``, ``uncertainty`` and ``disagreement`` float32 ``(*S)``,
            ``rater_confusion.csv`` and ``fusion.json``; created if needed.
        method: a method with a global model: ``majority_vote``, ``mean`` or ``staple``.
        num_classes: L; inferred (one extra pass over the data) when None.
        device: where histograms and gathers run ("cpu", "cuda", None = CUDA if available).
        chunk_voxels: voxels per slab (whole planes of the first axis; at least one).
        output_format: ``"npy"`` or ``"nii"`` (uncompressed NIfTI with the first NIfTI
            rater's affine and voxel sizes; probabilities as ``(x, y, z, L)``); default
            ``"nii"`` when the first rater is a 3D NIfTI file, else ``"npy"``.
        progress: called with a :class:`TrainingEvent` per slab and pass.
        **params: the method's Config fields.

    Returns:
        :class:`FusionResult` whose arrays are read-only memory maps of the written files.

    Raises:
        RaterSegError: a method without a global model, unreadable or mismatched inputs,
            labels out of range or not whole numbers, no rater annotating anything,
            ``output_dir`` naming a file, or outputs bigger than its free disk space.
            Nothing is written then.

    Examples:
        >>> res = rs.fuse_chunked(["r1.nii", "r2.nii", "r3.nii"], "out", method="staple")
        >>> res.rater_confusion[:, 1, 1]  # sensitivities
    """
    import torch

    from ._device import resolve_device
    from .api import create
    from .methods._base import silent_raters_as_nan
    from .methods._patterns import VOXEL_FIELDS, PatternHistogram, output_tables, pattern_histogram

    m = create(method, num_classes=num_classes, device=device, seed=seed, **params)
    check_chunkable(m)
    if (isinstance(chunk_voxels, bool) or not isinstance(chunk_voxels, numbers.Integral)
            or chunk_voxels < 1):
        raise RaterSegError(
            f"chunk_voxels: expected a positive whole number of voxels, got {chunk_voxels!r}")
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
        raise RaterSegError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
    out_dir = check_output_folder(output_dir, "output_dir")
    srcs = _open_raters(raters)
    shape = _check_sources(srcs)
    nifti = next((s for s in srcs if isinstance(s, _NiftiSource)), None)
    if output_format is None:
        output_format = "nii" if isinstance(srcs[0], _NiftiSource) and len(shape) == 3 else "npy"
    if output_format not in FORMATS:
        raise RaterSegError(f"output_format: expected one of {sorted(FORMATS)}, got {output_format!r}")
    if output_format == "nii" and (nifti is None or len(shape) != 3):
        raise RaterSegError("output_format: 'nii' needs 3D NIfTI raters (their geometry is "
                            f"copied); got {'shape ' + str(shape) if nifti else 'no NIfTI rater'}")
    _check_not_outputs(srcs, out_dir)
    if (out_dir / "summary.json").is_file():  # raterseg.io.write_result's
        raise RaterSegError(
            f"output_dir: '{out_dir}' holds a result of raterseg fuse (summary.json); write "
            "the chunked result to another folder, or remove that one first (the two would mix)")
    check_same_grid([(s.name, {"affine": s.affine}) for s in srcs if isinstance(s, _NiftiSource)],
                    "raters")
    R = len(srcs)
    dev = resolve_device(device)
    slabs = list(_slabs(shape, int(chunk_voxels)))

    def report(pass_name: str, i: int) -> None:
        if progress is not None:
            progress(TrainingEvent(i + 1, len(slabs), f"{method}: {pass_name} slab {i + 1}/{len(slabs)}"))

    # Pass 1 (when L is not given, or some rater is a file): the label range, and which
    # files are 0/255 masks.
    L = num_classes
    if L is None or any(s.float_ok for s in srcs):
        hi_all = _scan_labels(srcs, slabs, report)
        if L is None:
            present = _labels_present(srcs, slabs, hi_all) if hi_all == GREY_LEVEL_MAX else None
            L = infer_num_classes(hi_all, present, math.prod(shape), "raters")
    L = int(L)
    lab_dtype = np.int16 if L < 32000 else np.int32
    _check_disk_space(out_dir, shape, L)

    # Pass 2: the pattern histogram.
    pats = counts = None
    for i, (a, b, _) in enumerate(slabs):
        lab, _ = _read_slab(srcs, a, b, lab_dtype, L)
        h = pattern_histogram(torch.as_tensor(lab, device=dev), L)
        pats, counts = _merge(pats, counts, h.labels.cpu().numpy(), h.counts.cpu().numpy())
        report("histogram,", i)
    if (pats < 0).all(axis=0).all():
        raise RaterSegError(
            "raters: expected at least one rater to annotate each case, but every rater is -1 "
            "(missing) in this case")
    hist = PatternHistogram(torch.as_tensor(pats, device=dev), torch.as_tensor(counts, device=dev),
                            None, None)
    fit = m.fit_patterns(hist, L, progress)
    tables = output_tables(hist, fit)
    lookup = _Lookup(pats, L + 1)

    # Pass 3: gather the tables to each slab's voxels and write them to temporary files.
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = FORMATS[output_format]
    writers: dict[str, _Out] = {}
    try:
        for k in VOXEL_FIELDS:
            t = tables[k]
            writers[k] = _Out(out_dir / f"{k}{ext}", t.shape[:-1], shape, t.dtype,
                              nifti if output_format == "nii" else None)
        for i, (a, b, start) in enumerate(slabs):
            lab, _ = _read_slab(srcs, a, b, lab_dtype, L)
            h = pattern_histogram(torch.as_tensor(lab, device=dev), L)
            del lab
            g = lookup(h.labels.cpu().numpy())
            blocks = h.to_voxels(*(tables[k][..., g] for k in VOXEL_FIELDS))
            for k, block in zip(VOXEL_FIELDS, blocks):
                writers[k].write(block, start)
            report("writing,", i)
        # Replace a previous result: its fusion.json goes first, so that from here until
        # the new one is written the folder holds no result load_chunked would accept.
        previous = _previous_files(out_dir)
        (out_dir / META_FILE).unlink(missing_ok=True)
        for w in writers.values():
            w.commit()
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if isinstance(e, OSError):  # e.g. the disk filled up after all, or a quota
            raise RaterSegError(f"output_dir: writing the result to '{out_dir}' failed "
                                f"({e.strerror or e})") from e
        raise
    for stale in set(previous) - {w.path for w in writers.values()}:
        stale.unlink(missing_ok=True)  # the previous result was in the other format
    names = _rater_names(srcs)
    cm = fit.fields.get("rater_confusion")
    if cm is not None:  # a rater all -1 has no matrix, as in memory (unannotated_as_nan)
        cm = silent_raters_as_nan(cm, (pats < 0).all(axis=1))
    csv_path = out_dir / CONFUSION_FILE
    if cm is not None:  # as raterseg fuse writes it
        _write_text(csv_path, rater_confusion_csv(cm, names), "output_dir")
    else:
        csv_path.unlink(missing_ok=True)
    # voxels of each fused class, from the pattern counts (no pass over the volume)
    # (a voxel left undecided, -1, by majority_vote's tie="undecided" counts as -1)
    truth_table = tables["truth"].astype(np.int64)
    class_voxels = np.zeros(L + 1, np.int64)  # index L: the undecided (-1) voxels
    np.add.at(class_voxels, truth_table, counts.astype(np.int64))
    meta = {"method": m.name, "params": m.params_dict, "shape": list(shape), "num_classes": L,
            "num_raters": R, "raters": [s.name for s in srcs], "rater_names": names,
            "format": output_format, "source": nifti.name if output_format == "nii" else None,
            "spacing": _spacing(nifti, len(shape)) if nifti is not None else None,
            "class_voxels": {str(k if k < L else -1): int(v)  # every class; -1 if any
                             for k, v in enumerate(class_voxels) if v or k < L},
            "files": {k: f"{k}{ext}" for k in OUTPUT_NAMES},
            "rater_confusion": None if cm is None else _jsonable(cm),  # NaN as null
            "history": fit.fields.get("history", [])}
    tmp = out_dir / f".{META_FILE}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out_dir / META_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return load_chunked(out_dir)


def _rater_names(srcs: list[_Source]) -> list[str]:
    """A file's name without its ending for one file per rater (made distinct by the
    parent folder, as ``raterseg fuse`` does), else ``rater1``, ``rater2``, ..."""
    from .datasets import _stem, distinct_names
    from .io import default_rater_names

    names = default_rater_names(len(srcs))
    files = [r for r, s in enumerate(srcs)
             if getattr(s, "index", None) is None and getattr(s, "path", None) is not None]
    paths = [srcs[r].path for r in files]
    for r, name in zip(files, distinct_names(paths, [_stem(Path(p)) for p in paths])):
        names[r] = name
    return names


def _spacing(src: _NiftiSource, ndim: int) -> list[float]:
    """Voxel sizes of a NIfTI source in array order ``(z, y, x)``."""
    return [float(v) for v in reversed(src.header.get_zooms()[:ndim])]


def load_chunked(output_dir: str | os.PathLike) -> FusionResult:
    """The :class:`FusionResult` written by :func:`fuse_chunked`, arrays as read-only memory maps.

    Raises:
        RaterSegError: the folder does not hold a complete chunked result (a file missing,
            or not of the shape ``fusion.json`` records).
    """
    out_dir = Path(output_dir)
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        arrays = {k: _load_output(out_dir / f) for k, f in meta["files"].items()}
        shape, L = tuple(meta["shape"]), int(meta["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RaterSegError(
            f"output_dir: expected a folder written by fuse_chunked, got {out_dir} ({exc})") from None
    for k, a in arrays.items():
        want = (L, *shape) if k == "probabilities" else shape
        if a.shape != want:
            raise RaterSegError(
                f"output_dir: expected {meta['files'][k]} of shape {want} as {META_FILE} in "
                f"{out_dir} records, got shape {a.shape}: the folder mixes two results")
    cm = meta.get("rater_confusion")
    if cm is not None:
        cm = np.array(cm, dtype=np.float64)  # null (a rater all -1) -> NaN
    return FusionResult(
        **arrays,
        rater_confusion=None if cm is None else np.asarray(cm, np.float32),
        method=meta["method"], params=meta["params"], history=meta.get("history", []))


def _load_output(path: Path) -> np.ndarray:
    """A written output as a read-only memory map, NIfTI seen as ``(L?, z, y, x)``."""
    if path.suffix == ".nii":
        import nibabel as nib

        img = nib.load(str(path), mmap="r")
        return np.asanyarray(img.dataobj).T
    return np.load(path, mmap_mode="r", allow_pickle=False)

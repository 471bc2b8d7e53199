"""The ``raterseg`` command (also ``python -m raterseg``).

Subcommands, one ``_add_<name>`` (arguments) and one ``_run_<name>`` (work) each,
listed in :data:`SUBCOMMANDS`; adding one means writing those two functions and
appending the adder::

    raterseg fuse RATER... [--image IMG] --method M [--set k=v ...] -o OUTDIR
    raterseg fuse-dir COHORT --method M [--set k=v ...] [--workers N] -o OUT
    raterseg train DATA --method M [--set k=v ...] -o MODEL
    raterseg predict MODEL IMG... -o OUTDIR
    raterseg methods [--format text|markdown]
    raterseg demo [-o demo-output]

Bad input gives exit code 2 and one line ``raterseg: error: <message>`` on stderr;
``fuse-dir`` exits with 1 when some cases failed (each reported on stderr and in its
summary). Progress goes to stderr, results and tables to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .types import RaterSegError, TrainingEvent

__all__ = ["SUBCOMMANDS", "TextProgress", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"raterseg: error: {message} (see '{self.prog} --help')\n")


class TextProgress:
    """A text progress bar on ``stream`` fed with :class:`TrainingEvent`s.

    On a terminal the bar redraws in place; otherwise (logs, pipes) it writes a line
    at every tenth of the work, so logs stay short. Call :meth:`close` when the work
    ends: EM often stops long before its ``total`` (the iteration limit), and close
    then shows where it stopped and ends the line.
    """

    def __init__(self, label: str = "", stream: TextIO | None = None, width: int = 30,
                 quiet: bool = False) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.quiet = quiet
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1
        self._unshown: TrainingEvent | None = None  # last event not written (logs)
        self._open_line = False  # a bar drawn without its newline (terminal)
        self._previous: TrainingEvent | None = None

    def _text(self, event: TrainingEvent) -> str:
        total = max(int(event.total), 1)
        step = min(max(int(event.step), 0), total)
        filled = self.width * step // total
        bar = "#" * filled + "-" * (self.width - filled)
        message = event.message or ""
        own = f"{self.label.strip()}: "
        if self.label.strip() and message.startswith(own):  # "staple: EM iteration 3"
            message = message[len(own):]
        # numbers the message already gives ("loss 0.41, val_loss 0.38") are not repeated
        metrics = " ".join(f"{k}={v:.4g}" for k, v in (event.metrics or {}).items()
                           if isinstance(v, (int, float))
                           and not re.search(rf"(?<![\w]){re.escape(k)} ", f"{message} "))
        return f"{self.label} [{bar}] {step}/{total} {message} {metrics}".rstrip()

    def __call__(self, event: TrainingEvent) -> None:
        if self.quiet:
            return
        total = max(int(event.total), 1)
        done = int(event.step) >= total
        previous, self._previous = self._previous, event
        if previous is not None and (int(previous.total) != int(event.total)
                                     or int(event.step) < int(previous.step)):
            # a new phase (EM after the slab passes, writing after EM): end the last one
            # where it stopped, which EM often does long before its total
            self.close()
            self._last_tenth = -1
        if self._tty:
            self.stream.write("\r" + self._text(event)[:150].ljust(80) + ("\n" if done else ""))
            self._open_line = not done
        else:
            tenth = min(max(int(event.step), 0), total) * 10 // total
            if tenth == self._last_tenth and not done:
                self._unshown = event
                return
            self._last_tenth = tenth
            self.stream.write(self._text(event) + "\n")
            self._unshown = None
        self.stream.flush()

    def close(self) -> None:
        """End the output: the last unshown event (logs) or the open line (terminal)."""
        if self.quiet:
            return
        if self._unshown is not None:
            self.stream.write(self._text(self._unshown) + "\n")
            self._unshown = None
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.flush()


def _info(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _check_output_folder(output: str | os.PathLike) -> Path:
    """``--output`` checked before any work (:func:`raterseg.io.check_output_folder`)."""
    from .io import check_output_folder

    return check_output_folder(output, "--output")


#: Files :func:`raterseg.io.write_result` may write for ``raterseg fuse``.
_RESULT_FILES = (*(f"{k}.nii.gz" for k in ("truth", "probabilities", "uncertainty",
                                          "disagreement", "rater_maps", "rater_estimates")),
                 "rater_confusion.csv", "summary.json")


def _check_output_spares_inputs(output: str | os.PathLike, inputs: Sequence[str]) -> None:
    """Refuse an ``--output`` folder where a result would replace an input file, or that is
    an input folder (a case folder would then hold rater_maps.* and rater_estimates.*,
    which read as raters the next time it is fused).

    Raises:
        RaterSegError: naming the input.
    """
    out = Path(output).resolve()
    for given in inputs:
        p = Path(given).resolve()
        if p.is_dir() and p == out:
            raise RaterSegError(f"--output: expected a folder apart from the inputs, got the "
                                f"input folder '{given}'")
        if p.parent == out and p.name in _RESULT_FILES:
            raise RaterSegError(f"--output: writing the results to '{output}' would replace the "
                                f"input '{given}'; choose another folder")


#: Settings every method takes that the commands set through options of their own.
_OPTION_SETTINGS = {"seed": "--seed", "device": "--device", "num_classes": "--num-classes"}


def _parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RaterSegError(f"--set: expected key=value, got {item!r}")
        key = key.strip().replace("-", "_")
        if key in _OPTION_SETTINGS:
            raise RaterSegError(f"--set: {key} is set with the option {_OPTION_SETTINGS[key]} "
                                f"(e.g. {_OPTION_SETTINGS[key]} {value.strip() or '...'}), "
                                f"not with --set")
        params[key] = value.strip()
    return params


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _rater_rows(raters: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    """Per-rater sensitivity, specificity and Dice against ``truth`` (foreground = label > 0)."""
    from .metrics import rater_table

    return rater_table(raters, truth)


def _add_threads(p) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (torch.set_num_threads: torch's intra-op threads, which "
                        "also bound raterseg's own threaded work; default: torch's default, "
                        "one per core)")


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (if given) to this process.

    Raises:
        RaterSegError: not a positive number.
    """
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise RaterSegError(f"--threads: expected a positive number of threads, got {n}")
    import torch

    torch.set_num_threads(n)


def _fmt(x: float) -> str:
    return "  n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


# -- fuse ------------------------------------------------------------------------------


def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="fuse one case's raters and write the results",
                       description="Fuse one case: rater label files (or one case folder "
                                   "holding image.* and rater* files, or an LIDC nodule "
                                   "folder) into truth, probabilities, uncertainty and "
                                   "rater confusion matrices.",
                       epilog="Files: .nii/.nii.gz, .tif/.tiff, .npy, .npz, .png (0/255 masks "
                              "read as 0/1). Outputs are NIfTI with the geometry of the image "
                              "(or the first rater). Axis order: arrays are (z, y, x) and a "
                              "NIfTI volume (x, y, z) is read and written transposed, so NIfTI "
                              "in gives NIfTI out in the same orientation, while .npy/.tif "
                              "raters of shape (D, H, W) give NIfTI outputs that nibabel loads "
                              "as (W, H, D) (probabilities: (W, H, D, L)). Example: raterseg "
                              "fuse r1.nii.gz r2.nii.gz r3.nii.gz --method staple --set "
                              "prior=0.2 -o out/")
    p.add_argument("raters", nargs="+", metavar="RATER",
                   help="one label file (or folder of 2D slices) per rater, one .npy or .npz "
                        "holding every rater (R, *S) (.npz: under 'raters', beside an optional "
                        "'image'; or one array per rater, named by its key), or one case folder")
    p.add_argument("--image", help="the image (needed by learned methods)")
    p.add_argument("--method", "-m", default="staple", help="fusion method (default: staple; "
                   "see 'raterseg methods')")
    p.add_argument("--set", dest="params", action="append", metavar="KEY=VALUE",
                   help="a method parameter, repeatable (see 'raterseg methods')")
    p.add_argument("--num-classes", type=int, help="number of classes (default: max label + 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--chunked", action="store_true",
                   help="for volumes bigger than memory: read the raters (.npy or NIfTI files) "
                        "in slabs and write the outputs slab by slab (.nii for 3D NIfTI raters, "
                        "else .npy; majority_vote, mean, staple; results identical to the "
                        "in-memory path)")
    p.add_argument("--chunk-voxels", type=int, default=None, metavar="N",
                   help="voxels per slab with --chunked (default: 8388608)")
    _add_threads(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_fuse)


def _split_stack(labels: np.ndarray) -> np.ndarray:
    """One array ``(R, *S)`` holding every rater as R raters; a rater holding only 0 and 255
    is a 0/1 mask, rater by rater (as ``fuse --chunked`` decides)."""
    from .datasets import is_0_255_mask

    return np.stack([r // 255 if is_0_255_mask(r) else r for r in labels])


def _npz_contents(path: Path) -> tuple[list[str], set[str]]:
    """An ``.npz``'s array names, and those that hold data: rater names, spacings, ids or
    an affine stored beside (:func:`raterseg.io.npz_data_keys`) are no rater."""
    from .io import npz_data_keys, npz_headers, read_npz

    keys = list(read_npz(path, argname="RATER"))
    heads = npz_headers(path)
    return keys, set(npz_data_keys(keys, heads)) if heads else set(keys)


def _read_npz_raters(path: Path) -> tuple[np.ndarray, list[str], np.ndarray | None, dict]:
    """(raters, names, image or None, meta) from one ``.npz`` given alone: the (R, *S) array
    under a rater key (``raters``, ``labels``, ``masks``, ...) as R raters, as for ``.npy``;
    else its one array; else one rater per array, named by its key. An ``image`` key is
    the image.

    Raises:
        RaterSegError: only an image in it, or several arrays that are not one rater each.
    """
    from .datasets import _as_labels
    from .io import NPZ_IMAGE_KEYS, NPZ_LABEL_KEYS, read_array, read_npz

    keys, data = _npz_contents(path)
    image_key = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
    label_keys = [k for k in NPZ_LABEL_KEYS if k in keys]
    label_key = label_keys[0] if label_keys else None
    others = [k for k in keys if k not in NPZ_IMAGE_KEYS and k not in NPZ_LABEL_KEYS
              and k in data]
    if label_key is not None:
        # another array named like raters ('mask_bob' beside 'mask', 'seg2', 'rater_b')
        # makes it unclear which arrays are the raters; anything else beside the raters
        # (an image 'vol', a 'truth', an 'affine') is left alone
        stems = {k.rstrip("s") for k in NPZ_LABEL_KEYS} | {"rater"}
        rivals = [k for k in others if any(k.lower().startswith(t) for t in stems)]
        if rivals or len(label_keys) > 1:
            raise RaterSegError(
                f"RATER: '{path}' holds {label_keys} and other rater-like arrays {rivals}: "
                f"expected one (R, *S) array under {label_key!r}, or one array per rater "
                f"with names of their own (not {list(NPZ_LABEL_KEYS)}); give the raters as "
                "separate files otherwise")
        others = []
    if label_key is None and not others:
        raise RaterSegError(f"RATER: expected raters in '{path}' (an (R, *S) array under "
                            f"'raters'), got only {keys}")
    if label_key is not None or len(others) == 1:
        arr, meta = read_array(path, key=label_key or others[0], argname="RATER")
        labels = _as_labels(arr, meta, "raters")
        if labels.ndim in (3, 4):  # (R, *S), as a .npy holding every rater
            raters = _split_stack(labels)
            names = [f"rater{r + 1}" for r in range(raters.shape[0])]
        else:
            raters, names = labels[None], [label_key or others[0]]
    else:  # one rater per array
        arrays = read_npz(path, others, argname="RATER")
        listing = ", ".join(f"'{k}' {a.shape} {a.dtype}" for k, a in arrays.items())
        if len({a.shape for a in arrays.values()}) != 1:
            raise RaterSegError(
                f"RATER: expected the arrays of '{path}' to be one rater each (one shape) or "
                f"an (R, *S) array under 'raters', got {listing}")
        try:
            labels = [_as_labels(a, {"path": f"{path}:{k}"}, "raters")
                      for k, a in arrays.items()]
        except RaterSegError as err:
            raise RaterSegError(f"RATER: expected the arrays of '{path}' to be one rater each "
                                f"(integer labels), got {listing} ({err})") from None
        raters, names = np.stack(labels), others
        meta = {"path": str(path), "format": "npz", "keys": keys,
                "spacing": (1.0,) * (raters.ndim - 1)}
    image = None
    if image_key is not None:
        image = read_array(path, key=image_key, argname="RATER")[0]
        if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
            raise RaterSegError(f"RATER: expected a numeric image under '{image_key}' in "
                                f"'{path}', got dtype {image.dtype}")
        image = image.astype(np.float32)
    return raters, names, image, meta


def _read_rater_file(path: str) -> tuple[np.ndarray, dict]:
    """One rater's labels from a file or folder; of an ``.npz``, its rater array."""
    from .datasets import _as_labels, read_labels
    from .io import NPZ_IMAGE_KEYS, NPZ_LABEL_KEYS, is_supported, read_array

    p = Path(path)
    if not (p.is_file() and is_supported(p) and p.name.lower().endswith(".npz")):
        return read_labels(p)
    keys, data = _npz_contents(p)
    candidates = [k for k in keys if k not in NPZ_IMAGE_KEYS and k in data]  # no side arrays
    if not any(k in keys for k in NPZ_LABEL_KEYS) and len(candidates) != 1:
        raise RaterSegError(f"RATER: expected one rater in '{p}', got the arrays {keys}"
                            + ("; give it alone to fuse one rater per array" if candidates
                               else ""))
    arr, meta = read_array(p, labels=True, argname="RATER")
    return _as_labels(arr, meta, "raters"), meta


def _note_axis_order(items: Sequence[tuple[tuple[int, ...], dict]],
                     shape: tuple[int, ...]) -> None:
    """One line on stderr where NIfTI and non-NIfTI files meet and the raters' ``shape`` is
    its own reverse (a cube, a square): then the shapes cannot tell whether an array saved
    from nibabel was transposed."""
    formats = {m.get("format") == "nifti" for _, m in items}
    if formats == {True, False} and len(shape) > 1 and shape == shape[::-1]:
        _info(f"raterseg fuse: note: NIfTI files are read as (z, y, x) arrays (their axes "
              f"reversed); the other files of shape {shape} must be in that order too (an "
              f"array from nibabel needs .T), which their shape cannot show")


def _read_inputs(paths: list[str], image_path: str | None):
    """(raters, rater_names, image or None, meta) from the fuse command's arguments."""
    from .datasets import (
        _IMAGE_STEMS,
        AXES_HINT,
        _match_image,
        _stem,
        axes_reversed,
        check_same_grid,
        distinct_names,
        outputs_geometry,
        read_case,
        read_image,
    )

    def is_case(folder: Path) -> bool:
        # rater* files, an LIDC layout, or an image.* file (a case folder whose raters are
        # misnamed: read_case then says what it expected and lists what it found)
        return folder.is_dir() and any(
            e.name.lower().startswith(("rater", "nodule-", "mask-", "images"))
            or _stem(e).lower() in _IMAGE_STEMS for e in folder.iterdir())

    first = Path(paths[0])
    if len(paths) == 1 and is_case(first):
        case = read_case(first)
        raters, names, image, meta = case.raters, case.rater_names, case.image, case.meta
        items = [(raters.shape[1:], meta)]
    elif len(paths) == 1 and first.is_file() and first.name.lower().endswith(".npz"):
        raters, names, image, meta = _read_npz_raters(first)
        items = [(raters.shape[1:], meta)]
        if image is not None and image_path is None:
            try:
                raters = _match_image(image, raters, f"{first}: image")
            except RaterSegError as err:
                raise RaterSegError(f"{err}; an .npz of raters (R, *S) may hold the image "
                                    "(*S) beside them (for a training dataset (N, R, *S) use "
                                    "'raterseg train')") from None
    else:
        for p in map(Path, paths):
            inner = [e for e in p.iterdir() if is_case(e)] if p.is_dir() else []
            if (len(paths) > 1 and is_case(p)) or inner:
                what = "a case folder" if not inner else "a folder of case folders"
                raise RaterSegError(
                    f"RATER: '{p}' is {what}; give one case folder alone, or fuse every case "
                    f"of a folder with 'raterseg fuse-dir'")
        labels, metas = zip(*(_read_rater_file(p) for p in paths))
        check_same_grid(list(zip(paths, metas)), "RATER")
        shapes = [a.shape for a in labels]
        items = list(zip(shapes, metas))
        if len(set(shapes)) != 1:
            listing = ", ".join(f"'{p}' {s}" for p, s in zip(paths, shapes))
            hint = f" ({AXES_HINT})" if axes_reversed(items) else ""
            raise RaterSegError(f"raters: expected every rater's labels to have the same shape, "
                                f"got {listing}{hint}")
        # the outputs take the geometry of the first NIfTI rater (check_same_grid: they share it)
        image = None
        meta = next((m for m in metas if m.get("affine") is not None), metas[0])
        if len(paths) == 1 and metas[0]["format"] == "npy" and labels[0].ndim in (3, 4):
            # one .npy holding (R, *S), as 'fuse --chunked' reads it
            raters = _split_stack(labels[0])
            names = [f"rater{r + 1}" for r in range(raters.shape[0])]
        else:
            raters = np.stack(labels)
            names = distinct_names(paths, [_stem(Path(p)) for p in paths])
    if image_path is not None:
        rater_meta = meta
        image, image_meta = read_image(image_path)
        items = [(tuple(image.shape), image_meta), *items]
        if axes_reversed(items) and tuple(image.shape) != tuple(raters.shape[1:]):
            raise RaterSegError(f"image ('{image_path}'): expected shape {raters.shape[1:]} to "
                                f"match the raters, got {image.shape} ({AXES_HINT})")
        raters = _match_image(image, raters, image_path)
        check_same_grid([(str(paths[0]), rater_meta), (image_path, image_meta)], "--image")
        meta = outputs_geometry(image_meta, rater_meta, raters.ndim - 1)
    _note_axis_order(items, tuple(raters.shape[1:]))
    return raters, names, image, meta


def _run_fuse(args: argparse.Namespace) -> int:
    import raterseg as rs

    from ._device import resolve_device
    from .io import write_result
    from .metrics import rater_table_caption
    from .types import as_rater_stack, check_image

    params = _parse_sets(args.params)
    _set_threads(args)
    # every mistake is reported before any work starts (and before any progress output)
    method = rs.create(args.method, num_classes=args.num_classes, seed=args.seed, **params)
    resolve_device(args.device)
    _check_output_folder(args.output)
    if args.chunked:
        return _run_fuse_chunked(args, params)
    if args.chunk_voxels is not None:
        raise RaterSegError("--chunk-voxels: only used with --chunked")
    _check_output_spares_inputs(args.output, [*args.raters, *filter(None, [args.image])])
    raters, names, image, meta = _read_inputs(args.raters, args.image)
    stack = as_rater_stack(raters, args.num_classes)
    if image is not None:
        check_image(image, stack.spatial_shape)
    elif method.learned:
        raise RaterSegError(f"--image: method {args.method!r} is learned and needs the image: "
                            "pass --image FILE, or name it image.* in the case folder")
    _info(f"raterseg fuse: {len(names)} rater{'s' * (len(names) != 1)}, shape "
          f"{stack.spatial_shape}, {stack.num_classes} classes, method {args.method}", args.quiet)
    progress = TextProgress(args.method, quiet=args.quiet)
    t0 = time.perf_counter()
    try:
        res = rs.fuse(raters, image=image, method=args.method, num_classes=args.num_classes,
                      device=args.device, seed=args.seed, progress=progress, **params)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    written = write_result(args.output, res, meta, rater_names=names)
    rows = []
    for name, row in zip(names, _rater_rows(raters, res.truth)):
        rows.append([name, _fmt(row.get("sensitivity")), _fmt(row.get("specificity")),
                     _fmt(row.get("dice")), _fmt(row.get("annotated"))])
    print(f"{args.method}: fused {len(names)} rater{'s' * (len(names) != 1)} ({res.num_classes} classes, shape "
          f"{tuple(res.truth.shape)}) in {seconds:.2f} s")
    print(rater_table_caption(res.num_classes))
    print(_table(rows, ["rater", "sensitivity", "specificity", "Dice", "annotated"]))
    print(f"wrote {', '.join(p.name for p in written.values())} to {Path(args.output)}/")
    return 0


def _chunked_case_raters(folder: Path) -> list[Path]:
    """The rater files of a case folder, for ``fuse CASE_FOLDER --chunked`` (its image is
    not needed: chunked fusion runs classical methods).

    Raises:
        RaterSegError: no rater files, or raters stored as folders of slices.
    """
    from .datasets import _case_paths, _entries

    raters = _case_paths(_entries(folder))[1]
    if not raters or any(r.is_dir() for r in raters):
        how = "raters stored as folders of slices" if raters else "no rater* files"
        raise RaterSegError(
            f"RATER: --chunked reads one file per rater (.nii, .nii.gz or .npy); the case "
            f"folder '{folder}' has {how}")
    return raters


def _run_fuse_chunked(args: argparse.Namespace, params: dict[str, str]) -> int:
    """``raterseg fuse --chunked``: :func:`raterseg.fuse_chunked` on the rater files."""
    import raterseg as rs

    from .chunked import CHUNK_VOXELS, check_chunkable

    check_chunkable(rs.create(args.method, **params))
    if args.image is not None:
        raise RaterSegError("--image: chunked fusion runs classical methods, which need no image")
    if args.chunk_voxels is not None and args.chunk_voxels < 1:
        raise RaterSegError(f"--chunk-voxels: expected a positive number of voxels, got "
                            f"{args.chunk_voxels}")
    paths = args.raters[0] if len(args.raters) == 1 else list(args.raters)
    if len(args.raters) == 1 and Path(paths).is_dir():
        paths = _chunked_case_raters(Path(paths))
    _info(f"raterseg fuse --chunked: method {args.method}, writing to {Path(args.output)}/",
          args.quiet)
    chunk_voxels = CHUNK_VOXELS if args.chunk_voxels is None else args.chunk_voxels
    progress = TextProgress(args.method, quiet=args.quiet)
    t0 = time.perf_counter()
    try:
        res = rs.fuse_chunked(paths, args.output, method=args.method,
                              num_classes=args.num_classes, device=args.device, seed=args.seed,
                              chunk_voxels=chunk_voxels, progress=progress, **params)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    meta = json.loads((Path(args.output) / "fusion.json").read_text())
    names = meta["rater_names"]
    cm = res.rater_confusion
    L = res.num_classes
    print(f"{args.method}: fused {len(names)} rater{'s' * (len(names) != 1)} ({L} classes, shape "
          f"{tuple(res.truth.shape)}) in {seconds:.2f} s, in slabs")
    if L == 2:
        rows = [[n, _fmt(float(c[1, 1])), _fmt(float(c[0, 0]))] for n, c in zip(names, cm)]
        print("Each rater against the fused truth (from its confusion matrix):")
        print(_table(rows, ["rater", "sensitivity", "specificity"]))
    else:
        rows = [[n] + [_fmt(float(c[j, j])) for j in range(L)] for n, c in zip(names, cm)]
        print("Each rater: p(says class j | truth j), from its confusion matrix:")
        print(_table(rows, ["rater"] + [f"class {j}" for j in range(L)]))
    files = [*meta["files"].values(), "rater_confusion.csv", "fusion.json"]
    print(f"wrote {', '.join(files)} to {Path(args.output)}/")
    return 0


# -- methods ---------------------------------------------------------------------------


def _add_methods(sub) -> None:
    p = sub.add_parser("methods", help="list the fusion methods and their parameters",
                       description="Every registered method with its parameters (name, type, "
                                   "default, help), as accepted by --set KEY=VALUE.")
    p.add_argument("--format", choices=("text", "markdown"), default="text")
    p.set_defaults(func=_run_methods)


def _describe_param(info) -> tuple[str, str, str, str]:
    t = getattr(info.type, "__name__", str(info.type))
    default = ",".join(map(str, info.default)) if isinstance(info.default, tuple) else str(info.default)
    extra = []
    if info.choices is not None:
        extra.append("one of " + "|".join(map(str, info.choices)))
    if info.low is not None or info.high is not None:
        lo = "" if info.low is None else f"{info.low:g} <= "
        hi = "" if info.high is None else f" <= {info.high:g}"
        extra.append(f"{lo}x{hi}")
    help_ = info.help + (f" ({'; '.join(extra)})" if extra else "")
    return info.name, t, default, help_


def _md_cell(value) -> str:
    """A markdown table cell: a bare ``|`` (as in "one of lowest|undecided") would end it."""
    return str(value).replace("|", "\\|")


def _run_methods(args: argparse.Namespace) -> int:
    import raterseg as rs

    out = []
    for name in rs.available_methods():
        cls = rs.get_method(name)
        kind = "learned" if cls.learned else "classical"
        doc = (cls.__doc__ or "").strip().splitlines()
        rows = [_describe_param(i) for i in cls.params()]
        if args.format == "markdown":
            out.append(f"### `{name}` ({kind})\n\n{doc[0] if doc else ''}\n")
            if rows:
                out.append("| parameter | type | default | help |\n| --- | --- | --- | --- |")
                out.extend(f"| `{a}` | {_md_cell(b)} | `{_md_cell(c)}` | {_md_cell(d)} |"
                           for a, b, c, d in rows)
            else:
                out.append("No parameters.")
            out.append("")
        else:
            out.append(f"{name} ({kind}){': ' + doc[0] if doc else ''}")
            if rows:
                out.append("\n".join("    " + ln for ln in
                                     _table([list(r) for r in rows],
                                            ["parameter", "type", "default", "help"]).splitlines()))
            else:
                out.append("    (no parameters)")
            out.append("")
    print("\n".join(out).rstrip())
    return 0


# -- demo ------------------------------------------------------------------------------


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fuse a simulated 3D phantom with every classical method",
                       description="Simulate raters of known quality on a 3D phantom, fuse "
                                   "them with every classical method, write NIfTI results "
                                   "and print how each rater and method compares with the "
                                   "known truth.")
    p.add_argument("--output", "-o", default="demo-output", help="output folder "
                   "(default: demo-output)")
    p.add_argument("--raters", type=int, default=5, help="number of simulated raters (default 5)")
    p.add_argument("--shape", default="64,128,128", help="phantom size D,H,W (default 64,128,128)")
    p.add_argument("--methods", help="comma-separated methods (default: every classical one)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_threads(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_demo)


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 8:
        raise RaterSegError(f"--shape: expected three sizes >= 8 like 64,128,128, got {text!r}")
    return shape  # type: ignore[return-value]


def _run_demo(args: argparse.Namespace) -> int:
    import raterseg as rs

    from . import synth
    from ._device import resolve_device
    from .io import write_array, write_result
    from .metrics import dice

    shape = _parse_shape(args.shape)
    _set_threads(args)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in methods:
            if rs.get_method(m).learned:
                raise RaterSegError(f"--methods: the demo runs classical methods, got {m!r}")
    else:
        methods = rs.available_methods(learned=False)
    out = _check_output_folder(args.output)
    device = resolve_device(args.device)  # imports torch once, before any timing
    _info(f"raterseg demo: simulating {args.raters} raters on a {'x'.join(map(str, shape))} "
          f"phantom (seed {args.seed})", args.quiet)
    image, raters, truth = synth.sample_case(dims=3, num_raters=args.raters, seed=args.seed,
                                             shape=shape)
    kinds = [synth.SAMPLE_KINDS[r % len(synth.SAMPLE_KINDS)] for r in range(args.raters)]
    names = [f"rater{r + 1}" for r in range(args.raters)]
    write_array(out / "image.nii.gz", image)
    write_array(out / "known_truth.nii.gz", truth)
    for name, lab in zip(names, raters):
        write_array(out / f"{name}.nii.gz", lab)

    results, seconds = {}, {}
    for m in methods:
        progress = TextProgress(f"  {m}", quiet=args.quiet)
        _info(f"fusing with {m} ...", args.quiet)
        t0 = time.perf_counter()
        try:
            results[m] = rs.fuse(raters, image=image, method=m, device=device, seed=args.seed,
                                 progress=progress)
        finally:
            progress.close()
        seconds[m] = time.perf_counter() - t0
        write_result(out / m, results[m], rater_names=names)

    rows = []
    for name, kind, row in zip(names, kinds, _rater_rows(raters, truth)):
        rows.append([name, kind, _fmt(row.get("sensitivity")), _fmt(row.get("specificity")),
                     _fmt(row.get("dice"))])
    print(f"raterseg demo: 3D phantom {'x'.join(map(str, shape))}, {args.raters} simulated "
          f"raters, device {device}")
    print("\nEach rater against the known truth:")
    print(_table(rows, ["rater", "kind", "sensitivity", "specificity", "Dice"]))

    print("\nEach method's fused truth against the known truth:")
    mrows = [[m, _fmt(float(dice(results[m].truth, truth))), f"{seconds[m]:.3f}"]
             for m in methods]
    print(_table(mrows, ["method", "Dice", "time (s)"]))

    est = [m for m in methods if results[m].rater_confusion is not None]
    if est:
        print("\nRater sensitivity / specificity as each method estimates them "
              "(from rater_confusion):")
        erows = []
        for r, name in enumerate(names):
            row = [name]
            for m in est:
                cm = results[m].rater_confusion[r]
                row.append(f"{_fmt(float(cm[1, 1])).strip()} / "
                           f"{_fmt(float(cm[0, 0])).strip()}")
            erows.append(row)
        print(_table(erows, ["rater", *est]))
    print(f"\nWrote image.nii.gz, known_truth.nii.gz, rater*.nii.gz and one folder per method "
          f"({', '.join(methods)}) to {out}/")
    return 0


# -- train -----------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a learned method on a dataset and save the model",
                       description="Train a learned method on many cases: DATA is a cohort "
                                   "folder (case folders with image.* and rater* files, or "
                                   "LIDC patient folders; cases of one spatial shape) or an "
                                   ".npz holding 'images' (N, C?, *S) and 'raters' (N, R, *S) "
                                   "(or LIDC's 'masks'). Raters are matched across cases by "
                                   "name. The model is saved as safetensors with its "
                                   "configuration (no pickle).",
                       epilog="Example: raterseg train lidc_dev.npz --method cm --set epochs=20 "
                              "-o cm.safetensors. Under 'torchrun --nproc_per_node=N' the same "
                              "command trains data-parallel on N processes (one GPU each, or "
                              "CPU processes); batch_size is per process and only rank 0 "
                              "prints and writes the model.")
    p.add_argument("data", metavar="DATA", help="cohort folder or .npz dataset")
    p.add_argument("--method", "-m", required=True, help="a learned method (see 'raterseg "
                   "methods')")
    p.add_argument("--set", dest="params", action="append", metavar="KEY=VALUE",
                   help="a method parameter, repeatable (e.g. --set epochs=20)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: max label + 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--output", "-o", required=True, metavar="MODEL",
                   help="model file to write (e.g. model.safetensors)")
    _add_threads(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from . import _distributed

    _set_threads(args)
    # under torchrun: join the process group (gloo on the CPU, nccl with cuda:LOCAL_RANK)
    device = _distributed.setup(args.device)
    try:
        return _train_and_save(args, device)
    finally:
        _distributed.teardown()


def _train_and_save(args: argparse.Namespace, device) -> int:
    import raterseg as rs

    from . import _distributed
    from .cohort import load_training_set

    params = _parse_sets(args.params)
    if not rs.get_method(args.method).learned:
        learned = ", ".join(rs.available_methods(learned=True))
        raise RaterSegError(f"--method: train needs a learned method ({learned}), got the "
                            f"classical {args.method!r}; use 'raterseg fuse' or 'fuse-dir'")
    parallel = _distributed.is_distributed()
    main_rank = _distributed.is_main()
    quiet = args.quiet or not main_rank
    method = rs.create(args.method, num_classes=args.num_classes,
                       device=str(device) if parallel else args.device, seed=args.seed, **params)
    out = Path(args.output)
    if out.is_dir() or str(args.output).endswith(("/", os.sep)):
        raise RaterSegError(f"--output: expected a model file name (e.g. model.safetensors), "
                            f"got the folder '{args.output}'")
    # checked on every process before training (rank 0 creates the folder only at the end)
    _check_output_folder(out.absolute().parent)
    images, raters, ids, rater_names = load_training_set(args.data)
    top = int(raters.max()) if raters.size else 0
    if args.num_classes is not None and top >= args.num_classes:  # before any progress line
        raise RaterSegError(f"DATA: expected labels in 0..{args.num_classes - 1} (--num-classes "
                            f"{args.num_classes}) in '{args.data}', got a label {top}")
    _info(f"raterseg train: {len(ids)} case{'s' * (len(ids) != 1)}, {raters.shape[1]} raters, "
          f"shape {tuple(raters.shape[2:])}, method {args.method}, device {device}"
          + (f", {_distributed.world_size()} processes" if parallel else ""), quiet)
    progress = TextProgress(args.method, quiet=quiet)
    t0 = time.perf_counter()
    try:
        method.fit(images, raters, progress=progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    if not main_rank:  # rank 0 writes and reports; the others wait until it has
        _distributed.barrier()
        return 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RaterSegError(f"--output: cannot create the folder '{out.parent}' "
                            f"({exc.strerror or exc})") from None
    method.rater_names_ = rater_names  # predict names the raters' outputs after them
    method.save(out)
    _distributed.barrier()
    history = getattr(method, "history_", [])
    n_cases, n_epochs, n_raters = len(ids), len(history), raters.shape[1]
    print(f"{args.method}: trained on {n_cases} case{'s' * (n_cases != 1)} ({n_raters} "
          f"rater{'s' * (n_raters != 1)}, {method.num_classes} classes) for {n_epochs} "
          f"epoch{'s' * (n_epochs != 1)} in {seconds:.1f} s" + _kept_epochs(history))
    print(f"wrote {out}")
    return 0


def _kept_epochs(history: list[dict]) -> str:
    """"; kept epoch 7: loss=... val_loss=..." for the weights training kept: per training
    run (AVAP's two steps are two runs, told apart by ``step``), the first epoch with the
    lowest validation loss (training loss without a validation split), as the engine keeps."""
    runs: dict[Any, list[dict]] = {}
    for h in history:
        runs.setdefault(h.get("step"), []).append(h)
    parts = []
    for run_step, recs in runs.items():
        key = "val_loss" if all("val_loss" in h for h in recs) else "loss"
        kept = min(recs, key=lambda h: h.get(key, math.inf))
        losses = " ".join(f"{k}={v:.4g}" for k, v in kept.items()
                          if isinstance(v, (int, float)) and k not in ("epoch", "step"))
        where = f" (step {run_step})" if run_step is not None else ""
        parts.append(f"epoch {kept.get('epoch')}{where}: {losses}")
    return "; kept " + "; ".join(parts) if parts else ""


# -- predict ---------------------------------------------------------------------------


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images with a saved model",
                       description="Segment new images with a model saved by 'raterseg "
                                   "train' (raters not needed). Each image's results go to "
                                   "OUTDIR/<image name>/ as NIfTI with the image's geometry "
                                   "(images of one name: OUTDIR/<its folder>/). A case folder "
                                   "(image.* beside rater files) gives its image, a folder of "
                                   "case folders each case's image, named by the case. "
                                   "A model trained on 2D images segments a 3D volume slice "
                                   "by slice.",
                       epilog="Example: raterseg predict cm.safetensors ct1.nii.gz ct2.nii.gz "
                              "-o predictions/")
    p.add_argument("model", metavar="MODEL", help="model file written by 'raterseg train'")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files, folders of 2D "
                   "slices, case folders or folders of case folders")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    _add_threads(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_predict)


def _as_batch(model, image: np.ndarray, where: str,
              colour: int | None = None) -> tuple[np.ndarray, bool]:
    """One image ``(*S)`` or ``(C, *S)`` as the batch ``model.predict`` wants, and whether
    it is a volume cut into slices (a 2D model given a single-channel ``(D, H, W)``).
    ``colour``: the channel count of a colour image (its channels moved first by the
    reader), which must be the model's: it is never a stack of slices.

    Raises:
        RaterSegError: the image's rank or channel count does not fit the model.
    """
    rank, channels = model.data_ndim_, model.in_channels_
    if colour is not None and colour != channels:
        raise RaterSegError(
            f"IMG ('{where}'): expected {channels} channel(s) like the training data, got a "
            f"colour image with {colour}")
    if image.ndim == rank:
        return image[None, None], False
    if image.ndim == rank + 1 and image.shape[0] == channels and channels > 1:
        return image[None], False
    if rank == 2 and image.ndim == 3 and channels == 1:
        return image[:, None], True  # (D, H, W) -> D slices (D, 1, H, W)
    if image.ndim == rank + 1 and image.shape[0] == channels:
        return image[None], False
    raise RaterSegError(
        f"IMG ('{where}'): expected a {rank}D image with {channels} channel(s) like the "
        f"training data ((*S) or (C, *S)), got shape {image.shape}")


def _predict_one(model, batch: np.ndarray, slices: bool):
    """A one-case :class:`FusionResult` from :func:`_as_batch`'s output; for a volume cut
    into slices the slice axis goes back in front of (H, W) on every field."""
    from .types import FusionResult

    res = model.predict(batch)

    def one(arr, spatial_at: int):
        if arr is None:
            return None
        return np.moveaxis(arr, 0, spatial_at) if slices else arr[0]

    # no raters, so no observed disagreement (the result holds zeros): not written
    return FusionResult(
        truth=one(res.truth, 0), probabilities=one(res.probabilities, 1),
        uncertainty=one(res.uncertainty, 0), disagreement=None,
        rater_confusion=res.rater_confusion,
        rater_maps=one(res.rater_maps, 1), rater_estimates=one(res.rater_estimates, 2),
        method=res.method, params=res.params, history=res.history)


def _case_image(folder: Path) -> Path | None:
    """The ``image.*`` file (or ``image/`` slice folder, LIDC's ``images/``) of a case
    folder; None if it has none.

    Raises:
        RaterSegError: several of them.
    """
    from .datasets import _case_paths, _entries

    found = _case_paths(_entries(folder))[0]
    if len(found) > 1:
        raise RaterSegError(f"IMG: expected one image in the case folder '{folder}', got "
                            f"{[e.name for e in found]}")
    return found[0] if found else None


def _predict_inputs(given: Sequence[str]) -> list[tuple[Path, Path]]:
    """(image to read, path naming its output) for each IMG: a file, or a folder of 2D
    slices, as given; a case folder (the layout of train and fuse-dir) its ``image.*``
    only, named by the folder; a cohort folder the image of each of its cases (also one
    level deeper, as LIDC patient/nodule folders), named by the case folders.

    Raises:
        RaterSegError: a folder holding rater files but no image.
    """
    from .datasets import _entries, _looks_like_case

    inputs: list[tuple[Path, Path]] = []
    for g in map(Path, given):
        if not g.is_dir():
            inputs.append((g, g))
            continue
        image = _case_image(g)
        if image is not None:
            inputs.append((image, g))
            continue
        subs = [e for e in _entries(g) if e.is_dir()]
        cases = [(i, e) for e in subs if (i := _case_image(e)) is not None]
        if not cases:
            cases = [(i, n) for e in subs for n in _entries(e)
                     if n.is_dir() and (i := _case_image(n)) is not None]
        if cases:
            inputs.extend(cases)
            found = {e for _, e in cases}
            for e in subs:  # a case that lost its image is named, not silently left out
                if e not in found and _looks_like_case(e):
                    print(f"raterseg predict: case folder '{e}' left out: it holds rater "
                          "files but no image (image.*)", file=sys.stderr, flush=True)
        elif _looks_like_case(g):
            raise RaterSegError(f"IMG: '{g}' holds rater files but no image (image.*): "
                                "predict segments the image of a case folder")
        else:
            inputs.append((g, g))  # a folder of 2D slices
    return inputs


def _run_predict(args: argparse.Namespace) -> int:
    from ._device import resolve_device
    from .datasets import _looks_like_case, _stem, distinct_names, read_image
    from .io import write_result
    from .serialization import load_method, read_header

    out = _check_output_folder(args.output)
    read_header(args.model, "MODEL")  # a wrong model file fails before any slow import
    _set_threads(args)
    # every image is read and checked before anything is written
    found = _predict_inputs(args.images)
    # one output folder per image, named by the file (or case folder); where names clash,
    # by the folder above it (a/image.nii.gz, b/image.nii.gz: a, b)
    sources = [source for _, source in found]
    names = distinct_names(sources, [_stem(q) or "image" for q in sources], sep="_")
    for (p, _), name in zip(found, names):  # never write into an input's own folder
        where = Path(p).resolve()
        folder = where if where.is_dir() else where.parent
        target, root = (out / name).resolve(), out.resolve()
        # into the image's folder, or, for a case folder, into it or into any folder that
        # holds it (its cohort, or a cohort of sites), where rater_maps.* would read as
        # raters or the new folder as a case
        if target == folder or (_looks_like_case(folder)
                                and (root == folder or root in folder.parents)):
            raise RaterSegError(
                f"--output: the result for '{p}' would go to '{out / name}', in or beside "
                "the image's own folder or in a folder that holds it, where its "
                "rater_maps/rater_estimates would read as raters (or as a case) the next "
                "time it is fused; choose a folder apart from the inputs")
    inputs = [(p, *read_image(p, argname="IMG")) for p, _ in found]
    for p, image, _ in inputs:
        if not np.isfinite(image).all():
            raise RaterSegError(f"IMG ('{p}'): contains NaN or infinite values")
    device = resolve_device(args.device)
    model = load_method(args.model, device=args.device)
    batches = [_as_batch(model, image, str(p),
                         image.shape[0] if meta.get("channels_moved_first") else None)
               for p, image, meta in inputs]
    _info(f"raterseg predict: {len(inputs)} image{'s' * (len(inputs) != 1)} with a "
          f"{model.name!r} model ({model.num_classes} classes, {model.num_raters} raters), "
          f"device {device}", args.quiet)
    progress = TextProgress("predict", quiet=args.quiet)
    rows = []
    try:
        for i, ((_, _, meta), (batch, slices), name) in enumerate(zip(inputs, batches, names)):
            t0 = time.perf_counter()
            res = _predict_one(model, batch, slices)
            write_result(out / name, res, meta, rater_names=model.rater_names_)
            fg = float((res.truth > 0).mean())
            rows.append([name, "x".join(map(str, res.truth.shape)), f"{fg:.4f}",
                         f"{float(res.uncertainty.mean()):.4f}",
                         f"{time.perf_counter() - t0:.2f}"])
            progress(TrainingEvent(i + 1, len(inputs), name))
    finally:
        progress.close()
    print(_table(rows, ["image", "shape", "foreground", "mean uncertainty", "time (s)"]))
    print(f"wrote one folder per image to {out}/")
    return 0


# -- fuse-dir --------------------------------------------------------------------------


def _add_fuse_dir(sub) -> None:
    p = sub.add_parser("fuse-dir", help="fuse every case of a cohort folder (resumable)",
                       description="Fuse every case folder under COHORT (image.* and rater* "
                                   "files, or LIDC patient/nodule folders) into OUT/<case>/, "
                                   "and write OUT/summary.csv (per case and rater: "
                                   "sensitivity, specificity, Dice against the fused truth). "
                                   "Cases finished by an earlier run with the same method, "
                                   "parameters and input files are skipped (--force fuses "
                                   "them again); a failing case is reported and "
                                   "the others go on (exit code 1 if any failed). "
                                   "Sub-folders that are no case are named on stderr.",
                       epilog="Example: raterseg fuse-dir cohort/ --method staple --workers 2 "
                              "-o fused/")
    p.add_argument("cohort", metavar="COHORT", help="folder of case folders")
    p.add_argument("--method", "-m", default="staple", help="fusion method (default: staple)")
    p.add_argument("--set", dest="params", action="append", metavar="KEY=VALUE",
                   help="a method parameter, repeatable")
    p.add_argument("--workers", "-j", type=int, default=1,
                   help="processes fusing cases at once, this one included (default 1)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: per case, "
                   "max label + 1)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="fuse every case again, even those an earlier run finished with the "
                        "same method, parameters and input files")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of each process (torch.set_num_threads; default: torch's "
                        "default, one per core, with --workers 1, else the cores shared out "
                        "among the workers)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    p.set_defaults(func=_run_fuse_dir)


def _run_fuse_dir(args: argparse.Namespace) -> int:
    from .cohort import fuse_cohort

    params = _parse_sets(args.params)
    _set_threads(args)
    _check_output_folder(args.output)
    progress = TextProgress(f"fuse-dir {args.method}", quiet=args.quiet)

    def on_case(row: dict) -> None:
        # failures and ignored folders are always shown, even with -q
        if row["status"] == "failed":
            progress.close()
            print(f"raterseg fuse-dir: case '{row['case']}' failed: "
                  f"{_cli_words(str(row['error']))}",
                  file=sys.stderr, flush=True)
        elif row["status"] == "ignored":
            progress.close()
            print(f"raterseg fuse-dir: folder '{row['case']}' ignored: {row['error']}",
                  file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        rows = fuse_cohort(args.cohort, args.output, args.method, workers=args.workers,
                           progress=progress, num_classes=args.num_classes, device=args.device,
                           seed=args.seed, on_case=on_case, force=args.force,
                           threads=args.threads, **params)
    except RaterSegError as e:  # name the arguments as the user typed them
        msg = str(e)
        for api, cli in (("cohort_dir: ", "COHORT: "), ("out_dir: ", "--output: ")):
            if msg.startswith(api):
                raise RaterSegError(cli + msg[len(api):]) from None
        raise
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    table = []
    for row in rows:
        dice = [s["dice"] for s in row.get("rater_stats") or [] if s.get("dice") is not None]
        status = row["status"] + (f" (replaced {row['replaced']})" if row.get("replaced") else "")
        table.append([row["case"], status, str(row.get("raters", "")),
                      f"{float(row['seconds']):.2f}" if row.get("seconds") is not None else "",
                      _fmt(float(np.nanmean(dice))) if dice and np.isfinite(dice).any() else "",
                      ])
    print(_table(table, ["case", "status", "raters", "time (s)", "mean rater Dice"]))
    count = {k: sum(r["status"] == k for r in rows)
             for k in ("fused", "skipped", "failed", "ignored")}
    cases = len(rows) - count["ignored"]
    ignored = (f", {count['ignored']} folder{'s' * (count['ignored'] != 1)} ignored"
               if count["ignored"] else "")
    print(f"{args.method}: {count['fused']} fused, {count['skipped']} already done, "
          f"{count['failed']} failed, of {cases} case{'s' * (cases != 1)}{ignored} in "
          f"{seconds:.1f} s; per-rater statistics in {Path(args.output) / 'summary.csv'}")
    _warn_mixed_classes(rows)
    return 1 if count["failed"] else 0


def _warn_mixed_classes(rows: list[dict]) -> None:
    """Say on stderr when a cohort's cases were fused with different numbers of classes:
    without --num-classes each case has its largest label + 1, so a lesion-free case gets
    2-class outputs beside 3-class ones (train takes the cohort's largest label)."""
    classes = {r["case"]: int(r["classes"]) for r in rows
               if r["status"] in ("fused", "skipped") and r.get("classes") is not None}
    if len(set(classes.values())) < 2:
        return
    top = max(classes.values())
    fewer = [c for c, n in classes.items() if n < top]
    listing = ", ".join(fewer[:5]) + (f" and {len(fewer) - 5} more" if len(fewer) > 5 else "")
    print(f"raterseg fuse-dir: note: {len(fewer)} case{'s' * (len(fewer) != 1)} ({listing}) "
          f"had fewer classes than the {top} of the others, so their probability maps and "
          f"confusion matrices have fewer classes too; pass --num-classes {top} for one layout",
          file=sys.stderr, flush=True)


# -- entry point -----------------------------------------------------------------------

#: Functions adding one subcommand each (its parser and its ``func``), in help order.
SUBCOMMANDS: list[Callable[[Any], None]] = [_add_fuse, _add_fuse_dir, _add_train,
                                              _add_predict, _add_methods, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="raterseg", description="Fuse several raters' segmentations into "
                     "a truth estimate, rater models and uncertainty maps.")
    parser.add_argument("--version", action="version", version=f"raterseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _cli_words(message: str) -> str:
    """A library message in the command's words: "num_classes=256" (the Python argument)
    is the option "--num-classes 256" here."""
    return re.sub(r"\bnum_classes=(\d+)", r"--num-classes \1", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``raterseg`` command; returns the exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error (already printed)
        return int(stop.code or 0)
    try:
        return int(args.func(args) or 0)
    except RaterSegError as err:
        msg = _cli_words(str(err)) if hasattr(args, "num_classes") else str(err)
        print(f"raterseg: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raterseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. 'raterseg methods | head': the reader has gone
        # point stdout at /dev/null so that the interpreter's final flush fails no more
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a tool that SIGPIPE ended


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Cohorts: fuse every case of a folder (resumable, in parallel) and stack cases for training.

:func:`fuse_cohort` fuses each case folder of a cohort (layouts of
:func:`raterseg.datasets.find_cases`) and writes ``OUT/<case>/`` with
:func:`raterseg.io.write_result`, then ``OUT/<case>/case.json`` — the marker, written
last and atomically — and finally ``OUT/summary.csv``. A rerun skips cases whose
marker says they were fused with the same method and parameters from the same input
files (each file's path, size and modification time are recorded; a replaced or added
rater file makes the case be fused again) and whose output files are all there, so an
interrupted run picks up where it stopped; ``force=True`` fuses every case again. A case
that fails (an unreadable file, shapes that disagree, ...) gets a row with its error and
the others go on. Sub-folders of the cohort that are no case (an image without rater*
files, masks named ``seg1.nii.gz``) get a row with status "ignored" and the reason.

:func:`load_training_set` turns a cohort folder or an ``.npz`` dataset into the
arrays ``fit`` wants.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import csv
import io as _pyio
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .types import RaterSegError, TrainingEvent

__all__ = ["MARKER", "SUMMARY_COLUMNS", "fuse_cohort", "load_training_set"]

#: Per-case marker: written last, so its presence means the case's outputs are complete.
MARKER = "case.json"
#: Columns of ``summary.csv``: one row per rater of each case (case columns repeated);
#: a failed case has one row with the rater columns empty and ``error`` set.
SUMMARY_COLUMNS = ("case", "status", "method", "seconds", "voxels", "raters", "classes",
                   "rater", "annotated", "sensitivity", "specificity", "dice", "error")


# -- fusing a cohort ---------------------------------------------------------------------


def _case_names(root: Path, case_dirs: list[Path]) -> list[str]:
    """Output names: the path below the cohort folder (``patient/nodule-N`` for LIDC)."""
    names = []
    for d in case_dirs:
        names.append(d.name if d == root else d.relative_to(root).as_posix())
    return names


def _inputs(case_dir: str | os.PathLike) -> list[dict]:
    """The input files of a case (:func:`raterseg.datasets.case_files`) as the marker
    records them: ``path`` (relative to the case folder), ``size``, ``mtime_ns``. A file
    that vanishes while this runs is left out (the case then reads as changed)."""
    from .datasets import case_files

    folder = Path(case_dir)
    record = []
    for f in case_files(folder):
        try:
            st = f.stat()
        except OSError:
            continue
        record.append({"path": f.relative_to(folder).as_posix(), "size": int(st.st_size),
                       "mtime_ns": int(st.st_mtime_ns)})
    return record


def _input_changes(old: list, new: list[dict]) -> str:
    """The files that differ between two input records ("rater2.nii.gz modified,
    rater3.nii.gz new"), at most five named."""
    try:
        before = {str(e["path"]): (e.get("size"), e.get("mtime_ns")) for e in old}
    except (TypeError, KeyError, AttributeError):  # a marker edited by hand
        return "inputs not recorded"
    now = {e["path"]: (e["size"], e["mtime_ns"]) for e in new}
    items = [f"{p} {'new' if p not in before else 'modified'}" for p in now
             if before.get(p) != now[p]]
    items += [f"{p} removed" for p in before if p not in now]
    more = f" and {len(items) - 5} more" if len(items) > 5 else ""
    return f"inputs changed ({', '.join(items[:5])}{more})"


def _given(method: str, params: dict) -> dict:
    """``params`` less the entries at ``method``'s default (compared as JSON values, so a
    marker's ``[3, 3]`` is the default ``(3, 3)``); ``params`` itself for an unknown method."""
    import raterseg as rs

    from .io import _jsonable

    try:
        defaults = {i.name: _jsonable(i.default) for i in rs.get_method(method).params()}
    except RaterSegError:
        return params
    return {k: v for k, v in params.items() if k not in defaults or defaults[k] != _jsonable(v)}


def _earlier_result(case_out: Path, method: str, params: dict, settings: dict,
                    inputs: list[dict], force: bool = False) -> tuple[dict | None, str | None]:
    """What ``case_out`` already holds, from its marker (read once).

    Args:
        params: the parameters given, less those at their default.
        inputs: the case's input files now (:func:`_inputs`).
        force: never report a finished result as done.

    Returns:
        ``(done, replaced)``: ``done`` is the marker's row when the folder holds a complete
        result of ``method`` with ``params`` and ``settings`` (num_classes, seed) made from
        the same ``inputs``: nothing to do. ``replaced`` describes a finished result that
        this run will overwrite: of another method, parameters or settings ("staple",
        'majority_vote {"tie": "undecided"}', "staple, seed 0"), of other inputs ("staple,
        inputs changed (rater2.nii.gz modified, rater3.nii.gz new)"), of unknown inputs (a
        marker written before raterseg recorded them: "staple, inputs not recorded"), or
        one redone because of ``force`` ("staple, redo forced"). Both None otherwise (no
        result yet, or this run's own result with a lost file, which is redone).
    """
    from .io import _jsonable

    try:
        row = json.loads((case_out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(row, dict) or row.get("status") != "fused":
        return None, None
    old_params, old_settings = row.get("params") or {}, row.get("settings") or {}
    if isinstance(old_params, dict):  # earlier versions recorded parameters at their default
        old_params = _given(str(row.get("method")), old_params)
    text = str(row.get("method"))
    if old_params:
        text += f" {json.dumps(old_params, sort_keys=True)}"
    changed = [f"{k} {old_settings.get(k)}" for k in sorted(settings)
               if old_settings.get(k) != settings.get(k)]
    same_run = row.get("method") == method and old_params == _jsonable(params) \
        and row.get("settings") == settings
    old_inputs = row.get("inputs")
    if not isinstance(old_inputs, list):
        changed.append("inputs not recorded")
    elif old_inputs != inputs:
        changed.append(_input_changes(old_inputs, inputs))
    if same_run and len(changed) == 0:
        if force:
            return None, f"{text}, redo forced"
        files = row.get("files") or []
        complete = bool(files) and all((case_out / f).is_file() for f in files)
        other = _result_written_since(case_out, method, params)
        if complete and other:  # e.g. 'raterseg fuse CASE -m mean -o OUT/case'
            return None, f"{text}, result since rewritten by {other}"
        return (row if complete else None), None
    return None, ", ".join([text, *changed])


def _result_written_since(case_out: Path, method: str, params: dict) -> str | None:
    """The method (and parameters) of the result in ``case_out`` when its summary.json is
    not the one fuse-dir wrote for ``method`` with ``params``: a result fused there by hand
    afterwards keeps fuse-dir's marker and, writing the same files, would pass as done."""
    from .io import _jsonable

    try:
        summary = json.loads((case_out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no summary to compare: the file check decides
    if not isinstance(summary, dict):
        return None
    theirs = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    theirs = _given(str(summary.get("method")), theirs)
    if summary.get("method") == method and _jsonable(theirs) == _jsonable(params):
        return None
    shown = f" {json.dumps(theirs, sort_keys=True)}" if theirs else ""
    return f"{summary.get('method')}{shown}"


def _fuse_one(case_dir: str, name: str, out_dir: str, method: str, params: dict,
              num_classes: int | None, device: Any, seed: int) -> dict:
    """Read, fuse and write one case; never raises for a problem of the case (returns its row)."""
    import raterseg as rs

    from .datasets import read_case
    from .io import _jsonable, _write_text, write_result
    from .metrics import rater_table

    row: dict[str, Any] = {"case": name, "method": method, "params": _jsonable(params),
                           "settings": {"num_classes": num_classes, "seed": seed},
                           "process": os.getpid()}
    case_out = Path(out_dir) / name
    t0 = time.perf_counter()
    try:
        (case_out / MARKER).unlink(missing_ok=True)  # outputs below are about to change
        # recorded before reading: a file changed while it is read shows as changed next time
        row["inputs"] = _inputs(case_dir)
        case = read_case(case_dir)
        res = rs.fuse(case.raters, image=case.image, method=method, num_classes=num_classes,
                      device=device, seed=seed, **params)
        written = write_result(case_out, res, case.meta, rater_names=case.rater_names)
        import torch

        row.update(status="fused", seconds=time.perf_counter() - t0,
                   threads=torch.get_num_threads(),
                   voxels=int(res.truth.size), raters=len(case.rater_names),
                   classes=int(res.num_classes), error="",
                   files=[p.name for p in written.values()],
                   rater_stats=[{"rater": n, **{k: s[k] for k in
                                                ("annotated", "sensitivity", "specificity", "dice")}}
                                for n, s in zip(case.rater_names,
                                                rater_table(case.raters, res.truth,
                                                            res.num_classes))])
        _write_text(case_out / MARKER, json.dumps(_jsonable(row), indent=2) + "\n")
    except Exception as err:  # noqa: BLE001 - one case's failure must not stop the cohort
        msg = str(err) if isinstance(err, RaterSegError) else f"{type(err).__name__}: {err}"
        row.update(status="failed", seconds=time.perf_counter() - t0, error=" ".join(msg.split()))
    return row


#: Imported once by the fork server, so that workers start without importing them again.
_PRELOAD = ["raterseg", "raterseg.cohort", "raterseg.datasets", "raterseg.metrics", "nibabel",
            "torch"]


def _context():
    """How worker processes start. Never plain ``fork``: a child forked from a process whose
    OpenMP thread pool has run (torch did any parallel op) hangs at its first parallel op,
    and CUDA cannot be used in a forked child. ``forkserver`` forks workers from a clean
    server process that imported raterseg and torch once (~3 s saved per worker compared
    with ``spawn``, which imports them in every worker); ``spawn`` where it is missing."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # no effect once the server is running
        forkserver.ensure_running()  # returns at once; the server imports in the background
        return ctx
    return multiprocessing.get_context("spawn")


def _init_worker(threads: int) -> None:
    """Worker processes share the CPU cores instead of each taking them all."""
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def fuse_cohort(cohort_dir: str | os.PathLike, out_dir: str | os.PathLike, method: str = "staple",
                workers: int = 1, progress: Callable[[TrainingEvent], None] | None = None, *,
                num_classes: int | None = None, device: Any = None, seed: int = 0,
                on_case: Callable[[dict], None] | None = None, force: bool = False,
                threads: int | None = None, **params: Any) -> list[dict]:
    """Fuse every case of a cohort into ``out_dir/<case>/``; resumable and parallel.

    Args:
        cohort_dir: a folder of case folders (``image.*`` + ``rater*`` files) and/or LIDC
            patient folders (see :func:`raterseg.datasets.find_cases`).
        out_dir: where ``<case>/`` result folders and ``summary.csv`` go.
        method: any method (learned ones train on each case and need its image).
        workers: processes fusing cases at once, this one included (``workers - 1`` worker
            processes are started); 1 runs everything in this process.
        progress: called with a :class:`TrainingEvent` (cases done / total) after each case.
        num_classes, device, seed, **params: as for :func:`raterseg.fuse`.
        on_case: called with each case's row as it finishes (e.g. to report failures), and
            first with the row of each ignored folder.
        force: fuse every case again, even those an earlier run finished with the same
            method, parameters and input files.
        threads: torch threads of each process fusing cases (default: with ``workers > 1``
            the CPU cores shared out, ``cpu_count // workers`` and at least 1; with one
            process, this process's own setting). This process's setting is restored after.

    Returns:
        One dict per case, in cohort order: ``case``, ``status`` ("fused", "skipped": done
        by an earlier run with the same method and parameters from the same input files,
        "failed"), ``method``, ``params``, ``seconds``, ``voxels``, ``raters``,
        ``classes``, ``error`` ("" unless failed), ``process`` (the id of the process that
        fused it), ``threads`` (its torch threads), ``files``, ``inputs`` (each input file's ``path`` in the case folder,
        ``size`` and ``mtime_ns`` when it was read), ``rater_stats`` (per rater: ``rater``
        name, ``annotated``, ``sensitivity``, ``specificity``, ``dice`` against the fused
        truth) and, for a fused case that overwrote an earlier result, ``replaced`` (what
        and why: "staple", "staple, inputs changed (rater2.nii.gz modified)", ...).
        Then one dict per sub-folder of ``cohort_dir`` that is no case (see
        :func:`raterseg.datasets.scan_cohort`): ``case`` (its name), ``status``
        "ignored", ``error`` (why: "no rater* label files or rater*/ folders (found
        image.nii.gz, seg1.nii.gz)"). ``summary.csv`` holds these rows too.

    Raises:
        RaterSegError: missing cohort folder or no case in it, unknown method or
            parameter, bad ``workers``, ``threads`` or ``device``. Problems of single
            cases do not raise: they are rows with status "failed".
    """
    import raterseg as rs

    from ._device import resolve_device
    from .datasets import scan_cohort
    from .io import _write_text
    from .methods._base import _whole

    if not (_whole(workers) and workers >= 1):
        raise RaterSegError(f"workers: expected an integer >= 1, got {workers!r}")
    workers = int(workers)
    if threads is not None and not (_whole(threads) and threads >= 1):
        raise RaterSegError(f"threads: expected an integer >= 1 or None, got {threads!r}")
    # start the worker server first: it imports torch while this process checks the arguments
    context = _context() if workers > 1 else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RaterSegError(f"out_dir: expected a folder, got the file '{out}'")
    # every mistake of the arguments is reported before any case is read
    m = rs.create(method, num_classes=num_classes, device=device, seed=seed, **params)
    resolve_device(device)
    root = Path(cohort_dir)
    inside = out.resolve()
    # results written inside the cohort folder hold rater_* files: never take them for cases
    def outside(d: Path) -> bool:
        return d.resolve() != inside and inside not in d.resolve().parents

    found, not_cases = scan_cohort(root, "cohort_dir")
    case_dirs = [d for d in found if outside(d)]
    if not case_dirs:
        raise RaterSegError(f"cohort_dir: expected case folders in '{root}' besides the "
                            f"output folder '{out}', found none")
    names = _case_names(root, case_dirs)
    ignored = [{"case": d.relative_to(root).as_posix(), "status": "ignored", "method": method,
                "error": why} for d, why in not_cases
               if outside(d) and not (d.resolve() in inside.parents)]
    settings = {"num_classes": num_classes, "seed": seed}
    # the parameters given, coerced, less those given at their default: '--set
    # max_iterations=10000' is the run without it, and a result of either is reused
    params = _given(method, {k: v for k, v in m.params_dict.items() if k in params})
    rows: dict[str, dict] = {}
    todo: list[tuple[Path, str]] = []
    replaced: dict[str, str] = {}  # case: the result this run overwrites, and why
    for d, name in zip(case_dirs, names):
        done, previous = _earlier_result(out / name, method, params, settings, _inputs(d),
                                         bool(force))
        if done is not None:
            rows[name] = {**done, "status": "skipped"}
        else:
            todo.append((d, name))
            if previous is not None:
                replaced[name] = previous
    total, count = len(names), 0

    def finished(row: dict) -> None:
        nonlocal count
        count += 1
        if row["case"] in replaced and row["status"] == "fused":
            row = {**row, "replaced": replaced[row["case"]]}
        rows[row["case"]] = row
        if on_case is not None:
            on_case(row)
        if progress is not None:
            progress(TrainingEvent(count, total, f"{row['case']} {row['status']}",
                                   {"seconds": float(row.get("seconds") or 0.0)}))

    if on_case is not None:
        for row in ignored:
            on_case(row)
    for name in names:
        if name in rows:
            finished(rows[name])
    args = [(str(d), name, str(out), method, params, num_classes, device, seed) for d, name in todo]
    if workers == 1 or len(todo) <= 1:
        with _torch_threads(threads):
            for a in args:
                finished(_fuse_one(*a))
    else:
        _fuse_parallel(args, workers, context, finished, threads)
    result = [rows[n] for n in names] + ignored
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "summary.csv", summary_csv(result))
    return result


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with ``threads`` torch threads (None: as set), restoring them after."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fuse_parallel(args: list[tuple], workers: int, context, finished: Callable[[dict], None],
                   threads: int | None = None) -> None:
    """Fuse the cases of ``args`` in this process and ``workers - 1`` worker processes.

    This process takes cases too, so work starts at once while the workers start up (the
    fork server imports torch: seconds). Each worker keeps one case queued so it never
    waits for this process to hand out the next one. (The pool's shutdown still waits for
    its workers to have started, so a cohort of a few small cases takes the start-up time.)
    Each process runs ``threads`` torch threads (default: the cores shared out).
    """
    import torch

    threads = int(threads or max(1, (os.cpu_count() or 1) // workers))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # this process is one of the workers while the pool runs
    inflight: dict[cf.Future, str] = {}

    def collect(block: bool) -> None:
        ready, _ = cf.wait(list(inflight), timeout=None if block else 0,
                           return_when=cf.FIRST_COMPLETED)
        for fut in ready:
            name = inflight.pop(fut)
            try:
                row = fut.result()
            except Exception as err:  # noqa: BLE001 - a worker died (out of memory, ...)
                row = {"case": name, "status": "failed", "method": args[0][3],
                       "error": f"worker process failed: {type(err).__name__}: {err}"}
            finished(row)

    try:
        with cf.ProcessPoolExecutor(max_workers=workers - 1, mp_context=context,
                                    initializer=_init_worker, initargs=(threads,)) as pool:
            i = 0
            while i < len(args) or inflight:
                while i < len(args) and len(inflight) < 2 * (workers - 1):
                    inflight[pool.submit(_fuse_one, *args[i])] = args[i][1]
                    i += 1
                if i < len(args):
                    finished(_fuse_one(*args[i]))
                    i += 1
                    collect(block=False)
                else:
                    collect(block=True)
    finally:
        torch.set_num_threads(before)


def summary_csv(rows: list[dict]) -> str:
    """The text of ``summary.csv`` (columns :data:`SUMMARY_COLUMNS`) for :func:`fuse_cohort`'s rows."""
    buf = _pyio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS)

    def num(x: Any, fmt: str = "{:.6g}") -> str:
        if x is None or (isinstance(x, float) and not np.isfinite(x)):
            return ""
        return fmt.format(x) if isinstance(x, float) else str(x)

    for row in rows:
        head = [row["case"], row.get("status", ""), row.get("method", ""),
                num(row.get("seconds"), "{:.3f}"), num(row.get("voxels")), num(row.get("raters")),
                num(row.get("classes"))]
        stats = row.get("rater_stats") or [{}]
        for s in stats:
            w.writerow(head + [s.get("rater", ""), num(s.get("annotated")),
                               num(s.get("sensitivity")), num(s.get("specificity")),
                               num(s.get("dice")), row.get("error", "")])
    return buf.getvalue()


# -- stacking a cohort for training ----------------------------------------------------


def load_training_set(path: str | os.PathLike
                      ) -> tuple[np.ndarray, np.ndarray, list[str], list[str] | None]:
    """Images and raters for ``fit`` from an ``.npz`` dataset or a cohort folder.

    A cohort's raters are matched across cases by name (``rater1`` is the same person in
    every case); a rater absent from a case is a map of -1 there.

    Returns:
        ``(images, raters, ids, rater_names)``: ``images`` ``(N, C, *S)`` (npz: as stored,
        ``(N, *S)`` allowed), ``raters`` int ``(N, R, *S)``, ``ids`` N case names,
        ``rater_names`` the R raters' names of a cohort folder (None for an ``.npz``).

    Raises:
        RaterSegError: not an ``.npz`` file or a folder, a case without an image, cases
            of different spatial shapes or channel counts (naming the first that differs).
    """
    from .datasets import iter_cohort, load_npz_dataset, natural_key

    p = Path(path)
    if not p.exists():
        raise RaterSegError(f"DATA: no such file or folder '{p}'")
    if p.is_file():
        ds = load_npz_dataset(p, argname="DATA")
        ids = [str(i) for i in ds.ids] if ds.ids is not None else \
            [f"case{i}" for i in range(ds.raters.shape[0])]
        return ds.images, ds.raters, ids, None
    cases = []
    for case in iter_cohort(p):
        if case.image is None:
            raise RaterSegError(f"DATA: case '{case.name}' has no image (image.* file); "
                                "training needs one per case")
        img = case.image if case.image.ndim > case.raters.ndim - 1 else case.image[None]
        if cases:
            first, fimg = cases[0][0], cases[0][1]
            if case.raters.shape[1:] != first.raters.shape[1:]:
                raise RaterSegError(
                    f"DATA: expected every case to have the spatial shape "
                    f"{first.raters.shape[1:]} of '{first.name}', got "
                    f"{case.raters.shape[1:]} in '{case.name}' (resample the cases to one "
                    "shape first)")
            if img.shape[0] != fimg.shape[0]:
                raise RaterSegError(
                    f"DATA: expected every image to have {fimg.shape[0]} channel(s) like "
                    f"'{first.name}', got {img.shape[0]} in '{case.name}'")
        cases.append((case, img))
    names = sorted({n for c, _ in cases for n in c.rater_names}, key=natural_key)
    index = {n: r for r, n in enumerate(names)}
    first = cases[0][0]
    dtype = np.result_type(*(c.raters.dtype for c, _ in cases))
    raters = np.full((len(cases), len(names), *first.raters.shape[1:]), -1, dtype=dtype)
    for i, (c, _) in enumerate(cases):
        for r, n in enumerate(c.rater_names):
            raters[i, index[n]] = c.raters[r]
    images = np.stack([img for _, img in cases])
    return images, raters, [c.name for c, _ in cases], names

"""Long work off the UI thread, with progress and cancellation.

The core reports progress through a callback (``progress(TrainingEvent)``). A
:class:`FusionJob` wraps that callback so it raises the private :class:`Cancelled`
when the user pressed Cancel: this stops any method that reports progress (EM
iterations, training steps) at its next report, and the training engine's
generator is closed as the exception unwinds. A cancelled job returns None, so
nothing is added to the viewer.

:func:`start_job` runs a job in a napari ``thread_worker``; progress events cross
to the UI thread through a Qt signal (queued connection).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Cancelled(Exception):
    """Raised inside the progress callback to stop a run the user cancelled."""


@dataclass
class FusionJob:
    """One call of ``raterseg.fuse`` (or of a loaded model's ``predict``), cancellable.

    Attributes:
        raters: int ``(R, *S)``; None for ``predict``.
        image: float ``(*S)`` or ``(C, *S)``, or None.
        method: a registered method name (``fuse``), ignored when ``model`` is given.
        params: the method's Config values.
        device, seed: passed to the core.
        model: a fitted FusionMethod to predict with instead of fusing.
        summarize: called with the result in the worker thread (e.g. the per-rater
            table), so the UI thread only draws; its return lands in ``JobOutcome.summary``.
    """

    raters: np.ndarray | None
    image: np.ndarray | None
    method: str = "staple"
    params: dict[str, Any] = field(default_factory=dict)
    device: Any = None
    seed: int = 0
    model: Any = None
    summarize: Callable[[Any], Any] | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _also_stop: list[Callable[[], bool]] = field(default_factory=list, repr=False)

    def cancel(self) -> None:
        """Ask the run to stop at its next progress report (and discard its result)."""
        self._stop.set()

    @property
    def cancelled(self) -> bool:
        if any(check() for check in self._also_stop):
            self._stop.set()
        return self._stop.is_set()

    def run(self, progress: Callable[[Any], None] | None = None):
        """Run to the end and return the FusionResult, or None if cancelled.

        Raises:
            RaterSegError: bad input or parameters (from the core).
        """

        def report(event: Any) -> None:
            if self.cancelled:
                raise Cancelled
            if progress is not None:
                progress(event)

        try:
            if self.cancelled:
                return None
            if self.model is not None:
                result = _predict_one(self.model, self.image)
            else:
                import raterseg as rs

                result = rs.fuse(self.raters, image=self.image, method=self.method,
                                 device=self.device, seed=self.seed, progress=report,
                                 **self.params)
        except Cancelled:
            return None
        # A method that reports no progress cannot be interrupted; drop its result instead.
        return None if self.cancelled else result


@dataclass
class JobOutcome:
    """How a job ended: a result, an error, or cancelled (neither)."""

    result: Any = None
    error: BaseException | None = None
    summary: Any = None

    @property
    def cancelled(self) -> bool:
        return self.result is None and self.error is None


def run_safely(job: FusionJob, progress: Callable[[Any], None] | None = None) -> JobOutcome:
    """``job.run`` that never raises: the worker thread reports errors as data, so the
    widget decides how to show them (a one-line notification for a user mistake)."""
    try:
        result = job.run(progress)
        summary = None if result is None or job.summarize is None else job.summarize(result)
        return JobOutcome(result=result, summary=summary)
    except Exception as exc:  # noqa: BLE001 — shown to the user, never crashes the viewer
        return JobOutcome(error=exc)


def _predict_one(model: Any, image: np.ndarray):
    """``model.predict`` on one image ``(*S)`` / ``(C, *S)``, as a one-case FusionResult.

    A model trained on 2D single-channel images predicts a volume ``(D, H, W)`` slice by
    slice (the slices are the batch); the class and rater axes are then moved in front
    of D so the result has the usual one-case layout.
    """
    from raterseg import RaterSegError

    if image is None:
        raise RaterSegError("image: expected an image layer to predict on, got None")
    rank = getattr(model, "data_ndim_", None)
    slices = rank == 2 and getattr(model, "in_channels_", 1) == 1 and image.ndim == 3
    res = model.predict(image if slices else image[None])
    out: dict[str, Any] = {}
    for name, axes in (("truth", 0), ("probabilities", 1), ("uncertainty", 0),
                       ("disagreement", 0), ("rater_maps", 1), ("rater_estimates", 2)):
        value = getattr(res, name)
        if value is None:
            out[name] = None
        elif slices:  # (D, <axes>, H, W) -> (<axes>, D, H, W)
            out[name] = np.ascontiguousarray(np.moveaxis(value, 0, axes))
        else:
            out[name] = value[0]
    if not res.method:
        out["method"] = model.name
    return res.replace(**out)


def start_job(job: FusionJob, *, on_progress: Callable[[Any], None] | None = None,
              on_done: Callable[[JobOutcome], None] | None = None):
    """Run ``job`` in a napari thread worker; callbacks are called on the UI thread.

    ``on_done`` receives the :class:`JobOutcome` (result, error, or cancelled).
    Returns the started worker (keep a reference while it runs).
    """
    from napari.qt.threading import create_worker
    from qtpy.QtCore import QObject, Signal

    class _Relay(QObject):
        event = Signal(object)

    relay = _Relay()  # lives on the UI thread, so emits from the worker are queued
    if on_progress is not None:
        relay.event.connect(on_progress)
    worker = create_worker(run_safely, job, relay.event.emit, _start_thread=False)
    worker._raterseg_relay = relay  # keep it alive as long as the worker
    # napari's activity dock can quit the worker too: then the job stops like on Cancel,
    # and since a quit worker emits no ``returned``, ``finished`` reports the cancellation.
    job._also_stop.append(lambda: worker.abort_requested)
    delivered: list[bool] = []

    def _returned(outcome: JobOutcome) -> None:
        delivered.append(True)
        if on_done is not None:
            on_done(outcome)

    def _finished() -> None:
        if not delivered and on_done is not None:
            on_done(JobOutcome())

    worker.returned.connect(_returned)
    worker.finished.connect(_finished)
    worker.start()
    return worker

"""Run / Cancel buttons, a progress bar and a status line, shared by the widgets.

:class:`RunControls` owns the running job: it starts it in a thread worker
(:func:`napari_raterseg._worker.start_job`), follows its progress, and on the UI
thread either hands the result to the widget, says "cancelled", or shows the error
as a napari notification — a user mistake (``RaterSegError``) as one line, anything
else with its traceback in the notification's details. The viewer never sees an
exception.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QEvent, QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ._worker import FusionJob, JobOutcome, start_job


def refresh_keeping_layer(combo: Any) -> Any:
    """Refresh a magicgui ComboBox of layers, keeping the chosen layer (the same object)
    when it is still offered. magicgui matches choices by their text, so after a rename
    (napari refreshes docked widgets then) it would drop the choice or pick another layer.
    Returns the choice before the refresh."""
    before = combo.value
    combo.reset_choices()
    if before is not None and any(before is c for c in combo.choices):
        combo.value = before
    return before


def notify_error(exc: BaseException) -> None:
    """Show ``exc`` as a napari notification (never raises)."""
    from napari.utils.notifications import notification_manager, show_error
    from raterseg import RaterSegError

    if isinstance(exc, RaterSegError):
        show_error(str(exc))
    else:
        notification_manager.receive_error(type(exc), exc, exc.__traceback__)


class _UndockWatcher(QObject):
    """Cancels a widget's running job when napari closes its dock: napari's close button
    takes the widget out of the dock (``setParent(None)``) without deleting it, and the
    running job keeps it alive, so ``destroyed`` never fires."""

    def __init__(self, widget: QWidget, controls: RunControls) -> None:
        super().__init__(widget)
        self._controls = controls
        self._docked = widget.parent() is not None
        widget.installEventFilter(self)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.ParentChange:
            if obj.parent() is not None:
                self._docked = True
            elif self._docked:
                self._docked = False
                self._controls.cancel()
        return False


def cancel_when_undocked(widget: QWidget, controls: RunControls) -> None:
    """Stop ``controls``' job when ``widget`` (a dock's content) is taken out of its dock."""
    widget._raterseg_undock_watcher = _UndockWatcher(widget, controls)


class RunControls(QWidget):
    """Run and Cancel buttons, progress bar and status label.

    Signals:
        run_requested: the Run button was pressed (the widget builds and starts a job).
        done: a job ended; emitted with its :class:`JobOutcome` after the widget's handler ran.
    """

    run_requested = Signal()
    done = Signal(object)

    def __init__(self, run_text: str = "Run", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self.job: FusionJob | None = None
        self.worker: Any = None
        self._on_result: Callable[[Any, Any], None] | None = None
        self.run_button.clicked.connect(self.run_requested.emit)
        self.cancel_button.clicked.connect(self.cancel)

    @property
    def busy(self) -> bool:
        return self.job is not None

    def start(self, job: FusionJob, on_result: Callable[[Any, Any], None], message: str) -> None:
        """Run ``job`` in a worker; ``on_result(result, summary)`` runs on the UI thread."""
        if self.busy:
            return
        self.job = job
        self._on_result = on_result
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the first progress event
        self.status.setText(message)
        # Deleting the widget stops the job too, so it adds nothing.
        self.destroyed.connect(lambda *_: job.cancel())
        self.worker = start_job(job, on_progress=self._progress, on_done=self._safe_finish)

    def _safe_finish(self, outcome: JobOutcome) -> None:
        try:
            self._finish(outcome)
        except RuntimeError:  # the widget was deleted while the job ran
            pass

    def cancel(self) -> None:
        """Ask the running job to stop; nothing it computed will be added."""
        if self.job is not None:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling…")

    def _progress(self, event: Any) -> None:
        if self.job is None or self.job.cancelled:
            return
        try:
            self._show_progress(event)
        except RuntimeError:  # the widget was deleted while the job ran
            pass

    def _show_progress(self, event: Any) -> None:
        total = max(int(getattr(event, "total", 0) or 0), 0)
        self.progress.setRange(0, total)
        if total:
            self.progress.setValue(min(int(event.step), total))
        text = getattr(event, "message", "") or ""
        metrics = getattr(event, "metrics", None) or {}
        if metrics:
            text += "  " + ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:3]
                                     if isinstance(v, (int, float)))
        self.status.setText(text.strip())

    def _finish(self, outcome: JobOutcome) -> None:
        on_result, self._on_result = self._on_result, None
        self.job = None
        self.worker = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1)
        if outcome.error is not None:
            self.progress.setValue(0)
            self.status.setText(f"Failed: {outcome.error}")
            notify_error(outcome.error)
        elif outcome.cancelled:
            self.progress.setValue(0)
            self.status.setText("Cancelled; nothing was added.")
        else:
            self.progress.setValue(1)
            try:
                if on_result is not None:
                    on_result(outcome.result, outcome.summary)
            except Exception as exc:  # noqa: BLE001 — shown, never crashes the viewer
                outcome = JobOutcome(error=exc)
                self.status.setText(f"Failed: {exc}")
                notify_error(exc)
        self.done.emit(outcome)

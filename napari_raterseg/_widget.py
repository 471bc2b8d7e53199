"""The "Fuse raters" dock widget.

Pick an image layer and the rater Labels layers (by default every Labels layer
that is not itself a fusion result), a method (every registered method), its
parameters (a form generated from the method's Config) and a device; Run fuses
in a thread worker with a progress bar and Cancel. Results arrive as layers named
``"<image> truth [method]"`` etc. (see :mod:`napari_raterseg._layers`), re-runs
replace them, and the dock shows a per-rater table and the rater confusion heatmap.

The core (raterseg, torch) is imported when the widget is created, never when
the plugin is merely discovered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from ._controls import RunControls, cancel_when_undocked, notify_error, refresh_keeping_layer
from ._form import ParamForm
from ._layers import FusionInputs, add_result_layers, gather_inputs, layer_kind
from ._result_panel import ResultPanel
from ._worker import FusionJob

DEFAULT_METHOD = "staple"


def device_choices() -> list[str]:
    """``auto`` (CUDA when available), ``cpu``, and ``cuda`` where a GPU is present."""
    import torch

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rater_rows(raters: Any, result: Any) -> list[dict]:
    """Each rater against the fused truth (runs in the worker thread)."""
    from raterseg.metrics import rater_table

    return rater_table(raters, result.truth, num_classes=result.probabilities.shape[0])


def is_result_layer(layer: Any) -> bool:
    """True for layers this plugin added as fusion results (their metadata names a method)."""
    return "method" in (getattr(layer, "metadata", None) or {})


class FuseRatersWidget(QWidget):
    """Fuse rater Labels layers into a truth estimate, uncertainty and rater models.

    Attributes (for scripting and tests; set them like a user would):
        image: magicgui ComboBox of Image layers (None allowed for classical methods).
        raters: magicgui Select of Labels layers.
        method, device, seed: magicgui widgets.
        form: the :class:`ParamForm` of the chosen method.
        controls: :class:`RunControls` (Run, Cancel, progress bar, status).
        results: :class:`ResultPanel` (per-rater table and confusion heatmap).
        last_result: the last FusionResult added to the viewer, or None.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        import raterseg as rs
        from magicgui.widgets import ComboBox, Container, Select, SpinBox

        self.viewer = napari_viewer
        self.last_result = None
        self._known_labels: set[int] = set()
        self._known_images: set[int] = set()
        methods = rs.available_methods()
        self.image = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self.raters = Select(label="raters", choices=self._rater_choices)
        self.raters.native.setMaximumHeight(120)
        self.method = ComboBox(label="method", choices=methods,
                               value=DEFAULT_METHOD if DEFAULT_METHOD in methods else methods[0])
        self.device = ComboBox(label="device", choices=device_choices(), value="auto",
                               tooltip="auto = CUDA when available, else CPU")
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self._inputs = Container(widgets=[self.image, self.raters, self.method, self.device,
                                          self.seed], labels=True)
        self.method_help = QLabel("")
        self.method_help.setWordWrap(True)
        self.form: ParamForm | None = None
        self._form_holder = QVBoxLayout()
        self._form_holder.setContentsMargins(0, 0, 0, 0)
        self.controls = RunControls("Run")
        self.results = ResultPanel()

        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.addWidget(self._inputs.native)
        layout.addWidget(self.method_help)
        layout.addLayout(self._form_holder)
        layout.addWidget(self.controls)
        layout.addWidget(self.results)
        layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(inner)
        self.setMinimumWidth(380)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

        self.method.changed.connect(self._rebuild_form)
        self.controls.run_requested.connect(self.run)
        cancel_when_undocked(self, self.controls)
        layer_events = napari_viewer.layers.events
        for event in (layer_events.inserted, layer_events.removed, layer_events.moved,
                      layer_events.renamed):
            event.connect(self.reset_choices)
        self._rebuild_form()
        self.reset_choices()

    # -- choices --------------------------------------------------------------------
    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lyr.name, lyr) for lyr in self.viewer.layers if layer_kind(lyr) == "image"
                and not is_result_layer(lyr)]

    def _rater_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lyr.name, lyr) for lyr in self.viewer.layers if layer_kind(lyr) == "labels"]

    def reset_choices(self, _event: Any = None) -> None:
        """Refresh the layer lists; Labels layers new to the viewer are selected as raters,
        except fusion results (which are Labels too)."""
        previous = list(self.raters.value)
        had_image = refresh_keeping_layer(self.image)
        self.raters.reset_choices()
        current = [lyr for _, lyr in self._rater_choices()]
        new = [lyr for lyr in current if id(lyr) not in self._known_labels
               and not is_result_layer(lyr)]
        self._known_labels = {id(lyr) for lyr in current}
        keep = [lyr for lyr in current if any(lyr is p for p in previous) or
                any(lyr is n for n in new)]
        self.raters.value = keep
        # Pick an image only when one arrives: a "no image" the user chose (classical methods
        # need none) survives the result layers being added, so Run again replaces them.
        images = [lyr for _, lyr in self._image_choices()]
        new_images = [lyr for lyr in images if id(lyr) not in self._known_images]
        self._known_images = {id(lyr) for lyr in images}
        if had_image is None and new_images:
            self.image.value = new_images[0]

    def _rebuild_form(self, _value: Any = None) -> None:
        import raterseg as rs

        cls = rs.get_method(self.method.value)
        if self.form is not None:
            self._form_holder.removeWidget(self.form.native)
            self.form.native.setParent(None)
            self.form.native.deleteLater()
        self.form = ParamForm(cls.params(), method=self.method.value)
        self._form_holder.addWidget(self.form.native)
        doc = (cls.__doc__ or "").strip().splitlines()
        kind = "learned (trains on this image)" if cls.learned else "classical"
        self.method_help.setText(f"{kind}: {doc[0] if doc else ''}")

    # -- running --------------------------------------------------------------------
    def make_job(self) -> tuple[FusionJob, FusionInputs]:
        """The job and inputs the current selection describes.

        Raises:
            RaterSegError: a bad selection (see :func:`gather_inputs`).
        """
        if not self.raters.value:
            self._refuse_masks_opened_as_images()
        inputs = gather_inputs(self.image.value, self.raters.value)
        device = None if self.device.value == "auto" else self.device.value
        job = FusionJob(inputs.raters, inputs.image, method=self.method.value,
                        params=self.form.values() if self.form else {}, device=device,
                        seed=int(self.seed.value),
                        summarize=lambda result: _rater_rows(inputs.raters, result))
        return job, inputs

    def _refuse_masks_opened_as_images(self) -> None:
        """With no rater selected: name the Image layers that hold masks (a PNG or TIFF mask
        opened by napari's own reader), which the raters list cannot offer."""
        from raterseg import RaterSegError

        from ._reader import labels_or_none

        masks = [lyr.name for lyr in self.viewer.layers
                 if layer_kind(lyr) == "image" and not is_result_layer(lyr)
                 and not getattr(lyr, "rgb", False) and not getattr(lyr, "multiscale", False)
                 and labels_or_none(np.asarray(lyr.data), lyr.name) is not None]
        if masks:
            listing = ", ".join(repr(n) for n in masks)
            raise RaterSegError(
                "raters: expected at least one Labels layer, got none selected; "
                f"{listing} {'holds' if len(masks) == 1 else 'hold'} label values but "
                f"{'is an Image layer' if len(masks) == 1 else 'are Image layers'}: "
                "right-click in the layer list and choose 'Convert to Labels'")

    def run(self) -> None:
        """Start fusing the selected layers (returns at once; results arrive later)."""
        if self.controls.busy:
            return
        try:
            job, inputs = self.make_job()
        except Exception as exc:  # noqa: BLE001 — a bad selection is a notification
            notify_error(exc)
            self.controls.status.setText(f"Not started: {exc}")
            return
        self.controls.start(job, lambda result, rows: self._show(result, rows, inputs),
                            f"{job.method}: fusing {len(inputs.rater_names)} raters…")

    def cancel(self) -> None:
        self.controls.cancel()

    def _show(self, result: Any, rows: list[dict], inputs: FusionInputs) -> None:
        add_result_layers(self.viewer, result, inputs)
        self.last_result = result
        self.results.show_result(f"{result.method} on {inputs.base_name}", inputs.rater_names,
                                 rows, result.rater_confusion, result.num_classes)
        self.controls.status.setText(f"{result.method}: done; layers added.")

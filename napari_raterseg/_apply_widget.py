"""The "Apply model" dock widget: load a saved model and predict on an image layer.

The model is read with :func:`raterseg.load` (safetensors + JSON; nothing is
unpickled). Prediction runs in a thread worker with Cancel, like fusion, and adds
``"<image> truth [<method> model]"``, probability and uncertainty layers (replaced on
re-run; apart from the Fuse dock's ``[<method>]`` layers of the same image, so a model's
prediction and a fusion of that case can be compared).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget

from ._controls import RunControls, cancel_when_undocked, notify_error, refresh_keeping_layer
from ._layers import FusionInputs, add_result_layers, image_inputs, layer_kind
from ._worker import FusionJob


def _check_channels(model: Any, layer: Any, image: Any) -> None:
    """An RGB(A) layer is one multi-channel image: refuse it for a model trained on another
    number of channels (a 2D single-channel model would otherwise predict its R, G and B
    planes as three slices of a volume, without a word)."""
    from raterseg import RaterSegError

    expected = getattr(model, "in_channels_", None)
    if getattr(layer, "rgb", False) and expected is not None and image.shape[0] != expected:
        raise RaterSegError(
            f"image: the model takes {expected} channel(s), got RGB layer {layer.name!r} with "
            f"{image.shape[0]} channels; convert it to the model's input first"
        )


class ApplyModelWidget(QWidget):
    """Predict with a trained model.

    Attributes:
        model_path: magicgui FileEdit for the saved model.
        image: magicgui ComboBox of Image layers.
        model: the loaded FusionMethod, or None.
        controls: :class:`RunControls` (Predict, Cancel, progress, status).
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        from magicgui.widgets import ComboBox, Container, FileEdit

        self.viewer = napari_viewer
        self.model = None
        self.last_result = None
        self.model_path = FileEdit(label="model", mode="r")
        self.image = ComboBox(label="image", choices=self._image_choices)
        self._inputs = Container(widgets=[self.model_path, self.image], labels=True)
        self.load_button = QPushButton("Load model")
        self.model_info = QLabel("No model loaded")
        self.model_info.setWordWrap(True)
        self.controls = RunControls("Predict")
        self.controls.run_button.setEnabled(False)
        layout = QVBoxLayout(self)
        layout.addWidget(self._inputs.native)
        layout.addWidget(self.load_button)
        layout.addWidget(self.model_info)
        layout.addWidget(self.controls)
        layout.addStretch(1)
        self.load_button.clicked.connect(self.load_model)
        self.controls.run_requested.connect(self.run)
        cancel_when_undocked(self, self.controls)
        self.controls.done.connect(lambda _: self.controls.run_button.setEnabled(
            self.model is not None))
        layer_events = napari_viewer.layers.events
        for event in (layer_events.inserted, layer_events.removed, layer_events.renamed):
            event.connect(self.reset_choices)

    def _image_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(lyr.name, lyr) for lyr in self.viewer.layers if layer_kind(lyr) == "image"
                and "method" not in (lyr.metadata or {})]

    def reset_choices(self, _event: Any = None) -> None:
        refresh_keeping_layer(self.image)

    def load_model(self) -> None:
        """Load the model at ``model_path``; a bad file is a notification."""
        import raterseg as rs

        try:
            self.model = rs.load(str(self.model_path.value))
        except Exception as exc:  # noqa: BLE001 — a bad file is a notification
            self.model = None
            self.model_info.setText(f"Not loaded: {exc}")
            self.controls.run_button.setEnabled(False)
            notify_error(exc)
            return
        m = self.model
        dims = getattr(m, "data_ndim_", None)
        shape = f"{dims}D images, " if dims else ""
        self.model_info.setText(f"{m.name}: {shape}{m.in_channels_} channel(s), "
                                f"{m.num_classes} classes, {m.num_raters} raters")
        self.controls.run_button.setEnabled(not self.controls.busy)

    def run(self) -> None:
        """Predict on the chosen image in a worker (returns at once)."""
        if self.controls.busy:
            return
        try:
            if self.model is None:
                from raterseg import RaterSegError

                raise RaterSegError("model: expected a loaded model; press 'Load model' first")
            inputs = image_inputs(self.image.value)
            _check_channels(self.model, self.image.value, inputs.image)
        except Exception as exc:  # noqa: BLE001
            self.controls.status.setText(f"Not started: {exc}")  # not a previous run's text
            notify_error(exc)
            return
        job = FusionJob(None, inputs.image, model=self.model)
        self.controls.start(job, lambda result, _summary: self._show(result, inputs),
                            f"{self.model.name}: predicting…")

    def _show(self, result: Any, inputs: FusionInputs) -> None:
        add_result_layers(self.viewer, result, inputs, tag=f"{result.method} model")
        self.last_result = result
        self.controls.status.setText(f"{result.method}: done; layers added.")

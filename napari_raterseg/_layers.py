"""Between napari layers and the core: gather fusion inputs, turn results into layers.

Nothing here imports Qt; napari layer objects are only duck-typed (``.data``,
``.name``, ``.scale``, ``.translate``, the class name), so the console API,
the widgets and the tests share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._reader import IO_META_KEY

#: Kinds of result layers, in the order they are added.
RESULT_KINDS = ("truth", "probability", "uncertainty", "rater maps")


def layer_name(base: str, kind: str, method: str) -> str:
    """``"<image> <kind> [<method>]"``, e.g. ``"phantom truth [staple]"`` (DESIGN.md)."""
    return f"{base} {kind} [{method}]"


def layer_kind(layer: Any) -> str:
    """``"image"``, ``"labels"``, … for a napari layer: its class name in lower case (the
    public spelling of napari's private ``_type_string``)."""
    return type(layer).__name__.lower()


@dataclass
class FusionInputs:
    """What a fusion run needs, copied out of the layers.

    Attributes:
        raters: int ``(R, *S)``, a copy of the rater layers' data.
        image: float ``(*S)`` or ``(C, *S)`` (a copy), or None.
        rater_names: the rater layers' names, in order.
        base_name: prefix of the result layers' names: the image layer's name; without
            an image the first rater layer's name and how many more (``"A rater 0 +2"``),
            so that fusing another rater set does not replace these results.
        scale, translate: spatial calibration of the result layers (length ``len(S)``).
        io_meta: the geometry of the file the image (else first rater) was read from,
            passed on to the result layers so that saving them keeps it.
        axis_labels: the spatial axes' labels of that layer (length ``len(S)``), or None.
    """

    raters: np.ndarray
    image: np.ndarray | None
    rater_names: list[str]
    base_name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    io_meta: dict | None = None
    axis_labels: tuple[str, ...] | None = None


def _spatial_axis_labels(layer: Any, nsp: int) -> tuple[str, ...] | None:
    """The last ``nsp`` axis labels of ``layer`` (napari >= 0.5), or None."""
    labels = getattr(layer, "axis_labels", None)
    if labels is None or len(labels) < nsp:
        return None
    return tuple(str(a) for a in tuple(labels)[-nsp:])


def _layer_array(layer: Any, argname: str) -> np.ndarray:
    from raterseg import RaterSegError

    if getattr(layer, "multiscale", False):
        raise RaterSegError(
            f"{argname}: expected a single-scale layer, got multiscale layer {layer.name!r}"
        )
    return np.asarray(layer.data)


def gather_inputs(image_layer: Any | None, rater_layers: Sequence[Any]) -> FusionInputs:
    """Copy the arrays a fusion needs out of the layers and check that they fit together.

    Args:
        image_layer: a napari Image layer of shape ``S`` (or RGB ``(*S, 3|4)``; with 3D
            raters also ``(C, *S)``), or None. A volume with 2D raters is refused: napari
            shows it as a volume, not as channels.
        rater_layers: napari Labels layers, all of shape ``S`` (2D or 3D).

    A rater layer holding only 0 and 255 (an image mask converted to labels) is fused as
    the binary mask it is (0/1), as the file readers take such masks.

    Raises:
        RaterSegError: no rater layers, a rater layer that is not Labels, rater layers of
            different shapes, labels above 255 (the core's limit for inferred classes),
            NIfTI layers on different voxel grids, or an image whose shape differs from the
            raters'.
    """
    from raterseg import RaterSegError

    rater_layers = list(rater_layers or [])
    if not rater_layers:
        raise RaterSegError("raters: expected at least one Labels layer, got none selected")
    arrays = []
    for layer in rater_layers:
        if layer_kind(layer) != "labels":
            how = (" (a mask opened as an image: right-click it in the layer list and choose "
                   "'Convert to Labels')") if layer_kind(layer) == "image" else ""
            raise RaterSegError(
                f"raters: expected Labels layers, got {layer_kind(layer)} layer "
                f"{layer.name!r}{how}"
            )
        arrays.append(_layer_array(layer, "raters"))
    shapes = [a.shape for a in arrays]
    if len(set(shapes)) != 1:
        listing = ", ".join(f"{lyr.name!r} {s}" for lyr, s in zip(rater_layers, shapes))
        raise RaterSegError(
            f"raters: expected every rater layer to have the same shape, got {listing}"
        )
    spatial = shapes[0]
    if len(spatial) not in (2, 3):
        raise RaterSegError(
            f"raters: expected 2D or 3D Labels layers, got shape {spatial} "
            f"for {rater_layers[0].name!r}"
        )
    from raterseg.datasets import is_0_255_mask
    from raterseg.types import MAX_INFERRED_CLASSES

    # the core infers L = max label + 1 and builds (L, *S) maps: label 70000 made STAPLE ask
    # for 78 GB; refused here already, naming the layer
    max_label = MAX_INFERRED_CLASSES - 1
    for i, (layer, arr) in enumerate(zip(rater_layers, arrays)):
        top = int(arr.max()) if arr.size else 0
        if is_0_255_mask(arr):
            # a 0/255 mask (an image converted to labels): binary, as the file readers take it
            arrays[i] = (arr // 255).astype(arr.dtype)
            continue
        if top > max_label:
            raise RaterSegError(
                f"raters: expected class labels 0..{max_label} (0 = background), got label {top} "
                f"in {layer.name!r}; fusion makes one probability map per class up to the "
                "largest label. Instance labels (one id per object) are no classes: relabel "
                "them to classes first"
            )
    raters = np.stack(arrays)  # a copy: the layers are never touched
    image = None
    ref = rater_layers[0]
    more = len(rater_layers) - 1
    base = f"{ref.name} +{more}" if more else ref.name
    if image_layer is not None:
        if layer_kind(image_layer) != "image":
            raise RaterSegError(
                f"image: expected an Image layer, got {layer_kind(image_layer)} layer "
                f"{image_layer.name!r}"
            )
        img = _layer_array(image_layer, "image")
        rgb = getattr(image_layer, "rgb", False)
        if rgb:
            img = np.moveaxis(img, -1, 0)  # (*S, C) -> (C, *S), channels first
        with_channels = "(C, " + ", ".join(str(n) for n in spatial) + ")"
        if img.shape[-len(spatial):] != spatial or img.ndim > len(spatial) + 1:
            raise RaterSegError(
                f"image: expected shape {spatial} (the rater layers' shape) or {with_channels} "
                f"(channels first), got {img.shape} for image layer {image_layer.name!r}"
            )
        if not rgb and len(spatial) == 2 and img.ndim == 3:
            # napari shows a (D, H, W) Image layer as a volume: with raters drawn on one
            # slice, its slices would be fused as the channels of one 2D image
            raise RaterSegError(
                f"image: layer {image_layer.name!r} is a volume {img.shape} and the rater "
                f"layers are 2D {spatial}; draw the raters as 3D Labels layers of shape "
                f"{img.shape}, or pick a 2D image (a multi-channel 2D image: RGB, or "
                "raterseg.fuse from the console)"
            )
        image = np.array(img, copy=True)
        ref = image_layer
        base = image_layer.name
    # Layers read from NIfTI files keep the file's affine: refuse files on different voxel
    # grids (a mirrored or shifted rater), as the command line does.
    from raterseg.datasets import check_same_grid

    grid_layers = ([image_layer] if image_layer is not None else []) + rater_layers
    check_same_grid([(lyr.name, (getattr(lyr, "metadata", None) or {}).get(IO_META_KEY) or {})
                     for lyr in grid_layers], "raters")
    nsp = len(spatial)
    scale = tuple(float(s) for s in np.asarray(ref.scale)[-nsp:])
    translate = tuple(float(t) for t in np.asarray(ref.translate)[-nsp:])
    io_meta = (getattr(ref, "metadata", None) or {}).get(IO_META_KEY)
    return FusionInputs(raters, image, [lyr.name for lyr in rater_layers], base, scale, translate,
                        io_meta, _spatial_axis_labels(ref, nsp))


def result_layer_data(result: Any, base_name: str, method: str, *,
                      scale: Sequence[float] | None = None,
                      translate: Sequence[float] | None = None,
                      io_meta: dict | None = None,
                      axis_labels: Sequence[str] | None = None) -> list[tuple]:
    """napari layer-data tuples ``(data, kwargs, type)`` for a one-case FusionResult.
    ``method`` is the tag in brackets (``m``): the method's name for a fusion, ``"<name>
    model"`` for a saved model's prediction; the layers' metadata name ``result.method``.

    - ``"<base> truth [m]"``: Labels ``(*S)``.
    - ``"<base> probability [m]"``: Image, p(foreground) ``(*S)`` for two classes,
      else ``(L, *S)`` (class axis first).
    - ``"<base> uncertainty [m]"``: Image ``(*S)`` in [0, 1], magma, additive blending.
    - ``"<base> rater maps [m]"``: Image ``(R, *S)`` (rater axis first), only when the
      method models raters spatially (``result.rater_maps`` is not None).

    ``axis_labels``: the spatial axes' labels (default napari's ``-3, -2, -1``); a leading
    axis is labelled ``class`` or ``rater`` (``class / rater`` when both layers have one:
    napari shows one slider for that axis), so its slider is not named ``-4``.
    """
    nsp = result.truth.ndim
    # The calibration of the spatial axes: the last ``nsp`` entries (a multi-channel image
    # layer ``(C, *S)`` has one more, which the model's output does not have).
    scale = ((1.0,) * nsp + tuple(scale or ()))[-nsp:]
    translate = ((0.0,) * nsp + tuple(translate or ()))[-nsp:]
    cal = {"scale": scale, "translate": translate}
    lead = {"scale": (1.0,) + scale, "translate": (0.0,) + translate}
    spatial = tuple(axis_labels) if axis_labels is not None and len(axis_labels) == nsp \
        else tuple(str(i) for i in range(-nsp, 0))
    cal["axis_labels"] = spatial
    multi, maps = result.probabilities.shape[0] > 2, result.rater_maps is not None
    first = "class / rater" if multi and maps else "class" if multi else "rater"
    lead["axis_labels"] = (first, *spatial)
    meta = {"method": result.method, "params": dict(result.params)}
    if io_meta:
        meta[IO_META_KEY] = io_meta
    out: list[tuple] = [
        (result.truth, {"name": layer_name(base_name, "truth", method), "opacity": 0.6,
                        "metadata": meta, **cal}, "labels"),
    ]
    prob = result.probabilities
    if prob.shape[0] == 2:
        out.append((prob[1], {"name": layer_name(base_name, "probability", method),
                              "colormap": "viridis", "contrast_limits": (0.0, 1.0),
                              "visible": False, "metadata": meta, **cal}, "image"))
    else:
        out.append((prob, {"name": layer_name(base_name, "probability", method),
                           "colormap": "viridis", "contrast_limits": (0.0, 1.0),
                           "visible": False, "metadata": meta, **lead}, "image"))
    out.append((result.uncertainty, {"name": layer_name(base_name, "uncertainty", method),
                                     "colormap": "magma", "contrast_limits": (0.0, 1.0),
                                     "blending": "additive", "opacity": 0.8,
                                     "metadata": meta, **cal}, "image"))
    if result.rater_maps is not None:
        out.append((result.rater_maps, {"name": layer_name(base_name, "rater maps", method),
                                        "colormap": "magma", "contrast_limits": (0.0, 1.0),
                                        "visible": False, "metadata": meta, **lead}, "image"))
    return out


def add_or_replace_layers(viewer: Any, layer_data: Sequence[tuple], base_name: str,
                          method: str) -> list[Any]:
    """Add result layers, replacing those of an earlier run of the same method on the same image.

    A layer of the same name, type and dimensionality gets its data (and calibration)
    replaced in place, so the user's display settings survive; otherwise it is removed
    and added anew. Result layers of that run which this result does not produce
    (e.g. rater maps) are removed. Returns the layers, in ``layer_data`` order.
    """
    produced = {kw["name"] for _, kw, _ in layer_data}
    for kind in RESULT_KINDS:
        stale = layer_name(base_name, kind, method)
        if stale not in produced and stale in viewer.layers:
            viewer.layers.remove(stale)
    layers = []
    for data, kwargs, ltype in layer_data:
        name = kwargs["name"]
        if name in viewer.layers:
            old = viewer.layers[name]
            if layer_kind(old) == ltype and old.data.ndim == data.ndim:
                old.data = data
                # Setting the calibration refreshes the layer; only do it when it changed.
                if not np.allclose(old.scale, kwargs["scale"]):
                    old.scale = kwargs["scale"]
                if not np.allclose(old.translate, kwargs["translate"]):
                    old.translate = kwargs["translate"]
                if tuple(old.axis_labels) != kwargs["axis_labels"]:
                    old.axis_labels = kwargs["axis_labels"]
                old.metadata = kwargs.get("metadata", {})
                if ltype == "image":
                    old.contrast_limits = kwargs.get("contrast_limits", old.contrast_limits)
                layers.append(old)
                continue
            viewer.layers.remove(name)
        add = getattr(viewer, f"add_{ltype}")
        layers.append(add(data, **kwargs))
    return layers


def add_result_layers(viewer: Any, result: Any, inputs: FusionInputs,
                      tag: str | None = None) -> list[Any]:
    """Add (or replace) the layers of ``result``, calibrated like the input layers, named
    ``"<base> <kind> [<tag>]"`` (``tag``: the method's name unless given)."""
    tag = tag or result.method
    data = result_layer_data(result, inputs.base_name, tag, scale=inputs.scale,
                             translate=inputs.translate, io_meta=inputs.io_meta,
                             axis_labels=inputs.axis_labels)
    return add_or_replace_layers(viewer, data, inputs.base_name, tag)


def image_inputs(image_layer: Any) -> FusionInputs:
    """Inputs for predicting with a trained model: the image only (``raters`` is empty).

    Raises:
        RaterSegError: no image layer, or not an Image layer.
    """
    from raterseg import RaterSegError

    if image_layer is None or layer_kind(image_layer) != "image":
        got = "none" if image_layer is None else f"{layer_kind(image_layer)} layer"
        raise RaterSegError(f"image: expected an Image layer to predict on, got {got}")
    img = _layer_array(image_layer, "image")
    if getattr(image_layer, "rgb", False):
        img = np.moveaxis(img, -1, 0)
    nsp = img.ndim - (1 if getattr(image_layer, "rgb", False) else 0)
    scale = tuple(float(s) for s in np.asarray(image_layer.scale)[-nsp:])
    translate = tuple(float(t) for t in np.asarray(image_layer.translate)[-nsp:])
    io_meta = (getattr(image_layer, "metadata", None) or {}).get(IO_META_KEY)
    return FusionInputs(np.zeros((0,), np.int16), np.array(img, copy=True), [], image_layer.name,
                        scale, translate, io_meta, _spatial_axis_labels(image_layer, nsp))

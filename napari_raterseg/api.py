"""Console API: fuse layers of a viewer from napari's console or a script.

Examples:
    >>> from napari_raterseg.api import fuse_layers
    >>> res = fuse_layers(viewer, "phantom 3d", ["rater 1 (good)", "rater 2 (over)"], "staple")
    >>> viewer.layers["phantom 3d truth [staple]"]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ._layers import add_result_layers, gather_inputs, layer_kind


def _layer(viewer: Any, layer: Any, argname: str) -> Any:
    from raterseg import RaterSegError

    if layer is None or not isinstance(layer, str):
        return layer
    if layer not in viewer.layers:
        names = [lyr.name for lyr in viewer.layers]
        raise RaterSegError(f"{argname}: no layer named {layer!r} in the viewer; layers: {names}")
    return viewer.layers[layer]


def fuse_layers(viewer: Any, image: Any, raters: Sequence[Any] | str | None = None,
                method: str = "staple", *, device: Any = None, seed: int = 0,
                progress: Any = None, **params: Any):
    """Fuse rater Labels layers and add the results to ``viewer`` (blocking; same layers,
    names and replacement rules as the "Fuse raters" widget).

    Args:
        viewer: a napari Viewer.
        image: the Image layer (or its name), or None for classical methods.
        raters: the rater Labels layers (or names); one layer or one name is one rater;
            None takes every Labels layer that is not itself a fusion result.
        method: a name from ``raterseg.available_methods()``.
        device, seed, progress, **params: as for :func:`raterseg.fuse`.

    Returns:
        The :class:`raterseg.FusionResult`.

    Raises:
        RaterSegError: unknown layer names, a bad selection (shapes, types) or bad parameters.
    """
    import raterseg as rs

    image_layer = _layer(viewer, image, "image")
    if raters is None:
        raters = [lyr for lyr in viewer.layers if layer_kind(lyr) == "labels"
                  and "method" not in (lyr.metadata or {})]
    elif isinstance(raters, str) or not isinstance(raters, Iterable):
        raters = [raters]  # one name or one layer (a str would be split into characters)
    rater_layers = [_layer(viewer, r, "raters") for r in raters]
    inputs = gather_inputs(image_layer, rater_layers)
    result = rs.fuse(inputs.raters, image=inputs.image, method=method, device=device, seed=seed,
                     progress=progress, **params)
    add_result_layers(viewer, result, inputs)
    return result

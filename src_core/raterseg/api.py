"""The scripting API: fuse, create, load."""

from __future__ import annotations

from typing import Any

from .methods._base import FusionMethod, Progress
from .methods._registry import get_method
from .types import FusionResult, RaterSegError, as_rater_stack, check_image


def create(method: str, num_classes: int | None = None, num_raters: int | None = None, *,
           device: Any = None, seed: int = 0, **params: Any) -> FusionMethod:
    """A configured, unfitted method.

    Raises:
        RaterSegError: unknown method or parameter (with the closest name suggested).
    """
    cls = get_method(method)
    return cls(num_classes=num_classes, num_raters=num_raters, device=device, seed=seed, **params)


def fuse(raters: Any, image: Any = None, method: str = "staple", num_classes: int | None = None,
         device: Any = None, seed: int = 0, progress: Progress = None,
         **params: Any) -> FusionResult:
    """Fuse one case's raters into an estimate of the truth.

    Args:
        raters: int ``(R, *S)`` with S = (H, W) or (D, H, W), or a list of R label maps;
            ``-1`` where a rater did not annotate.
        image: float ``(*S)`` or ``(C, *S)``; needed by learned methods, which train on
            this case (its slices, or patches with ``spatial_dims=3``) and predict it.
        method: a name from :func:`available_methods`.
        num_classes: L; inferred (max label + 1, at least 2) when None.
        device: "cpu", "cuda" or None (CUDA when available).
        seed: random seed.
        progress: called with :class:`TrainingEvent` during long work.
        **params: the method's Config fields.

    Returns:
        :class:`FusionResult` with numpy arrays.

    Raises:
        RaterSegError: on any input mistake.

    Examples:
        >>> import numpy as np, raterseg as rs
        >>> raters = np.zeros((3, 8, 8), int); raters[:, 2:6, 2:6] = 1
        >>> rs.fuse(raters, method="majority_vote").truth.sum()
        16
    """
    m = create(method, num_classes=num_classes, device=device, seed=seed, **params)
    stack = as_rater_stack(raters, num_classes)
    if image is not None:  # shape, NaN and dtype mistakes fail here even for classical methods
        check_image(image, stack.spatial_shape)
    if m.learned and image is None:
        raise RaterSegError(f"image: method {method!r} is learned and needs the image, got None")
    return m.fuse_case(stack, image, progress)


def load(path) -> FusionMethod:
    """Load a model saved with ``method.save(path)`` (safetensors + JSON; never unpickles)."""
    from .serialization import load_method

    return load_method(path)

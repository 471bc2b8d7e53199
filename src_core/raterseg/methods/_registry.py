"""The method registry: ``@register_method("name", learned=...)`` on a FusionMethod subclass."""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

from ..types import RaterSegError

if TYPE_CHECKING:
    from ._base import FusionMethod

_REGISTRY: dict[str, type[FusionMethod]] = {}

# Every module that registers methods; imported on first use so that
# ``import raterseg`` stays light (no torch until a method is needed).
_METHOD_MODULES = (
    "majority_vote",
    "staple",
    "spatial_staple",
    "cm",
    "tgce",
    "mrprism",
    "avap",
    "baselines",
)
_loaded = False


def register_method(name: str, *, learned: bool = False):
    """Class decorator that registers a :class:`FusionMethod` under ``name``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice")
        cls.name = name
        cls.learned = learned
        _REGISTRY[name] = cls
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(f"raterseg.methods.{mod}")
        except ModuleNotFoundError as err:  # a method not written yet
            if err.name != f"raterseg.methods.{mod}":
                raise
    _loaded = True


def available_methods(learned: bool | None = None) -> list[str]:
    """Names of the registered methods (classical first, then learned)."""
    _ensure_loaded()
    items = [(cls.learned, n) for n, cls in _REGISTRY.items()]
    return [n for lrn, n in sorted(items, key=lambda t: t[0]) if learned is None or lrn == learned]


#: Names users bring from other tools, and what they mean here (checked before spelling).
_SYNONYMS = {"learning_rate": "lr", "n_epochs": "epochs", "num_epochs": "epochs",
             "max_epochs": "epochs", "batchsize": "batch_size", "bs": "batch_size",
             "max_iter": "max_iterations", "n_iter": "max_iterations", "tol": "tolerance",
             "window_size": "window"}


def suggest(name: str, options) -> str:
    options = list(options)
    synonym = _SYNONYMS.get(str(name).lower())
    if synonym in options:
        return f"; did you mean {synonym!r}?"
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def get_method(name: str) -> type[FusionMethod]:
    """The class registered as ``name``.

    Raises:
        RaterSegError: unknown name (the message suggests the closest).
    """
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise RaterSegError(
            f"method: expected one of {sorted(_REGISTRY)}, got {name!r}{suggest(name, _REGISTRY)}"
        )
    return _REGISTRY[name]

"""FusionMethod: the base every method subclasses, and its configuration machinery.

A method declares its hyper-parameters as a nested frozen dataclass ``Config``
whose fields carry a one-line help in ``metadata["help"]`` (see :func:`param`).
The GUI form, CLI options and the docs table are generated from those fields.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..types import FusionResult, RaterSegError, RaterStack, TrainingEvent, as_rater_stack
from ._registry import suggest

Progress = Callable[[TrainingEvent], None] | None


def param(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
          high: float | None = None) -> Any:
    """A Config field with its help text and optional choices / bounds."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (Config is frozen)")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None


def _field_type(cfg_cls, f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cfg_cls)
    t = hints.get(f.name, type(f.default))
    origin = typing.get_origin(t)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        t = args[0] if args else str
        origin = typing.get_origin(t)
    if origin is tuple:
        return tuple
    return t if isinstance(t, type) else type(f.default)


def config_params(cfg_cls) -> list[ParamInfo]:
    """Describe every field of a Config dataclass."""
    out = []
    for f in dataclasses.fields(cfg_cls):
        m = f.metadata or {}
        out.append(ParamInfo(f.name, _field_type(cfg_cls, f), f.default, m.get("help", ""),
                             m.get("choices"), m.get("low"), m.get("high")))
    return out


def coerce_param(info: ParamInfo, value: Any, method: str | None) -> Any:
    """Convert ``value`` (possibly a CLI or form string) to the field's type and check it:
    its type, choices, ``low``/``high``, and that a float is finite (NaN passed every range).

    Raises:
        RaterSegError: naming the parameter (and ``method`` when given).
    """
    where = f"{info.name} (parameter of {method!r})" if method else info.name
    t = info.type
    try:
        if isinstance(value, str) and t is not str:
            if t is bool:
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                value = low in ("1", "true", "yes", "on")
            elif t is tuple:
                inner = type(info.default[0]) if info.default else int
                value = tuple(inner(v) for v in value.replace("(", "").replace(")", "").split(",") if v.strip())
            else:
                value = t(value)
        elif t is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(value)
            value = bool(value)
        elif t is int:
            if isinstance(value, (bool, np.bool_)) or int(value) != value:
                raise ValueError(value)
            value = int(value)
        elif t is float:
            if isinstance(value, (bool, np.bool_)):
                raise ValueError(value)
            value = float(value)
        elif t is tuple:
            value = tuple(value)
        elif t is str and not isinstance(value, str):
            raise ValueError(value)
    except (TypeError, ValueError):
        raise RaterSegError(
            f"{where}: expected {t.__name__}, got {value!r} ({type(value).__name__})"
        ) from None
    if t is float and not np.isfinite(value):
        raise RaterSegError(f"{where}: expected a finite number, got {value!r}")
    if info.choices is not None and value not in info.choices:
        raise RaterSegError(
            f"{where}: expected one of {list(info.choices)}, got {value!r}"
            f"{suggest(value, [str(c) for c in info.choices])}"
        )
    if info.low is not None and value < info.low:
        raise RaterSegError(f"{where}: expected a value >= {info.low}, got {value!r}")
    if info.high is not None and value > info.high:
        raise RaterSegError(f"{where}: expected a value <= {info.high}, got {value!r}")
    return value


def make_config(cfg_cls, method: str, params: dict[str, Any]):
    """Build a Config from keyword parameters, with helpful errors for unknown names."""
    infos = {p.name: p for p in config_params(cfg_cls)}
    for key in params:
        if key not in infos:
            raise RaterSegError(
                f"{key}: not a parameter of method {method!r}; expected one of "
                f"{sorted(infos) or 'none'}{suggest(key, infos)}"
            )
    values = {k: coerce_param(infos[k], v, method) for k, v in params.items()}
    return cfg_cls(**values)


def normalized_entropy(prob: np.ndarray, axis: int = 0) -> np.ndarray:
    """Entropy of ``prob`` along ``axis`` divided by log(L): float32 in [0, 1]."""
    p = np.clip(prob.astype(np.float32, copy=False), 1e-12, 1.0)
    L = prob.shape[axis]
    h = -(prob * np.log(p)).sum(axis=axis)
    return np.clip(h / np.log(L), 0.0, 1.0).astype(np.float32)


def vote_counts(labels: np.ndarray, num_classes: int, rater_axis: int = 0) -> np.ndarray:
    """Per-class vote counts ``(L, *S)`` (uint16) from labels ``(R, *S)``; -1 never counts."""
    counts = np.empty((num_classes,) + labels.shape[:rater_axis] + labels.shape[rater_axis + 1:],
                      dtype=np.uint16)
    for c in range(num_classes):
        np.sum(labels == c, axis=rater_axis, dtype=np.uint16, out=counts[c])
    return counts


def observed_disagreement(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """1 - share of the most common label among the raters who annotated; float32 ``(*S)``."""
    counts = vote_counts(labels, num_classes)
    total = counts.sum(axis=0, dtype=np.float32)
    top = counts.max(axis=0).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(total > 1, 1.0 - top / np.maximum(total, 1), 0.0)
    return d.astype(np.float32)


def empirical_confusion(labels: np.ndarray, truth_prob: np.ndarray) -> np.ndarray:
    """Each rater's confusion ``(R, L, L)``: ``[r, i, j] = p(rater says i | truth j)``.

    Soft counts weighted by ``truth_prob`` ``(L, *S)``; voxels a rater did not annotate
    are left out of that rater's matrix. A column with no mass is NaN
    (:func:`normalize_columns`).
    """
    L = truth_prob.shape[0]
    R = labels.shape[0]
    tp = truth_prob.reshape(L, -1).astype(np.float64)
    cm = np.zeros((R, L, L), dtype=np.float64)
    for r in range(R):
        lab = labels[r].reshape(-1)
        for i in range(L):
            sel = lab == i
            if sel.any():
                cm[r, i] = tp[:, sel].sum(axis=1)
    return normalize_columns(cm)


def normalize_columns(counts: np.ndarray) -> np.ndarray:
    """Confusion matrices ``(R, L, L)`` from (soft) counts ``[r, said, true]``: each column
    divided by its sum, float32. A column with no mass (no voxel of that true class where
    the rater annotated: e.g. a lesion-free case, or a label no rater used) has no
    estimate and is NaN, not a made-up value such as the identity's column."""
    counts = np.asarray(counts, dtype=np.float64)
    col = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cm = np.where(col > 0, counts / np.where(col > 0, col, 1.0), np.nan)
    return cm.astype(np.float32)


def finish_result(probabilities: np.ndarray, stack: RaterStack | None, method: str,
                  params: dict, *, truth: np.ndarray | None = None,
                  rater_confusion: np.ndarray | None = None, **extra) -> FusionResult:
    """Fill the derived fields of a one-case :class:`FusionResult` from ``probabilities``."""
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float32)
    if truth is None:
        truth = probabilities.argmax(axis=0)
    truth = truth.astype(np.int16 if probabilities.shape[0] < 32000 else np.int32, copy=False)
    if stack is not None:
        disagreement = observed_disagreement(stack.labels, stack.num_classes)
    else:
        disagreement = np.zeros(probabilities.shape[1:], np.float32)
    return FusionResult(
        truth=truth,
        probabilities=probabilities,
        uncertainty=normalized_entropy(probabilities),
        disagreement=disagreement,
        rater_confusion=rater_confusion,
        method=method,
        params=params,
        **extra,
    )


def _whole(value: Any) -> bool:
    """An integer (or a float with an integer value), not a bool, None or a string."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


def unannotated_as_nan(result: FusionResult, stack: RaterStack) -> FusionResult:
    """``result`` with NaN as the confusion matrix of each rater who annotated no voxel of
    the case (all -1): nothing was observed of that rater, so no matrix is defined (methods
    would otherwise report their initial value, the identity, as a perfect rater)."""
    if result.rater_confusion is None or stack.batched:
        return result
    R = stack.num_raters
    result.rater_confusion = silent_raters_as_nan(result.rater_confusion,
                                                  stack.labels.reshape(R, -1).max(axis=1) < 0)
    return result


def silent_raters_as_nan(cm: np.ndarray, silent: np.ndarray) -> np.ndarray:
    """``cm`` ``(R, L, L)`` with NaN rows for the raters where ``silent`` ``(R,)`` is true
    (a copy when any is; ``cm`` itself otherwise)."""
    if not np.any(silent):
        return cm
    cm = np.array(cm, dtype=np.float32, copy=True)
    cm[np.asarray(silent)] = np.nan
    return cm


class FusionMethod:
    """Base class of every fusion method.

    Subclasses set a nested frozen dataclass ``Config`` and implement
    :meth:`fuse_case` (classical methods) or the fit/predict trio (learned ones,
    through :mod:`raterseg.train`). Hyper-parameters live in ``self.config``;
    fitted state in trailing-underscore attributes.

    Args:
        num_classes: L, or None to infer from the labels.
        num_raters: R, or None to infer from the labels.
        device: "cpu", "cuda", "cuda:1", a ``torch.device`` or None (CUDA when available).
        seed: random seed (learned methods; ties broken at random).
        **params: fields of ``Config``; unknown names raise :class:`RaterSegError`.
    """

    name: ClassVar[str] = ""
    learned: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, num_classes: int | None = None, num_raters: int | None = None,
                 device: Any = None, seed: int = 0, **params: Any) -> None:
        if num_classes is not None and not (_whole(num_classes) and num_classes >= 2):
            raise RaterSegError(f"num_classes: expected an integer >= 2, got {num_classes!r}")
        if num_raters is not None and not (_whole(num_raters) and num_raters >= 1):
            raise RaterSegError(f"num_raters: expected an integer >= 1, got {num_raters!r}")
        if not _whole(seed):
            raise RaterSegError(f"seed: expected an integer, got {seed!r}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.num_raters = None if num_raters is None else int(num_raters)
        self.device = device
        self.seed = int(seed)
        self.config = make_config(self.Config, self.name, params)

    @classmethod
    def params(cls) -> list[ParamInfo]:
        """The method's parameters (name, type, default, help) for forms and docs."""
        return config_params(cls.Config)

    @property
    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params_dict.items())
        return f"{type(self).__name__}({args})"

    # -- one case -------------------------------------------------------------------
    def fuse_case(self, raters: Any, image: Any = None, progress: Progress = None) -> FusionResult:
        """Fuse one case: ``raters`` ``(R, *S)``, ``image`` ``(*S)`` or ``(C, *S)``."""
        if isinstance(raters, RaterStack) and not raters.batched and \
                self.num_classes in (None, raters.num_classes):
            stack = raters  # already validated (and a copy): no second copy of the labels
        else:
            stack = as_rater_stack(raters, self.num_classes)
        self._check_raters(stack)
        return unannotated_as_nan(self._fuse(stack, image, progress), stack)

    def _check_raters(self, stack: RaterStack) -> None:
        if self.num_raters is not None and stack.num_raters != self.num_raters:
            raise RaterSegError(
                f"raters: expected {self.num_raters} raters (num_raters), got {stack.num_raters}"
            )

    def _fuse(self, stack: RaterStack, image: np.ndarray | None, progress: Progress) -> FusionResult:
        raise NotImplementedError

    # -- datasets -------------------------------------------------------------------
    def fit(self, images: Any, raters: Any, progress: Progress = None) -> FusionMethod:
        """Train on a dataset (learned methods) or fuse each of its cases (classical ones).

        Args:
            images: float ``(N, C, *S)`` or ``(N, *S)``; classical methods ignore them.
            raters: int ``(N, R, *S)``, -1 where a rater did not annotate.
            progress: called with a :class:`~raterseg.types.TrainingEvent` per epoch
                (learned) or per case (classical).

        Returns:
            ``self``, trained: ``predict``, ``save`` (learned) or ``results_`` (classical).
            A learned method trains from a fresh initialisation every time, also after
            :func:`raterseg.load` (no fine-tuning of the loaded weights).

        Raises:
            RaterSegError: bad shapes or labels, or a training run that diverged.

        Examples:
            >>> model = rs.create("cm", epochs=30).fit(images, raters, progress=print)
            >>> model.predict(new_images).truth
        """
        for event in self.iter_fit(images, raters):
            if progress is not None:
                progress(event)
        return self

    def iter_fit(self, images: Any, raters: Any) -> Iterator[TrainingEvent]:
        """Classical methods fuse each case; the results land in ``results_``."""
        stack = as_rater_stack(raters, self.num_classes, batched=True)
        self.results_ = []
        n = stack.labels.shape[0]
        for i in range(n):
            case = RaterStack(stack.labels[i], stack.num_classes)
            self.results_.append(unannotated_as_nan(self._fuse(case, None, None), case))
            yield TrainingEvent(i + 1, n, f"{self.name}: case {i + 1}/{n}")

    def predict(self, images: Any) -> FusionResult:
        raise RaterSegError(
            f"method: {self.name!r} is classical and needs the raters of each case; "
            "use raterseg.fuse(raters, ...) or fit(images, raters).results_"
        )

    def save(self, path) -> None:
        raise RaterSegError(f"method: {self.name!r} has no trained model to save")

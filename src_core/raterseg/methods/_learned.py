"""LearnedMethod: the base of every learned fusion method (CM, TGCE, MrPrism, AVAP, baselines).

A learned method supplies three things and inherits everything else (data
checks, normalisation, slicing, training, prediction, fusing one case, saving):

1. ``build_network(in_channels, num_classes, num_raters, spatial_dims)`` → a
   ``torch.nn.Module`` whose ``forward(x)`` maps ``(B, C, *s)`` to a dict of tensors
   ``(B, K, *s)`` (same spatial size as ``x``; image-level outputs broadcast over
   space, e.g. with ``expand``). :class:`raterseg.nn.backbones.MultiHeadUNet` gives
   the shared U-Net trunk with named heads.
2. ``loss(outputs, raters, annotated, state)`` → a scalar tensor, or
   ``(tensor, {name: float})`` to log extra numbers per epoch. ``outputs`` are the
   network's float32 outputs, ``raters`` long ``(B, R, *s)`` class indices (missing
   entries replaced by 0) and ``annotated`` bool ``(B, R, *s)`` where the rater
   labelled. ``state`` is a :class:`raterseg.train.TrainState` (epoch, training or
   validating, a seeded generator).
3. ``interpret(outputs)`` → dict of result fields for a batch:
   ``probabilities`` ``(B, L, *s)`` (required), and optionally ``rater_maps``
   ``(B, R, *s)``, ``rater_estimates`` ``(B, R, L, *s)``, ``rater_confusion``
   ``(B, R, L, L)`` with optional ``confusion_weight`` (broadcastable to it) used to
   average it over slices, cases or tiles (default: plain mean).

Optional hooks: ``prepare_raters(stack)`` (turn the rater labels into what the loss
wants, e.g. the STAPLE consensus as a single "rater"), ``configure_optimizer``
(default Adam), ``check_config`` (reject bad combinations of parameters early).

Cancelling: ``iter_fit`` / ``iter_fuse_case`` are generators; closing one (or
breaking out of the loop) stops training after the current epoch's event and
leaves the method exactly as it was before — an unfitted method stays unfitted, a
fitted one keeps its previous network. Nothing is half-written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._device import resolve_device
from ..types import (
    FusionResult,
    RaterSegError,
    RaterStack,
    TrainingEvent,
    as_rater_stack,
    check_image,
    labels_present,
)
from ._base import (
    FusionMethod,
    Progress,
    empirical_confusion,
    finish_result,
    normalized_entropy,
    param,
    unannotated_as_nan,
)

__all__ = ["LearnedMethod"]


def _check_not_blank(imgs: np.ndarray, argname: str) -> None:
    """Refuse training images ``(N, C, *S)`` that are all constant: a learned method
    segments from the image, and on a blank one it could only learn where the raters
    drew (usually the wrong layer or file was passed as the image)."""
    flat = imgs.reshape(imgs.shape[0], imgs.shape[1], -1)
    if flat.shape[-1] and (flat.max(axis=-1) == flat.min(axis=-1)).all():
        lo, hi = float(flat.min()), float(flat.max())
        value = f"{lo:g} everywhere" if lo == hi else f"values {lo:g} to {hi:g}"
        what = "the image is" if argname == "image" else "each image is"
        raise RaterSegError(
            f"{argname}: expected an image with some contrast, but {what} constant "
            f"({value}); learned methods segment from the image: "
            "pass the scan the raters outlined, or use a classical method (staple, "
            "majority_vote), which needs no image")


def _compact_classes(stack: RaterStack) -> tuple[np.ndarray | None, RaterStack]:
    """Labels with gaps (e.g. {0, 2, 5} of a cropped multi-organ map): the label values that
    occur, and the stack relabelled 0..K-1, so that the network is trained only on classes
    some rater used. A network with outputs for labels nobody drew has nothing holding
    them down, and CM's or AVAP's rater models can route the truth through such a class
    (a user got labels 1, 3 and 4 on most voxels). ``(None, stack)`` when every label
    occurs, or fewer than two do."""
    L = stack.num_classes
    lab = stack.labels
    values = np.flatnonzero(labels_present(lab, L - 1))
    if len(values) == L or len(values) < 2:
        return None, stack
    lut = np.full(L + 1, -1, lab.dtype)  # index L: the -1 of missing labels wraps there
    lut[values] = np.arange(len(values), dtype=lab.dtype)
    return values, RaterStack(lut[lab], len(values), batched=stack.batched)


def _expand_classes(out: dict[str, np.ndarray], values: np.ndarray | None,
                    L: int) -> dict[str, np.ndarray]:
    """Outputs over the network's K classes put back on the labels ``values`` of L classes:
    probabilities and rater estimates are 0 for the labels that never occurred, a rater's
    confusion column of such a label is NaN (never the truth) and its row 0 (never said)."""
    if values is None:
        return out
    out = dict(out)
    prob = out["probabilities"]  # (N, K, *S)
    full = np.zeros((prob.shape[0], L, *prob.shape[2:]), prob.dtype)
    full[:, values] = prob
    out["probabilities"] = full
    est = out.get("rater_estimates")  # (N, R, K, *S)
    if est is not None:
        full = np.zeros((*est.shape[:2], L, *est.shape[3:]), est.dtype)
        full[:, :, values] = est
        out["rater_estimates"] = full
    cm = out.get("rater_confusion")  # (R, K, K)
    if cm is not None:
        full = np.full((cm.shape[0], L, L), np.nan, np.float32)
        full[:, :, values] = 0.0
        full[np.ix_(np.arange(cm.shape[0]), values, values)] = cm
        out["rater_confusion"] = full
    return out


class LearnedMethod(FusionMethod):
    """Base class of the learned methods; see the module docstring for what to implement.

    Fitted state (after :meth:`fit`, :meth:`fuse_case` or :func:`raterseg.load`):
    ``network_`` (the trained ``torch.nn.Module``, in eval mode), ``in_channels_``,
    ``data_ndim_`` (2 or 3: the spatial rank of the training images, which
    :meth:`predict` expects too), ``history_`` (one dict per epoch) and
    ``num_classes`` / ``num_raters`` set from the data.
    """

    learned = True

    @dataclass(frozen=True)
    class Config:
        epochs: int = param(40, "training epochs (passes over the slices or patches)", low=1)
        batch_size: int = param(8, "slices or patches per optimiser step", low=1)
        lr: float = param(1e-3, "Adam learning rate", low=0.0)
        spatial_dims: int = param(2, "2: 2D network on slices; 3: 3D network on patches",
                                  choices=(2, 3))
        val_fraction: float = param(0.1, "share of slices/images held out for early stopping",
                                    low=0.0, high=0.9)
        features: tuple[int, ...] = param((16, 32, 64, 128, 256),
                                          "U-Net widths: input block and 4 down-sampling "
                                          "stages (5 numbers), optionally the last decoder "
                                          "block's width as a 6th (default: the first)")
        patience: int = param(10, "stop after this many epochs without a better validation "
                                  "loss (0: never stop early)", low=0)

    def __init__(self, num_classes: int | None = None, num_raters: int | None = None,
                 device: Any = None, seed: int = 0, **params: Any) -> None:
        super().__init__(num_classes=num_classes, num_raters=num_raters, device=device,
                         seed=seed, **params)
        from ..nn.backbones import check_features

        check_features(self.config.features)
        self.check_config()

    # -- what a method supplies --------------------------------------------------------
    def build_network(self, in_channels: int, num_classes: int, num_raters: int,
                      spatial_dims: int):
        """The network: ``forward(x (B, C, *s))`` → dict of ``(B, K, *s)`` tensors."""
        raise NotImplementedError

    def loss(self, outputs: dict, raters, annotated, state):
        """Scalar training loss (or ``(loss, metrics)``) for one batch; see the module docstring."""
        raise NotImplementedError

    def interpret(self, outputs: dict) -> dict:
        """Result fields for one batch: ``probabilities`` ``(B, L, *s)`` and optional rater fields."""
        raise NotImplementedError

    # -- optional hooks -----------------------------------------------------------------
    def check_config(self) -> None:
        """Raise :class:`RaterSegError` for invalid combinations of parameters."""

    def prepare_raters(self, stack: RaterStack) -> np.ndarray:
        """Labels the loss trains on, int ``(N, R', *S)`` with -1 = missing (default: the raters)."""
        return stack.labels

    def configure_optimizer(self, parameters, lr: float):
        import torch

        return torch.optim.Adam(parameters, lr=lr)

    # -- training -----------------------------------------------------------------------
    def _check_fitted(self, what: str) -> None:
        if getattr(self, "network_", None) is None:
            raise RaterSegError(
                f"{what}: method {self.name!r} is not trained yet; call fit(images, raters), "
                "fuse_case(raters, image) or load a saved model with raterseg.load(path)"
            )

    def iter_fit(self, images: Any, raters: Any) -> Iterator[TrainingEvent]:
        """Train on a dataset, yielding a :class:`TrainingEvent` per epoch.

        Args:
            images: float ``(N, C, *S)`` or ``(N, *S)``.
            raters: int ``(N, R, *S)``, -1 where a rater did not annotate.

        Raises:
            RaterSegError: mismatched shapes, bad labels, NaN in images, wrong rater count.
        """
        stack = as_rater_stack(raters, self.num_classes, batched=True)
        self._check_raters(stack)
        imgs = check_image(images, stack.spatial_shape, batched=True, argname="images")
        if imgs.shape[0] != stack.labels.shape[0]:
            raise RaterSegError(
                f"images: expected {stack.labels.shape[0]} images, one per case of raters "
                f"{stack.labels.shape}, got {imgs.shape[0]}"
            )
        _check_not_blank(imgs, "images")
        return self._train(imgs, stack)

    def _train(self, imgs: np.ndarray, stack: RaterStack, *,
               parallel: bool = True) -> Generator[TrainingEvent, None, None]:
        """Train on ``imgs``/``stack``; ``parallel``: data-parallel when a process group is
        initialised (dataset training); one case's ``fuse`` trains in this process alone."""
        import torch

        from .. import train

        cfg = self.config
        if cfg.spatial_dims == 3 and len(stack.spatial_shape) == 2:
            raise RaterSegError("spatial_dims: expected 2 for 2D images, got 3")
        device = resolve_device(self.device)
        L, R, C = stack.num_classes, stack.num_raters, imgs.shape[1]
        class_values, stack = _compact_classes(stack)
        K = stack.num_classes  # the classes the network tells apart
        labels = self.prepare_raters(stack)
        samples = train.make_samples(train.zscore(imgs), labels, cfg.spatial_dims)
        if len(samples) == 0:
            raise RaterSegError("raters: no slice has any annotation to train on")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network = self.build_network(C, K, R, cfg.spatial_dims)
        # the network's classes while training (interpret reads them through network_classes)
        saved = getattr(self, "class_values_", None)
        self.class_values_ = class_values
        try:
            history = yield from self._run_training(network, samples, device, parallel=parallel)
        except BaseException:
            self.class_values_ = saved
            raise
        # Reached only when training ran to its end: commit the fitted state at once.
        self.num_classes, self.num_raters = L, R
        self.in_channels_, self.data_ndim_ = C, len(stack.spatial_shape)
        self.history_ = history
        self.rater_names_ = None  # names of the raters trained on: set by whoever knows them
        self.network_ = network

    def _run_training(self, network, samples, device, *,
                      parallel: bool = True) -> Generator[TrainingEvent, None, list[dict]]:
        """Train ``network`` in place: yields a :class:`TrainingEvent` per epoch and returns the
        history. Default: one run of :func:`raterseg.train.iter_train`; a method trained in
        stages (``avap``) overrides it to run the engine once per stage."""
        from .. import train

        cfg = self.config
        return (yield from train.iter_train(
            self, network, samples, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
            val_fraction=cfg.val_fraction, patience=cfg.patience, device=device, seed=self.seed,
            parallel=parallel))

    # -- prediction ---------------------------------------------------------------------
    @property
    def network_classes(self) -> int | None:
        """How many classes the network outputs: ``num_classes``, or fewer when some
        labels never occurred in the training data (see :func:`_compact_classes`)."""
        values = getattr(self, "class_values_", None)
        return self.num_classes if values is None else len(values)

    def _outputs(self, imgs: np.ndarray) -> dict[str, np.ndarray]:
        from .. import train

        out = train.predict_outputs(self, self.network_, train.zscore(imgs), self.config.spatial_dims,
                                    resolve_device(self.device), self.config.batch_size)
        return _expand_classes(out, getattr(self, "class_values_", None), self.num_classes)

    def predict(self, images: Any) -> FusionResult:
        """Segment new images; raters are not needed.

        Args:
            images: float ``(N, C, *S)`` or ``(N, *S)`` with the spatial rank and channel
                count the model was trained on.

        Returns:
            :class:`FusionResult` with a leading N on every array field except
            ``rater_confusion`` (averaged over the batch); ``disagreement`` is 0.

        Raises:
            RaterSegError: not trained, wrong number of dimensions or channels, NaN in the
                images or in the model's outputs.
        """
        self._check_fitted("predict")
        arr = np.asarray(images)
        rank = self.data_ndim_
        if arr.ndim not in (rank + 1, rank + 2):
            one = "; for one image pass image[None]" if arr.ndim == rank else ""
            raise RaterSegError(
                f"images: expected (N, C, *S) or (N, *S) with S {rank}D like the training data, "
                f"got an array of shape {arr.shape}{one}"
            )
        imgs = check_image(arr, tuple(arr.shape[-rank:]), batched=True, argname="images")
        if imgs.shape[1] != self.in_channels_:
            raise RaterSegError(
                f"images: expected {self.in_channels_} channel(s) like the training data, "
                f"got {imgs.shape[1]} (shape {arr.shape})"
            )
        out = self._outputs(imgs)
        prob = out["probabilities"]
        if not np.isfinite(prob).all():  # a model saved from a diverged training run
            raise RaterSegError(
                f"model: method {self.name!r} gives NaN or infinite probabilities on these "
                f"images: its training diverged (lr={self.config.lr}); retrain it with a "
                "smaller lr")
        truth = prob.argmax(axis=1).astype(np.int16)
        return FusionResult(
            truth=truth,
            probabilities=prob,
            uncertainty=normalized_entropy(prob, axis=1),
            disagreement=np.zeros(truth.shape, np.float32),
            rater_confusion=out.get("rater_confusion"),
            rater_maps=out.get("rater_maps"),
            rater_estimates=out.get("rater_estimates"),
            method=self.name,
            params=self.params_dict,
            history=list(getattr(self, "history_", [])),
        )

    # -- one case -------------------------------------------------------------------------
    def iter_fuse_case(self, raters: Any, image: Any) -> Generator[TrainingEvent, None, FusionResult]:
        """Train on one case (its slices, or patches with ``spatial_dims=3``) and predict it.

        Yields a :class:`TrainingEvent` per epoch and returns the :class:`FusionResult`
        (``StopIteration.value``; napari's ``thread_worker`` passes it to ``returned``).

        Raises:
            RaterSegError: missing or mismatched image, bad labels.
        """
        if isinstance(raters, RaterStack) and not raters.batched and \
                self.num_classes in (None, raters.num_classes):
            stack = raters
        else:
            stack = as_rater_stack(raters, self.num_classes)
        self._check_raters(stack)
        return self._iter_fuse(stack, image)

    def _iter_fuse(self, stack: RaterStack, image: Any) -> Generator[TrainingEvent, None, FusionResult]:
        if image is None:
            raise RaterSegError(f"image: method {self.name!r} is learned and needs the image, got None")
        img = check_image(image, stack.spatial_shape)
        _check_not_blank(img[None], "image")
        batched = RaterStack(stack.labels[None], stack.num_classes, batched=True)
        # One case: processes of a group usually fuse different cases, so never data-parallel
        # here (collectives over different data would hang or mix cases).
        yield from self._train(img[None], batched, parallel=False)
        out = {k: (v[0] if k != "rater_confusion" else v) for k, v in self._outputs(img[None]).items()}
        prob = out["probabilities"]
        confusion = out.get("rater_confusion")
        if confusion is None:
            confusion = empirical_confusion(stack.labels, prob)
        result = finish_result(prob, stack, self.name, self.params_dict, rater_confusion=confusion,
                               rater_maps=out.get("rater_maps"),
                               rater_estimates=out.get("rater_estimates"),
                               history=list(self.history_))
        return unannotated_as_nan(result, stack)  # also for iter_fuse_case's callers

    def _fuse(self, stack: RaterStack, image: Any, progress: Progress) -> FusionResult:
        gen = self._iter_fuse(stack, image)
        while True:
            try:
                event = next(gen)
            except StopIteration as stop:
                return stop.value
            if progress is not None:
                progress(event)

    # -- saving ---------------------------------------------------------------------------
    def save(self, path) -> None:
        """Save the trained model: safetensors weights with the configuration as JSON metadata.

        Raises:
            RaterSegError: not trained yet.
        """
        from ..serialization import save_method

        self._check_fitted("save")
        save_method(self, path)

    def _fitted_meta(self) -> dict[str, Any]:
        values = getattr(self, "class_values_", None)
        return {"num_classes": self.num_classes, "num_raters": self.num_raters,
                "in_channels": self.in_channels_, "data_ndim": self.data_ndim_,
                "class_values": None if values is None else [int(v) for v in values],
                "rater_names": getattr(self, "rater_names_", None),
                "history": self.history_}

    def _restore(self, meta: dict[str, Any], tensors: dict) -> None:
        values = meta.get("class_values")
        L = int(meta["num_classes"])
        names = meta.get("rater_names")
        if names is not None and (not isinstance(names, list) or len(names) != int(
                meta["num_raters"]) or not all(isinstance(n, str) for n in names)):
            raise RaterSegError(f"path: the model's rater_names {names!r} are not "
                                f"{meta['num_raters']} names")
        self.rater_names_ = names
        if values is not None:
            values = np.asarray(values, dtype=np.int64)
            if values.ndim != 1 or len(values) < 2 or np.any(np.diff(values) <= 0) or \
                    values[0] < 0 or values[-1] >= L:
                raise RaterSegError(
                    f"path: the model's class_values {meta.get('class_values')!r} are not "
                    f"increasing labels in 0..{L - 1}")
        network = self.build_network(int(meta["in_channels"]), L if values is None else len(values),
                                     int(meta["num_raters"]), self.config.spatial_dims)
        try:
            missing, unexpected = network.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # a tensor of the wrong shape
            raise RaterSegError(
                f"path: the weights do not fit a {self.name!r} network with this configuration: "
                f"{str(err).splitlines()[-1].strip()}"
            ) from None
        if missing or unexpected:
            raise RaterSegError(
                f"path: the weights do not fit a {self.name!r} network with this configuration "
                f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        self.num_classes, self.num_raters = L, int(meta["num_raters"])
        self.class_values_ = values
        self.in_channels_, self.data_ndim_ = int(meta["in_channels"]), int(meta["data_ndim"])
        self.history_ = list(meta.get("history", []))
        self.network_ = network.eval()

    @property
    def params_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

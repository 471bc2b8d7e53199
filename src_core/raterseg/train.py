"""One training engine for every learned method.

The engine knows nothing about a method's maths. A method (a
:class:`raterseg.methods._learned.LearnedMethod`) supplies a network whose
``forward`` returns a dict of ``(B, K, *s)`` tensors, a loss on those outputs and
the rater labels, and a conversion of the outputs to result fields; the engine
does the rest:

- data: images ``(N, C, *S)`` z-scored per case and channel; 3D volumes are cut into
  2D slices along their first spatial axis (``spatial_dims=2``) or sampled as random
  patches of edge :data:`PATCH_3D` (``spatial_dims=3``); slices no rater annotated are
  skipped; random flips on every spatial axis as augmentation;
- a validation split (``val_fraction`` of the slices/images, drawn with the seed),
  early stopping after ``patience`` epochs without a better validation loss (training
  loss when there is nothing to validate on), and the best epoch's weights kept;
- Adam, bf16 autocast on CUDA (float32 on the CPU), seeded (repeatable on the CPU);
- one :class:`TrainingEvent` per epoch from a generator: closing it stops training
  at once.

Data parallelism: when a process group of several processes is initialised (``torchrun``;
see :mod:`raterseg._distributed`), ``fit`` trains the network wrapped in
``DistributedDataParallel`` (``fuse`` on one case never does: the processes of a group
usually fuse different cases). Every process draws the same validation split and, per
epoch, the same permutation of the training samples, of which a ``DistributedSampler``
gives it its shard (padded so that every process takes the same number of steps);
``batch_size`` is per process. Flips, patches and the loss's random draws come from a
generator seeded per rank. Training metrics and the validation loss (each process
scores its share of the validation split with the plain network) are summed over the
processes, and rank 0's batch-norm statistics are copied to all at the end of each
epoch, so every process takes the same early-stopping decision and keeps the same
best weights. In a single process nothing of this runs and training is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .types import RaterSegError, TrainingEvent

__all__ = ["PATCH_3D", "TrainState", "iter_train", "make_samples", "predict_outputs", "zscore"]

#: Edge of the random training patches (and sliding-window tiles) of 3D networks.
PATCH_3D = 64

#: Result fields that :meth:`LearnedMethod.interpret` may return with a spatial layout
#: ``(B, ..., *s)``; they are stitched back into whole volumes by :func:`predict_outputs`.
SPATIAL_FIELDS = ("probabilities", "rater_maps", "rater_estimates")


@dataclass
class TrainState:
    """What a loss may need to know about where training stands.

    Attributes:
        epoch: 0-based epoch.
        epochs: number of epochs asked for.
        step: optimiser steps taken so far.
        training: False while computing the validation loss.
        generator: CPU generator for any randomness of the loss (e.g. drawing a rater);
            seeded, so training stays repeatable.
    """

    epoch: int
    epochs: int
    step: int
    training: bool
    generator: torch.Generator


@dataclass
class Samples:
    """Training samples in memory: images ``(N, C, *s)`` float32, raters ``(N, R, *s)`` int16."""

    images: torch.Tensor
    raters: torch.Tensor
    spatial_dims: int

    def __len__(self) -> int:
        return int(self.images.shape[0])


def zscore(images: np.ndarray) -> np.ndarray:
    """Normalise ``(N, C, *S)`` images per case and channel to zero mean and unit variance
    (constant channels become 0). Returns a new float32 array."""
    axes = tuple(range(2, images.ndim))
    x = images.astype(np.float32, copy=True)
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    x -= mean.astype(np.float32)
    x /= np.where(std > 0, std, 1.0).astype(np.float32)
    return x


def _slices(a: np.ndarray) -> np.ndarray:
    """``(N, K, D, H, W)`` → ``(N·D, K, H, W)`` (slices along the first spatial axis)."""
    n, k, d = a.shape[:3]
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3, 4).reshape(n * d, k, *a.shape[3:]))


def make_samples(images: np.ndarray, raters: np.ndarray, spatial_dims: int) -> Samples:
    """Training samples from normalised images ``(N, C, *S)`` and labels ``(N, R, *S)``.

    Raises:
        RaterSegError: ``spatial_dims=3`` on 2D data.
    """
    rank = images.ndim - 2
    if spatial_dims == 3 and rank == 2:
        raise RaterSegError("spatial_dims: expected 2 for 2D images, got 3")
    if spatial_dims == 2 and rank == 3:
        images, raters = _slices(images), _slices(raters)
    keep = (raters >= 0).reshape(raters.shape[0], -1).any(1)
    if not keep.all():
        images, raters = images[keep], raters[keep]
    return Samples(torch.from_numpy(np.ascontiguousarray(images)),
                   torch.from_numpy(np.ascontiguousarray(raters.astype(np.int16))), spatial_dims)


def _split(n: int, val_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    n_val = math.floor(n * val_fraction)
    if n_val < 1 or n - n_val < 1:
        return order, order[:0]
    return order[n_val:], order[:n_val]


def _batches(indices: torch.Tensor, batch_size: int, gen: torch.Generator | None):
    """Mini-batches of sample indices (shuffled when ``gen`` is given)."""
    if gen is not None:
        indices = indices[torch.randperm(len(indices), generator=gen)]
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _patch_shape(spatial: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(min(PATCH_3D, s) for s in spatial)


def _crop(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random patch of every sample in the batch (3D training)."""
    spatial = tuple(x.shape[2:])
    patch = _patch_shape(spatial)
    if patch == spatial:
        return x, y
    xs, ys = [], []
    for b in range(x.shape[0]):
        start = [int(torch.randint(0, s - p + 1, (1,), generator=gen)) for s, p in zip(spatial, patch)]
        sl = (b, slice(None)) + tuple(slice(s0, s0 + p) for s0, p in zip(start, patch))
        xs.append(x[sl])
        ys.append(y[sl])
    return torch.stack(xs), torch.stack(ys)


def _flip(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample along each spatial axis with probability 1/2 (image and labels alike)."""
    nd = x.ndim - 2
    flips = torch.rand(x.shape[0], nd, generator=gen) < 0.5
    for axis in range(nd):
        m = flips[:, axis]
        if m.any():
            m = m.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            x = torch.where(m, x.flip(2 + axis), x)
            y = torch.where(m, y.flip(2 + axis), y)
    return x, y


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward(network, x: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    with _autocast(device):
        out = network(x)
    if isinstance(out, torch.Tensor):
        out = {"out": out}
    return {k: v.float() for k, v in out.items()}


def _batch_loss(method, network, x, y, device, state) -> tuple[torch.Tensor, dict[str, float]]:
    out = _forward(network, x, device)
    y = y.long()
    annotated = y >= 0
    res = method.loss(out, y.clamp_min(0), annotated, state)
    loss, metrics = (res, {}) if isinstance(res, torch.Tensor) else res
    return loss, metrics


def iter_train(method: Any, network: torch.nn.Module, samples: Samples, *, epochs: int,
               batch_size: int, lr: float, val_fraction: float, patience: int,
               device: torch.device, seed: int,
               parallel: bool = True) -> Generator[TrainingEvent, None, list[dict]]:
    """Train ``network`` in place with ``method.loss``; yields one event per epoch.

    ``parallel``: train data-parallel when a process group of several processes is
    initialised (False: train in this process alone whatever the group).

    Returns (as the generator's return value) the history: one dict per epoch with
    ``epoch``, ``loss`` (training), ``val_loss`` (when there is a validation split) and
    the averages of the extra metrics the loss reported. At the end the network holds
    the weights of the epoch with the best monitored loss.

    Raises:
        RaterSegError: the loss became NaN or infinite (the message suggests a lower ``lr``).
    """
    from . import _distributed as dist_

    ddp = parallel and dist_.is_distributed()
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = _split(len(samples), val_fraction, gen)
    has_val = len(val_idx) > 0
    if ddp:
        device = dist_.local_device(device)
        rank, world = dist_.rank(), dist_.world_size()
        val_idx = val_idx[rank::world]
        # augmentation, patches and the loss's draws differ between processes
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (rank + 1))
    on_device = samples.images.element_size() * samples.images.numel() < 2**31
    images = samples.images.to(device) if on_device else samples.images
    raters = samples.raters.to(device) if on_device else samples.raters
    three_d = samples.spatial_dims == 3
    # 3D: an epoch draws as many random patches as it takes to cover each volume once.
    repeats = 1
    if three_d:
        spatial = tuple(samples.images.shape[2:])
        repeats = max(1, math.ceil(math.prod(spatial) / math.prod(_patch_shape(spatial))))

    def batch(idx: torch.Tensor, augment: bool):
        x = images[idx.to(images.device)].to(device, non_blocking=True)
        y = raters[idx.to(raters.device)].to(device, non_blocking=True)
        if three_d:
            x, y = _crop(x, y, gen)
        if augment:
            x, y = _flip(x, y, gen)
        return x, y

    network.to(device)
    model = dist_.wrap(network, device) if ddp else network
    optimizer = method.configure_optimizer(network.parameters(), lr)
    history: list[dict] = []
    best, best_state, best_epoch, since_best, step = math.inf, None, 0, 0, 0
    for epoch in range(epochs):
        network.train()
        state = TrainState(epoch, epochs, step, True, gen)
        sums: dict[str, float] = {}
        count = 0
        diverged = None  # what went non-finite, if anything
        epoch_idx = train_idx.repeat(repeats)
        batches = (_sharded_batches(epoch_idx, batch_size, seed, epoch, rank, world) if ddp
                   else _batches(epoch_idx, batch_size, gen))
        for idx in batches:
            x, y = batch(idx, augment=True)
            state.step = step
            loss, metrics = _batch_loss(method, model, x, y, device, state)
            finite = bool(torch.isfinite(loss))
            bad = 0.0 if finite else 1.0
            if ddp:  # every process stops together, or the others wait forever
                bad = dist_.all_reduce_sum([bad])[0]
            if bad:
                where = f"loss {float(loss.detach())}" if not finite else "non-finite loss on another process"
                diverged = f"{where} in epoch {epoch + 1}"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            n = int(x.shape[0])
            count += n
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
        if ddp:
            keys = list(sums)
            count, *totals = dist_.all_reduce_sum([count, *(sums[k] for k in keys)])
            sums = dict(zip(keys, totals))
            dist_.broadcast_buffers(network)
        record: dict[str, Any] = {"epoch": epoch + 1, **{k: v / max(count, 1) for k, v in sums.items()}}
        # A step can turn the weights non-finite after a finite loss; such weights must
        # never be validated, kept or saved.
        if diverged is None and not _weights_finite(network, ddp):
            diverged = f"non-finite weights after epoch {epoch + 1}"
        if diverged is None and has_val:
            total, n_val = _validate(method, network, val_idx, batch, batch_size, device,
                                     TrainState(epoch, epochs, step, False, gen))
            if ddp:
                total, n_val = dist_.all_reduce_sum([total, n_val])
            record["val_loss"] = total / max(n_val, 1)
            if not math.isfinite(record["val_loss"]):
                diverged = f"validation loss {record['val_loss']} in epoch {epoch + 1}"
        if diverged is not None:  # stop; the best epoch so far is kept, if there is one
            if best_state is None:
                raise RaterSegError(f"lr: training diverged ({diverged}) with lr={lr}; "
                                    "try a smaller lr")
            yield TrainingEvent(epoch + 1, epochs,
                                f"{method.name}: epoch {epoch + 1}/{epochs}: training diverged "
                                f"({diverged}) with lr={lr}; stopped, keeping epoch {best_epoch}")
            break
        history.append(record)
        monitored = record.get("val_loss", record["loss"])
        if monitored < best:
            best, best_epoch, since_best = monitored, epoch + 1, 0
            best_state = copy.deepcopy(network.state_dict())
        else:
            since_best += 1
        stop = patience > 0 and since_best >= patience and epoch + 1 < epochs
        msg = f"{method.name}: epoch {epoch + 1}/{epochs}, loss {record['loss']:.4f}"
        if "val_loss" in record:
            msg += f", val_loss {record['val_loss']:.4f}"
        if stop:
            msg += f" (early stop: no improvement for {patience} epoch{'s' * (patience != 1)})"
        yield TrainingEvent(epoch + 1, epochs, msg,
                            {k: float(v) for k, v in record.items() if k != "epoch"})
        if stop:
            break
    if best_state is not None:
        network.load_state_dict(best_state)
    # The weights kept must give finite outputs: after a huge step they can be finite yet
    # overflow (no validation split catches that), and would be saved and predict NaN.
    probe, n_probe = _validate(method, network, train_idx[:batch_size], batch, batch_size,
                               device, TrainState(epochs - 1, epochs, step, False, gen))
    if ddp:
        probe, n_probe = dist_.all_reduce_sum([probe, n_probe])
    if not math.isfinite(probe / max(n_probe, 1)):
        raise RaterSegError(f"lr: training diverged (the trained network's loss on training "
                            f"images is {probe / max(n_probe, 1)}) with lr={lr}; try a smaller lr")
    network.eval()
    del model
    return history


def _weights_finite(network, ddp: bool) -> bool:
    """Whether every weight and buffer of ``network`` is finite (on every process, so that
    all of them stop together)."""
    import torch

    from . import _distributed as dist_

    tensors = [*network.parameters(), *(b for b in network.buffers() if b.is_floating_point())]
    # one device sync for all of them, not one per tensor
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else True
    bad = 0.0 if bool(finite) else 1.0
    if ddp:
        bad = dist_.all_reduce_sum([bad])[0]
    return not bad


def _sharded_batches(indices: torch.Tensor, batch_size: int, seed: int, epoch: int, rank: int,
                     world: int):
    """Process ``rank``'s mini-batches of ``indices`` for one epoch: a ``DistributedSampler``
    (the same seeded permutation on every process, padded to a multiple of ``world``,
    every ``world``-th element from ``rank`` on), cut into batches."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(indices)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    yield from _batches(indices[torch.tensor(list(sampler), dtype=torch.long)], batch_size, None)


@torch.no_grad()
def _validate(method, network, val_idx, batch, batch_size, device, state) -> tuple[float, int]:
    """Summed validation loss (batch losses weighted by batch size) and sample count."""
    network.eval()
    total, count = 0.0, 0
    for idx in _batches(val_idx, batch_size, None):
        x, y = batch(idx, augment=False)
        loss, _ = _batch_loss(method, network, x, y, device, state)
        total += float(loss) * int(x.shape[0])
        count += int(x.shape[0])
    network.train()
    return total, count


def _predict_batch(method, network, x: torch.Tensor, device, spatial_dims: int) -> dict[str, torch.Tensor]:
    if spatial_dims == 3 and _patch_shape(tuple(x.shape[2:])) != tuple(x.shape[2:]):
        from monai.inferers import sliding_window_inference

        def predictor(t):
            return _forward(network, t, device)

        out = sliding_window_inference(x, _patch_shape(tuple(x.shape[2:])), 1, predictor,
                                       overlap=0.25, mode="gaussian")
        out = {k: v.float() for k, v in out.items()}
    else:
        out = _forward(network, x, device)
    return method.interpret(out)


@torch.no_grad()
def predict_outputs(method: Any, network: torch.nn.Module, images: np.ndarray, spatial_dims: int,
                    device: torch.device, batch_size: int) -> dict[str, np.ndarray]:
    """Run ``network`` on normalised images ``(N, C, *S)`` and convert with ``method.interpret``.

    Returns:
        numpy float32 arrays: the :data:`SPATIAL_FIELDS` the method gave, each with a
        leading N and the full spatial shape ``S`` (``probabilities`` ``(N, L, *S)``, …),
        and ``rater_confusion`` ``(R, L, L)`` averaged over everything predicted
        (weighted by ``confusion_weight`` when the method gives one).
    """
    network.eval().to(device)
    rank = images.ndim - 2
    per_case: dict[str, list[np.ndarray]] = {}
    conf_sum = conf_w = None

    def collect(parts: dict[str, torch.Tensor], store: dict[str, list]):
        nonlocal conf_sum, conf_w
        for k in SPATIAL_FIELDS:
            if parts.get(k) is not None:
                store.setdefault(k, []).append(parts[k].float().cpu().numpy())
        if parts.get("rater_confusion") is not None:
            c = parts["rater_confusion"].double()
            w = parts.get("confusion_weight")
            w = torch.ones_like(c) if w is None else w.double().expand_as(c)
            s, ws = (c * w).sum(0).cpu(), w.sum(0).cpu()
            conf_sum = s if conf_sum is None else conf_sum + s
            conf_w = ws if conf_w is None else conf_w + ws

    if spatial_dims == 2 and rank == 3:
        # one volume at a time, as 2D slices; stitch the slice axis back in front of (H, W)
        for n in range(images.shape[0]):
            sl = torch.from_numpy(np.ascontiguousarray(images[n].transpose(1, 0, 2, 3)))
            store: dict[str, list] = {}
            for start in range(0, sl.shape[0], batch_size):
                x = sl[start:start + batch_size].to(device)
                collect(_predict_batch(method, network, x, device, 2), store)
            for k, parts in store.items():
                vol = np.moveaxis(np.concatenate(parts, axis=0), 0, -3)
                per_case.setdefault(k, []).append(vol)
        out = {k: np.stack(v) for k, v in per_case.items()}
    else:
        step = batch_size if spatial_dims == 2 else 1
        store = {}
        for start in range(0, images.shape[0], step):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + step])).to(device)
            collect(_predict_batch(method, network, x, device, spatial_dims), store)
        out = {k: np.concatenate(v, axis=0) for k, v in store.items()}
    out = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}
    if conf_sum is not None:
        out["rater_confusion"] = (conf_sum / conf_w.clamp_min(1e-12)).float().numpy()
    return out

"""Data-parallel training across processes: the few helpers the engine and the CLI need.

A command started by ``torchrun --nproc_per_node=N`` (or ``python -m torch.distributed.run``)
finds ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. :func:`setup`
then joins the process group — gloo on the CPU, nccl on CUDA with one GPU per process
(``cuda:LOCAL_RANK``) — and :func:`raterseg.train.iter_train` trains with
``DistributedDataParallel`` whenever a process group of more than one process is
initialised (by :func:`setup`, or by a user's own script) and the training is a
dataset's (``fit``, ``raterseg train``); fusing one case trains locally. Everything here is a no-op
in a single process, which trains exactly as before.

torch is imported lazily, as everywhere in the core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

__all__ = ["all_reduce_sum", "barrier", "broadcast_buffers", "is_distributed", "is_main",
           "launched", "local_device", "rank", "setup", "teardown", "world_size", "wrap"]

#: True while this process holds a process group that :func:`setup` created.
_OWNED = False


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_distributed() -> bool:
    """True when a process group of more than one process is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    import torch.distributed as dist

    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes training together (1 in a single process)."""
    import torch.distributed as dist

    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the process that prints and writes files (and in a single process).

    Before :func:`setup` it reads ``RANK`` from the environment, so a torchrun worker
    knows its role from the start."""
    if is_distributed():
        return rank() == 0
    return os.environ.get("RANK", "0") == "0" or not launched()


def local_device(device: Any):
    """The device of this process: ``cuda`` without an index becomes the current GPU
    (``cuda:LOCAL_RANK`` after :func:`setup`); anything else is returned as is."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def setup(device: Any = None):
    """Join the process group when started by torchrun; return this process's device.

    Args:
        device: the device asked for (``None``: CUDA when available); under torchrun a
            plain ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``torch.device``; in a single process, :func:`raterseg._device.resolve_device`'s.

    Raises:
        RaterSegError: an unknown or unavailable device; under torchrun, a GPU index
            named while several processes share the machine, or fewer GPUs than processes;
            ``WORLD_SIZE`` set without the rest of torchrun's environment.
    """
    global _OWNED
    import torch
    import torch.distributed as dist

    from ._device import resolve_device
    from .types import RaterSegError

    dev = resolve_device(device)
    if not launched():
        return dev
    if dev.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if dev.index is not None and local_size > 1:
            raise RaterSegError(
                f"device: under torchrun each of the {local_size} processes on this machine "
                f"uses its own GPU (cuda:LOCAL_RANK); pass 'cuda' or leave --device out, "
                f"got {str(dev)!r}")
        if local_rank >= torch.cuda.device_count():
            raise RaterSegError(
                f"device: process {local_rank} of {local_size} on this machine needs a GPU of "
                f"its own, but only {torch.cuda.device_count()} GPU(s) exist; start at most "
                f"that many processes per machine (--nproc_per_node) or use --device cpu")
        dev = torch.device("cuda", local_rank) if dev.index is None else dev
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:  # torch's env:// rendezvous would fail with a traceback
            raise RaterSegError(
                f"WORLD_SIZE: the environment asks for {os.environ['WORLD_SIZE']} processes but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; expected "
                "a start by torchrun (torchrun --nproc_per_node=N ...), or unset WORLD_SIZE")
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
        _OWNED = True
    return dev


def teardown() -> None:
    """Leave the process group :func:`setup` created (nothing otherwise)."""
    global _OWNED
    import torch.distributed as dist

    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def _reduce_device():
    """Where collectives' tensors live: the current GPU for nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum ``values`` element-wise over every process (float64; a copy in one process)."""
    import torch
    import torch.distributed as dist

    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_buffers(module) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every process, so that all hold
    the same model (parameters are kept equal by DDP; buffers drift by a step)."""
    import torch.distributed as dist

    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)


def wrap(network, device):
    """``network`` wrapped in ``DistributedDataParallel`` (parameters that require a
    gradient only: a frozen part, as in ``avap``'s second step, is left out)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=ids, output_device=ids[0] if ids else None)

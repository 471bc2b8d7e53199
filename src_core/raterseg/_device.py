"""Device selection shared by every method (torch is imported only here, lazily)."""

from __future__ import annotations

from typing import Any

from .types import RaterSegError


def resolve_device(device: Any = None):
    """``None`` → CUDA when available, else CPU; strings and ``torch.device`` accepted.

    Raises:
        RaterSegError: an unknown device string, or CUDA asked for but not available.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RaterSegError(
            f"device: expected 'cpu', 'cuda', 'cuda:N' or None, got {device!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RaterSegError(f"device: {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RaterSegError(
                f"device: {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    elif dev.type not in ("cpu", "mps"):
        raise RaterSegError(f"device: expected 'cpu', 'cuda', 'cuda:N' or None, got {device!r}")
    return dev

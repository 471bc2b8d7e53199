"""Saving and loading trained models safely: one safetensors file, config as JSON metadata.

A model file is a standard safetensors file (8-byte little-endian header length,
a JSON header, raw tensor bytes). The header's ``__metadata__`` holds one entry,
``"raterseg"``: a JSON object with the format name and version, the raterseg
version, the method's registered name, its configuration, ``seed``, and the fitted
facts (``num_classes``, ``num_raters``, ``in_channels``, ``data_ndim``, ``class_values``:
the labels the network outputs when some never occurred in training, else null,
``rater_names``: the raters' names when training knew them (``raterseg train`` on a
cohort folder), else null, ``history``), and
the SHA-256 of the weights, checked on loading (corrupted bytes under an intact header).
Any safetensors reader can open it; ``python -m json.tool`` can show the config.

Loading reads the header as JSON, checks it, and reads the tensors with
``safetensors`` — nothing is unpickled and nothing in the file is executed, so a
pickle (or anything else) named ``model.safetensors`` is refused with
:class:`RaterSegError`. Writing goes to a temporary file next to the target, renamed
into place once complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .io import _atomic
from .types import RaterSegError

__all__ = ["FORMAT", "FORMAT_VERSION", "load_method", "read_header", "save_method"]

FORMAT = "raterseg-model"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 2**20


def save_method(method: Any, path: str | os.PathLike) -> Path:
    """Write a trained learned method to ``path`` (any name; ``.safetensors`` is customary).

    Raises:
        RaterSegError: the method is not trained, or the folder does not exist.
    """
    from safetensors.torch import save_file

    from . import __version__

    method._check_fitted("save")
    path = Path(path)
    if not path.parent.is_dir():
        raise RaterSegError(f"path: expected a file in an existing folder, got {str(path)!r}")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "raterseg_version": __version__,
        "method": method.name,
        "config": method.params_dict,
        "seed": method.seed,
        **method._fitted_meta(),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in method.network_.state_dict().items()}
    meta["weights_sha256"] = _digest(tensors)
    try:  # atomic, with the mode a plain open() would give (readable by the group)
        with _atomic(path) as tmp:
            save_file(tensors, str(tmp), metadata={"raterseg": json.dumps(meta)})
    except OSError as e:
        raise RaterSegError(f"path: cannot write the model to {str(path)!r} "
                            f"({e.strerror or e})") from None
    return path


def read_header(path: str | os.PathLike, argname: str = "path") -> dict[str, Any]:
    """The raterseg metadata of a model file, read as JSON only.

    Args:
        path: the model file.
        argname: the name errors give the file (the CLI's ``MODEL``).

    Raises:
        RaterSegError: missing file, a folder, or not a raterseg safetensors model.
    """
    path = Path(path)
    if not path.is_file():
        why = "a folder" if path.is_dir() else "no such file"
        raise RaterSegError(f"{argname}: expected a saved raterseg model file, got "
                            f"{str(path)!r} ({why})")
    not_model = (f"{argname}: expected a raterseg model (a safetensors file written by "
                 f"method.save), but {str(path)!r} is not one")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise RaterSegError(not_model + " (too short)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or n > path.stat().st_size - 8:
            raise RaterSegError(not_model + " (no safetensors header)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        meta = json.loads(header["__metadata__"]["raterseg"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise RaterSegError(not_model + " (no raterseg metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RaterSegError(not_model + " (unknown format)")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RaterSegError(
            f"path: {str(path)!r} was written in model format {meta.get('format_version')} by "
            f"raterseg {meta.get('raterseg_version')}; this raterseg reads format "
            f"{FORMAT_VERSION} — update raterseg"
        )
    return meta


def load_method(path: str | os.PathLike, method: str | None = None, device: Any = None):
    """Load a model written by :func:`save_method`.

    Args:
        path: the model file.
        method: when given, the method the file must hold (a checkpoint of another
            method is refused).
        device: where to predict; None: CUDA when available.

    Raises:
        RaterSegError: not a raterseg model, another method than ``method``, unknown
            method or parameters, or weights that do not fit the configuration.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .methods._registry import get_method

    meta = read_header(path)
    name = meta.get("method")
    if method is not None and name != method:
        raise RaterSegError(f"path: expected a {method!r} model, but {str(path)!r} holds a "
                            f"{name!r} model")
    cls = get_method(name)
    if not getattr(cls, "learned", False):
        raise RaterSegError(f"path: method {name!r} in {str(path)!r} has no trained model")
    config = dict(meta.get("config", {}))
    try:
        obj = cls(device=device, seed=int(meta.get("seed", 0)), **config)
    except RaterSegError as err:  # e.g. a parameter a newer raterseg added
        from . import __version__

        saved = str(meta.get("raterseg_version") or "")
        if _version_key(saved) > _version_key(__version__):
            why = f"; it was saved by raterseg {saved} (this is {__version__}): update raterseg"
        elif saved and saved != __version__:
            why = f"; it was saved by raterseg {saved} (this is {__version__})"
        else:
            why = ""
        raise RaterSegError(f"path: {str(path)!r} holds a {name!r} configuration this raterseg "
                            f"cannot use ({err}){why}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise RaterSegError(f"path: {str(path)!r} holds damaged weights ({err})") from None
    expected = meta.get("weights_sha256")  # files from before the digest have none
    if expected is not None and _digest(tensors) != expected:
        raise RaterSegError(f"path: {str(path)!r} holds damaged weights (their SHA-256 differs "
                            "from the one recorded when the model was saved)")
    obj._restore(meta, tensors)
    return obj


def _version_key(version: str) -> tuple[int, ...]:
    """(0, 1, 0) for "0.1.0" or "0.1.0.dev3": the leading release numbers, for ordering."""
    import re

    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


def _digest(tensors: dict) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()

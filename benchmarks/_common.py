"""Helpers shared by the benchmark scripts: the machine's name and docs/BENCHMARKS.md sections.

Each script owns one section of docs/BENCHMARKS.md between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` and replaces only that, atomically.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def replace_section(name: str, text: str, docs: Path = DOCS) -> None:
    """Put ``text`` between the ``name`` markers of ``docs`` (appended when absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{text}\n{end}"
    old = docs.read_text() if docs.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, docs)


#: The LIDC-IDRI slices of ../shared (dev machine only; benchmarks that need it say so).
LIDC = ROOT.parent / "shared" / "data" / "lidc" / "lidc_dev.npz"


def load_lidc(path: Path, crop: int, n_train: int | None, n_test: int | None, seed: int):
    """``((x_train, y_train), (x_test, y_test))``: images float32 (N, H, W), raters int16
    (N, 4, H, W); patients never in both parts (80/20); optional random subsets and a
    centre crop (LIDC slices are centred on the nodule)."""
    import numpy as np
    from raterseg.datasets import load_npz_dataset, split_by_patient

    d = load_npz_dataset(path)
    train, test = split_by_patient(d.ids, (0.8, 0.2), seed=seed)
    rng = np.random.default_rng(seed)
    if n_train is not None and n_train < len(train):
        train = np.sort(rng.choice(train, n_train, replace=False))
    if n_test is not None and n_test < len(test):
        test = np.sort(rng.choice(test, n_test, replace=False))
    size = d.images.shape[-1]
    sl = slice(None)
    if crop and crop < size:
        lo = (size - crop) // 2
        sl = slice(lo, lo + crop)

    def take(idx):
        return (d.images[idx][..., sl, sl].astype(np.float32),
                d.raters[idx][..., sl, sl].astype(np.int16))

    return take(train), take(test)

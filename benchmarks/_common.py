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


# -- MNIST with simulated raters (CM paper, Zhang et al. 2020, appendix A.1) ---------------

#: The MNIST test set of ../shared (the only MNIST split there).
MNIST = ROOT.parent / "shared" / "data" / "mnist"
#: The CM paper's five annotators, in its order.
MNIST_KINDS = ("good", "over", "under", "wrong", "blank")


def kind_strengths(kinds, scale: float = 1.0) -> list[float]:
    """Each kind's ``raterseg.synth`` default strength times ``scale`` (the noise sweep's
    knob: radii of over/under/wrong, amplitude of good; "blank" has none)."""
    from raterseg.synth import DEFAULT_STRENGTH

    return [DEFAULT_STRENGTH[k] * scale for k in kinds]


def simulate_dataset_raters(truth, kinds=MNIST_KINDS, strength=None, seed: int = 0):
    """Simulated raters for every case: int16 ``(N, R, H, W)`` from truth ``(N, H, W)``.

    Case ``i`` draws from seed ``100003·seed + i`` (as ``cm_mnist.py`` does), so a case's
    raters do not depend on which other cases are in the set. ``strength`` as in
    ``raterseg.synth.simulate_raters`` (None: defaults; one number; one per kind)."""
    import numpy as np
    from raterseg import synth

    return np.stack([synth.simulate_raters(t, kinds, strength, seed=seed * 100003 + i)
                     for i, t in enumerate(truth)])


def mask_labels(raters, labels: str = "dense", seed: int = 0):
    """``"dense"``: every rater on every case (a copy); ``"single"``: one random rater per
    case, the others -1 (the CM paper's "one label per image")."""
    import numpy as np
    from raterseg import synth

    if labels == "dense":
        return np.array(raters, dtype=np.int16, copy=True)
    if labels == "single":
        return synth.drop_raters(raters, mode="one_per_case", seed=seed, batched=True)
    raise ValueError(f"labels: expected 'dense' or 'single', got {labels!r}")


def load_mnist_raters(n_train: int, n_test: int, seed: int, kinds=MNIST_KINDS,
                      strength=None, labels: str = "dense", path: Path = MNIST,
                      shuffle: bool = True) -> dict:
    """Train/test digits with simulated raters, as a dict of arrays:

    ``x_train`` float32 (N, 28, 28), ``t_train`` int16 truth (intensity > 0.5),
    ``y_train`` raters as trained on (``labels`` masking applied), ``y_train_dense`` (all
    raters, for the true confusion matrices), and ``x_test``, ``t_test``, ``y_test``
    (dense). ``shuffle``: disjoint random subsets per ``seed`` (else the first digits)."""
    import numpy as np
    from raterseg import synth

    n = n_train + n_test
    images, truth = synth.load_mnist(path)
    if n > len(images):
        raise ValueError(f"n_train + n_test: expected at most {len(images)} digits, got {n}")
    idx = (np.random.default_rng(seed).permutation(len(images))[:n] if shuffle
           else np.arange(n))
    x, t = images[idx], truth[idx]
    dense = simulate_dataset_raters(t, kinds, strength, seed)
    return {"x_train": x[:n_train], "t_train": t[:n_train],
            "y_train": mask_labels(dense[:n_train], labels, seed),
            "y_train_dense": dense[:n_train],
            "x_test": x[n_train:], "t_test": t[n_train:], "y_test": dense[n_train:]}


def true_confusion(raters, truth, num_classes: int = 2):
    """Empirical ``(R, L, L)`` confusion of raters ``(N, R, *S)`` against the truth
    ``(N, *S)``: ``[r, i, j] = p(rater r says i | truth j)``; -1 entries left out."""
    import numpy as np
    from raterseg.methods._base import empirical_confusion

    onehot = np.stack([truth == c for c in range(num_classes)]).astype(np.float32)
    return empirical_confusion(np.moveaxis(np.asarray(raters), 1, 0), onehot)


def mean_dice(pred, target) -> float:
    """Mean over cases of Dice (class 1) of ``pred`` against ``target``, both ``(N, *S)``;
    a case where both are empty scores 1."""
    import numpy as np
    from raterseg import metrics

    return float(np.mean([metrics.dice(p, t) for p, t in zip(pred, target)]))

"""Rater-label patterns: the histogram that classical methods with a global model run on.

Without a spatial term, majority voting and STAPLE's E-step see a voxel only through
its *pattern*: the tuple of labels its R raters gave (-1 = missing). A volume of N
voxels holds at most min(N, (L+1)^R) distinct patterns, usually a few hundred. So a
method can work on the histogram of patterns (one pass over the data to build it),
compute a per-pattern table, and map the table back to voxels with one gather.

Each voxel's pattern is encoded as an integer in base L+1 (digit = label + 1, so 0 =
missing). When (L+1)^R is small the histogram is a ``bincount`` over those codes (no
sort; on the CPU with numpy, whose single-threaded element-wise loops never wait on a
busy thread pool); otherwise ``torch.unique`` compresses the codes to pattern indices,
compressing on the way whenever the next rater's digit could overflow int64. Counts
are int64, so they stay exact at any volume size.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np

from .._device import resolve_device
from .._threads import in_threads
from ._base import FusionMethod, Progress, normalize_columns

#: Voxels per chunk when encoding: bounds temporaries, keeps them cache-friendly.
CHUNK = 1 << 18
_INT64_LIMIT = 1 << 62


@dataclass
class PatternHistogram:
    """Distinct rater-label patterns of one case and how often each occurs.

    Attributes:
        labels: int64 torch ``(R, P)``: the P distinct patterns, -1 = missing.
        counts: int64 torch ``(P,)``: voxels showing each pattern (exact at any size).
        index: torch ``(N,)``: each voxel's code (``slot`` is not None: the raw base-(L+1)
            code, int16/int32/int64) or its pattern number (``slot`` None).
        slot: int64 torch ``(B,)`` mapping raw codes to pattern numbers (-1 = unseen),
            or None when ``index`` already holds pattern numbers.
    """

    labels: object
    counts: object
    index: object
    slot: object | None

    @property
    def num_patterns(self) -> int:
        return int(self.counts.shape[0])

    def to_voxels(self, *tables: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        """Map per-pattern tables ``(K, P)`` (or ``(P,)``) to voxels: ``(K, N)`` (or ``(N,)``).

        All tables are gathered in one pass over the voxels' codes, on the histogram's
        device; numpy arrays on the CPU come back (a tuple when several tables are given).
        """
        import torch

        n = int(self.index.shape[0])
        flat, outs = [], []
        for table in tables:
            t = np.asarray(table)
            t2 = t.reshape(-1, t.shape[-1])
            if self.slot is not None:  # expand to one entry per raw code
                slot = self.slot.cpu().numpy()
                full = np.zeros((t2.shape[0], slot.shape[0]), t2.dtype)
                seen = slot >= 0
                full[:, seen] = t2[:, slot[seen]]
                t2 = full
            flat.append(np.ascontiguousarray(t2))
            outs.append(np.empty((t2.shape[0], n), t2.dtype))
        if self.index.device.type == "cpu":
            # In chunks: int32 indices (numpy's cast is fast), then torch's index_select,
            # the fastest CPU gather here; only a chunk of converted indices at a time.
            # Voxel ranges go to torch's thread count of workers (the outputs' fresh pages
            # are faulted in by several threads too).
            idx = self.index.numpy()
            pairs = [(torch.from_numpy(t), torch.from_numpy(o)) for t, o in zip(flat, outs)]

            def gather(lo: int, hi: int) -> None:
                for s in range(lo, hi, CHUNK):
                    e = min(s + CHUNK, hi)
                    ci = torch.from_numpy(idx[s:e].astype(np.int32))
                    for tab, dst in pairs:
                        for k in range(tab.shape[0]):
                            torch.index_select(tab[k], 0, ci, out=dst[k, s:e])

            in_threads(n, gather)
        else:
            idx = self.index if self.index.dtype in (torch.int32, torch.int64) else self.index.int()
            for t, o in zip(flat, outs):
                tab = torch.as_tensor(t, device=idx.device)
                for k in range(t.shape[0]):
                    o[k] = tab[k].index_select(0, idx).cpu().numpy()
        res = tuple(o[0] if np.ndim(t) == 1 else o for t, o in zip(tables, outs))
        return res[0] if len(res) == 1 else res


def _code_dtype(bins: int, *, storage: bool = False):
    """Smallest torch integer dtype holding codes ``0..bins-1`` (uint8 only for storage:
    arithmetic runs in a signed type, since digits start at -1)."""
    import torch

    if storage and bins <= 256:
        return torch.uint8
    if bins <= np.iinfo(np.int16).max:
        return torch.int16
    if bins <= np.iinfo(np.int32).max:
        return torch.int32
    return torch.int64


def pattern_histogram(labels, num_classes: int, *, max_bins: int | None = None) -> PatternHistogram:
    """Histogram of the rater-label patterns of one case.

    Args:
        labels: int torch tensor ``(R, N)`` (int16/int32), -1 = missing, on any device.
        num_classes: L.
        max_bins: largest code space counted with ``bincount`` (default: max(N, 2^16));
            larger code spaces go through ``torch.unique``.

    Returns:
        :class:`PatternHistogram`.
    """
    import torch

    R, n = labels.shape
    base = num_classes + 1
    bins = base**R
    if max_bins is None:
        max_bins = max(n, 1 << 16)
    dev = labels.device
    if bins <= max_bins:
        dt = _code_dtype(bins)
        store = _code_dtype(bins, storage=True)
        offset = sum(base**k for k in range(R))  # shifts every digit from label to label + 1
        if dev.type == "cpu":
            # numpy: single-threaded element-wise work never waits on a busy OpenMP pool
            np_dt = [torch.empty((), dtype=t).numpy().dtype for t in (dt, store)]
            codes_np, counts_np = _encode_numpy(labels.numpy(), base, offset, bins, *np_dt)
            codes, counts = torch.from_numpy(codes_np), torch.from_numpy(counts_np)
        else:
            codes = torch.empty(n, dtype=store, device=dev)
            counts = torch.zeros(bins, dtype=torch.int64, device=dev)
            for s in range(0, n, CHUNK):
                c = _horner(labels[:, s : s + CHUNK], base, dt)
                c.add_(offset)
                codes[s : s + CHUNK] = c
                counts += torch.bincount(c, minlength=bins)
        seen = torch.nonzero(counts).squeeze(1)
        slot = torch.full((bins,), -1, dtype=torch.int64, device=dev)
        slot[seen] = torch.arange(seen.shape[0], device=dev)
        digits = []
        rest = seen.clone()
        for _ in range(R):  # least significant digit = last rater
            digits.append(rest % base - 1)
            rest = rest // base
        pat = torch.stack(digits[::-1])
        return PatternHistogram(pat, counts[seen], codes, slot)

    # Large code space: encode in int64, compressing with unique before it could overflow.
    code = None
    span = 1
    for r in range(R):
        if code is not None and span * base >= _INT64_LIMIT:
            _, code = torch.unique(code, return_inverse=True)
            span = int(code.max()) + 1
        d = labels[r].to(torch.int64) + 1
        code = d if code is None else code.mul_(base).add_(d)
        span *= base
    uniq, inverse, counts = torch.unique(code, return_inverse=True, return_counts=True)
    del code, uniq
    rep = torch.empty(counts.shape[0], dtype=torch.int64, device=dev)
    rep.scatter_(0, inverse, torch.arange(n, device=dev))  # any voxel of each pattern
    pat = labels[:, rep].to(torch.int64)
    return PatternHistogram(pat, counts, inverse, None)


def _encode_numpy(lab: np.ndarray, base: int, offset: int, bins: int, dt, store):
    """Codes ``(N,)`` (computed in dtype ``dt``, stored as ``store``) and their histogram
    ``(bins,)`` int64 (numpy), in voxel ranges on torch's thread count of workers."""
    import torch

    n = lab.shape[1]
    codes = np.empty(n, store)

    def encode(lo: int, hi: int) -> np.ndarray:
        counts = np.zeros(bins, np.int64)
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            c = lab[0, s:e].astype(dt)
            for r in range(1, lab.shape[0]):
                c *= base
                c += lab[r, s:e]
            c += offset
            codes[s:e] = c
            # torch's bincount takes the stored codes as they are (numpy's first converts
            # them to int64, which costs more than the encoding)
            counts += torch.bincount(torch.from_numpy(codes[s:e]), minlength=bins).numpy()
        return counts

    return codes, sum(in_threads(n, encode))


def _horner(chunk, base: int, dt):
    """Σ_r label_r · base^(R-1-r) of a ``(R, n)`` chunk in dtype ``dt`` (can be negative)."""
    c = chunk[0].to(dt, copy=True)
    for r in range(1, chunk.shape[0]):
        c.mul_(base).add_(chunk[r] if chunk.dtype == dt else chunk[r].to(dt))
    return c


def pattern_votes(hist: PatternHistogram, num_classes: int) -> np.ndarray:
    """Votes per class of each pattern, int32 numpy ``(L, P)`` (-1 never counts)."""
    pat = hist.labels.cpu().numpy()
    return np.stack([(pat == c).sum(0, dtype=np.int32) for c in range(num_classes)])


def pattern_confusion(hist: PatternHistogram, truth_table: np.ndarray) -> np.ndarray:
    """:func:`~raterseg.methods._base.empirical_confusion` from per-pattern truth ``(L, P)``.

    ``[r, i, j] = Σ_voxels [rater r says i]·truth[j] / Σ_voxels [r annotated]·truth[j]``,
    float32 ``(R, L, L)``; a column with no mass is NaN.
    """
    pat = hist.labels.cpu().numpy()
    counts = hist.counts.cpu().numpy().astype(np.float64)
    L = truth_table.shape[0]
    weighted = truth_table.astype(np.float64) * counts  # (L, P) voxel-weighted truth
    cm = np.zeros((pat.shape[0], L, L))
    for r in range(pat.shape[0]):
        for i in range(L):
            cm[r, i] = weighted[:, pat[r] == i].sum(axis=1)
    return normalize_columns(cm)


#: Per-voxel fields of a :class:`FusionResult` that are functions of the voxel's pattern,
#: in the order :func:`output_tables` returns them.
VOXEL_FIELDS = ("truth", "probabilities", "uncertainty", "disagreement")


@dataclass
class PatternFit:
    """What a method with a global model (no spatial term) fits on a pattern histogram.

    Attributes:
        probabilities: float32 ``(L, P)`` p(true class) of each pattern.
        truth: int ``(P,)`` label of each pattern; None = argmax of ``probabilities``
            (lowest label on ties).
        fields: further :class:`FusionResult` fields (``rater_confusion``, ``history``).
    """

    probabilities: np.ndarray
    truth: np.ndarray | None = None
    fields: dict = dataclass_field(default_factory=dict)


def output_tables(hist: PatternHistogram, fit: PatternFit) -> dict[str, np.ndarray]:
    """Per-pattern tables of :data:`VOXEL_FIELDS`: truth ``(P,)`` int16/int32, the others
    float32 ``(L, P)`` or ``(P,)``. Gathering them to voxels gives exactly what
    :func:`~raterseg.methods._base.finish_result` computes voxel by voxel."""
    from ._base import normalized_entropy, observed_disagreement

    prob = np.ascontiguousarray(fit.probabilities, dtype=np.float32)
    L = prob.shape[0]
    truth = prob.argmax(axis=0) if fit.truth is None else np.asarray(fit.truth)
    pat = hist.labels.cpu().numpy().astype(np.int32)
    return {
        "truth": truth.astype(np.int16 if L < 32000 else np.int32),
        "probabilities": prob,
        "uncertainty": normalized_entropy(prob),
        "disagreement": observed_disagreement(pat, L),
    }


def result_from_patterns(hist: PatternHistogram, fit: PatternFit, shape: tuple[int, ...],
                         method: str, params: dict):
    """A one-case :class:`FusionResult`: the tables of :func:`output_tables` gathered to
    the voxels (one gather per output row), plus ``fit.fields``.

    Args:
        hist: the case's histogram (with its voxel ``index``).
        fit: the method's per-pattern results.
        shape: spatial shape S.
    """
    from ..types import FusionResult

    tables = output_tables(hist, fit)
    voxels = hist.to_voxels(*(tables[k] for k in VOXEL_FIELDS))
    out = {}
    for k, v in zip(VOXEL_FIELDS, voxels):
        out[k] = v.reshape(v.shape[:-1] + tuple(shape))
    return FusionResult(method=method, params=params, **out, **fit.fields)


class PatternMethod(FusionMethod):
    """A classical method whose outputs depend on a voxel only through its pattern of
    rater labels (a global model: no spatial term). Subclasses implement
    :meth:`fit_patterns`; the same fit then serves one case in memory (``fuse``) and a
    volume read in chunks (:func:`raterseg.fuse_chunked`), with identical results."""

    def fit_patterns(self, hist: PatternHistogram, num_classes: int, progress: Progress) -> PatternFit:
        """Fit on the histogram (only ``hist.labels`` and ``hist.counts`` may be used)."""
        raise NotImplementedError

    def _fuse(self, stack, image, progress: Progress):
        import torch

        labels = torch.as_tensor(stack.labels.reshape(stack.num_raters, -1),
                                 device=resolve_device(self.device))
        hist = pattern_histogram(labels, stack.num_classes)
        del labels
        fit = self.fit_patterns(hist, stack.num_classes, progress)
        return result_from_patterns(hist, fit, stack.spatial_shape, self.name, self.params_dict)

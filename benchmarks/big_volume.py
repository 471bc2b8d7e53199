"""Bounded memory: classical fusion of a volume bigger than memory budgets, in slabs.

Writes a synthetic ``(R, D, H, W)`` uint8 rater stack to one ``.npy`` file (default
5 × 512 × 1024 × 1024: 537 M voxels, 2.5 GiB of labels), then fuses it with
``raterseg.fuse_chunked`` for each method, each run in a fresh process that reports its
peak resident memory (VmHWM, which counts the torch import too) and wall time.
The in-memory path would hold the labels as int16 (5 GiB) plus its outputs (9 GiB).

The raters: an ellipsoid with a wavy surface as the truth; an over- and an
under-segmenting rater (surface shifted out / in), two good ones with 1% random flips,
one of them missing (-1) in the first eighth of the slices. A check on the result:
majority vote's truth on a middle slab equals ``raterseg.fuse`` on that slab in memory.

Writes a "Bounded memory" section into docs/BENCHMARKS.md between the ``big_volume``
markers.

    python benchmarks/big_volume.py [--shape 512 1024 1024] [--chunk-voxels 8388608]
                                    [--methods staple majority_vote mean] [--dir DIR]
                                    [--keep] [--no-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_model, replace_section

R = 5


def rater_slab(z0: int, z1: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Rater labels ``(R, z1 - z0, H, W)`` uint8 of the synthetic volume (255 = missing)."""
    D, H, W = shape
    z = (np.arange(z0, z1, dtype=np.float32)[:, None, None] - D / 2) / (0.38 * D)
    y = (np.arange(H, dtype=np.float32)[None, :, None] - H / 2) / (0.40 * H)
    x = (np.arange(W, dtype=np.float32)[None, None, :] - W / 2) / (0.35 * W)
    r = np.sqrt(z * z + y * y + x * x)
    wave = 0.04 * np.sin(9 * x) * np.cos(7 * y) * np.cos(5 * z)
    level = r - wave
    rng = np.random.default_rng([seed, z0])
    out = np.empty((R, z1 - z0, H, W), np.uint8)
    out[0] = level < 1.0  # good
    out[1] = level < 1.08  # over
    out[2] = level < 0.92  # under
    for k in (3, 4):  # good, with 1% random flips
        flip = rng.random((z1 - z0, H, W), dtype=np.float32) < 0.01
        out[k] = (level < 1.0) ^ flip
    missing_to = D // 8
    if z0 < missing_to:
        out[4, : min(z1, missing_to) - z0] = 255
    return out


def write_stack(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """The ``(R, *shape)`` int8 stack (-1 = missing) as ``.npy``, written slab by slab."""
    mm = np.lib.format.open_memmap(path, "w+", np.int8, (R,) + shape)
    step = max(1, (1 << 23) // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        mm[:, z0:z1] = rater_slab(z0, z1, shape, seed).view(np.int8)
    mm.flush()
    del mm


# Peak memory from VmHWM: ru_maxrss would carry over the parent's peak through fork+exec.
CHILD = """
import json, sys, time
import raterseg as rs
def hwm_gib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
t = time.perf_counter()
res = rs.fuse_chunked(sys.argv[1], sys.argv[2], method=sys.argv[3],
                      chunk_voxels=int(sys.argv[4]), device="cpu", num_classes=2)
wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall,
                  "peak_gib": hwm_gib(),
                  "iterations": len(res.history),
                  "sens": [float(v) for v in res.rater_confusion[:, 1, 1]]}))
"""


def run_method(stack: Path, out: Path, method: str, chunk_voxels: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(stack), str(out), method,
                           str(chunk_voxels)], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_slab(stack: Path, out: Path, shape: tuple[int, int, int]) -> bool:
    """Majority vote is voxel-local: a middle slab fused in memory must match."""
    import raterseg as rs

    z0, z1 = shape[0] // 2, shape[0] // 2 + 4
    labels = np.load(stack, mmap_mode="r")[:, z0:z1].astype(np.int16)
    ref = rs.fuse(labels, method="majority_vote", device="cpu").truth
    got = np.load(out / "truth.npy", mmap_mode="r")[z0:z1]
    return bool(np.array_equal(ref, got))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 1024, 1024))
    ap.add_argument("--chunk-voxels", type=int, default=1 << 23)
    ap.add_argument("--methods", nargs="+", default=["staple", "majority_vote", "mean"])
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the input and outputs")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    shape = tuple(args.shape)
    work = Path(args.dir or tempfile.mkdtemp(prefix="raterseg-big-"))
    work.mkdir(parents=True, exist_ok=True)
    stack = work / "raters.npy"
    t = time.perf_counter()
    write_stack(stack, shape)
    gen_s = time.perf_counter() - t
    voxels = int(np.prod(shape))
    print(f"input {stack} ({stack.stat().st_size / 2**30:.2f} GiB, {voxels / 1e6:.0f} M voxels) "
          f"written in {gen_s:.0f} s", flush=True)
    rows = []
    try:
        for m in args.methods:
            out = work / f"out-{m}"
            res = run_method(stack, out, m, args.chunk_voxels)
            size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
            ok = check_slab(stack, out, shape) if m == "majority_vote" else None
            rows.append({"method": m, **res, "outputs_gib": size, "slab_check": ok})
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                shutil.rmtree(out)
    finally:
        if not args.keep:
            stack.unlink(missing_ok=True)
    if args.no_docs:
        return 0
    lines = [
        "## Bounded memory: volumes bigger than RAM (issue 9)",
        "",
        ("`raterseg.fuse_chunked` / `raterseg fuse --chunked`. "
         f"Machine: {cpu_model()}, {os.cpu_count()} cores; load average at start "
         f"{os.getloadavg()[0]:.1f}. Measured {time.strftime('%Y-%m-%d')} with "
         f"`python benchmarks/big_volume.py`: one `.npy` rater stack of {R} × "
         f"{' × '.join(map(str, shape))} int8 ({voxels / 1e6:.0f} M voxels, "
         f"{R * voxels / 2**30:.2f} GiB), slabs of {args.chunk_voxels / 2**20:.0f} Mi voxels, "
         "each method in a fresh process; peak memory is the process's VmHWM "
         "(peak resident set, torch import included). The in-memory path would need the labels as int16 "
         f"({2 * R * voxels / 2**30:.1f} GiB) plus its outputs."),
        "",
        "| method | wall time | peak memory | outputs written | EM iterations | check |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        check = {True: "MV slab = in-memory", False: "MISMATCH", None: "—"}[r["slab_check"]]
        lines.append(f"| {r['method']} | {r['wall_s']:.0f} s | {r['peak_gib']:.2f} GiB | "
                     f"{r['outputs_gib']:.1f} GiB | {r['iterations'] or '—'} | {check} |")
    lines.append("")
    lines.append("Target (issue #9): peak memory under 4 GiB on this machine for 1024×1024×512 "
                 "with 5 raters. Results are identical to `raterseg.fuse` (tests/core/test_chunked.py).")
    replace_section("big_volume", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

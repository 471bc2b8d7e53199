"""Fusion on the simulated phantoms: the numbers README.md's "Which method when" cites.

Parts (``--parts``, all by default), every fuse with the method's defaults on the CPU:

* ``samples``: the 4-rater napari samples (``synth.sample_case(dims=2|3, num_raters=4)``,
  seed 0, 128×128 and 64×128×128; good, over, under, wrong) and the 5-rater
  ``raterseg demo`` phantom (``dims=3, num_raters=5``, 64×128×128): Dice of majority
  vote, STAPLE and spatial STAPLE against the known truth, and the wall time of one call
  (after one untimed warm-up call of each method; noisy, one torch thread).
* ``left_right``: the phantom of ``tests/core/test_spatial_staple.py`` where rater 0 is
  nearly perfect on the left half and over-segments by 6 voxels on the right (80×80,
  phantom seeds 0 and 1): majority vote, STAPLE, spatial STAPLE.
* ``cm_2d``: CM on the 2D sample (one 128×128 image, so one optimiser step per epoch)
  with ``epochs`` 40 (the default) and 160: Dice and each rater's sensitivity
  p(says 1 | true 1) from ``rater_confusion``, with the raters' true sensitivities.
* ``cm_3d``: the issue's check CM ≥ STAPLE: ``rs.fuse(method="cm")`` with the defaults
  (2D U-Net on the slices, 40 epochs, seed 0) on ``sample_case(dims=3, num_raters=4,
  shape=(32, 96, 96), seed=s)`` for s in ``--seeds``: Dice of CM, STAPLE and majority
  vote, and CM's foreground volume over the true one. ~1.5 min per seed on one thread.
  ``--cm-params '{"dominance_weight": 0}'`` runs CM with other parameters (stored as
  ``cm_3d {"dominance_weight": 0}``).

Writes a JSON (``--out``, default docs/phantoms_cpu.json; parts already there are kept)
after every part, so an interrupted run keeps what it finished; ``machine`` records the
CPU, threads, load and git commit of each invocation. The prose is in docs/BENCHMARKS.md, "Phantoms".

    python benchmarks/phantoms.py [--parts samples left_right cm_2d cm_3d] [--seeds 0 1 2]
                                  [--cm-params JSON] [--threads 1] [--out docs/phantoms_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from _common import ROOT, cpu_model

PARTS = ("samples", "left_right", "cm_2d", "cm_3d")
CLASSICAL = ("majority_vote", "staple", "spatial_staple")


def _dice(res, truth) -> float:
    from raterseg.metrics import dice

    return round(float(dice(res.truth, truth)), 4)


def _timed_fuse(raters, **kw):
    import raterseg as rs

    t0 = time.perf_counter()
    res = rs.fuse(raters, device="cpu", **kw)
    return res, time.perf_counter() - t0


def part_samples() -> dict:
    from raterseg import synth
    from raterseg.metrics import dice

    cases = {"napari 2d (4 raters, 128×128)": (2, 4, None),
             "napari 3d (4 raters, 64×128×128)": (3, 4, None),
             "raterseg demo (5 raters, 64×128×128)": (3, 5, None)}
    out = {}
    for label, (dims, nr, shape) in cases.items():
        _, raters, truth = synth.sample_case(dims=dims, num_raters=nr, seed=0, shape=shape)
        row = {"dims": dims, "raters": nr, "shape": list(truth.shape), "phantom_seed": 0,
               "rater_dice": [round(float(dice(r, truth)), 4) for r in raters]}
        for m in CLASSICAL:
            _timed_fuse(raters, method=m)  # warm-up
            res, sec = _timed_fuse(raters, method=m)
            row[m] = {"dice": _dice(res, truth), "seconds": round(sec, 4)}
        out[label] = row
        print(label, {m: row[m] for m in CLASSICAL}, flush=True)
    return out


def half_good_half_bad(seed: int, size: int = 80):
    """``synth.split_quality_case``, as tests/core/test_spatial_staple.py uses it."""
    from raterseg import synth

    return synth.split_quality_case(seed, size)


def part_left_right() -> dict:
    out = {}
    for seed in (0, 1):
        raters, truth = half_good_half_bad(seed)
        out[f"seed {seed}"] = {m: _dice(_timed_fuse(raters, method=m)[0], truth)
                               for m in CLASSICAL}
        print("left_right", seed, out[f"seed {seed}"], flush=True)
    return out


def _sensitivity(raters, truth) -> list[float]:
    fg = truth == 1
    return [round(float((r[fg] == 1).mean()), 4) for r in raters]


def part_cm_2d() -> dict:
    from raterseg import synth

    image, raters, truth = synth.sample_case(dims=2, num_raters=4, seed=0)
    out = {"case": "sample_case(dims=2, num_raters=4, seed=0), 128×128",
           "kinds": [synth.SAMPLE_KINDS[r % 5] for r in range(4)],
           "true_sensitivity": _sensitivity(raters, truth)}
    for epochs in (40, 160):
        res, sec = _timed_fuse(raters, image=image, method="cm", seed=0, epochs=epochs)
        out[f"epochs {epochs}"] = {
            "dice": _dice(res, truth),
            "sensitivity": [round(float(c[1, 1]), 4) for c in res.rater_confusion],
            "specificity": [round(float(c[0, 0]), 4) for c in res.rater_confusion],
            "seconds": round(sec, 1)}
        print("cm_2d", epochs, out[f"epochs {epochs}"], flush=True)
    return out


def part_cm_3d(seeds, cm_params: dict) -> dict:
    import raterseg as rs
    from raterseg import synth

    out = {"case": "sample_case(dims=3, num_raters=4, shape=(32, 96, 96), seed=s)",
           "cm_params": dataclasses.asdict(rs.get_method("cm").Config(**cm_params)),
           "cm_seed": 0}
    for s in seeds:
        image, raters, truth = synth.sample_case(dims=3, num_raters=4, shape=(32, 96, 96),
                                                 seed=s)
        cm, sec = _timed_fuse(raters, image=image, method="cm", seed=0, **cm_params)
        row = {"cm": _dice(cm, truth),
               "staple": _dice(_timed_fuse(raters, method="staple")[0], truth),
               "majority_vote": _dice(_timed_fuse(raters, method="majority_vote")[0], truth),
               "cm_fg_volume_over_true": round(float((cm.truth == 1).sum() / (truth == 1).sum()), 3),
               "cm_seconds": round(sec, 1)}
        out[f"seed {s}"] = row
        print("cm_3d", s, row, flush=True)
    return out


def _git_head() -> str:
    """The commit checked out, with '+changes' when src_core/ differs from it."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src_core"],
                               cwd=ROOT, check=False).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="phantom seeds of cm_3d (default 0 1 2)")
    ap.add_argument("--cm-params", type=json.loads, default={},
                    help="cm_3d only: parameters other than the defaults, as JSON; the part "
                         "is then stored as 'cm_3d <params>' (default: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "docs" / "phantoms_cpu.json"))
    args = ap.parse_args()

    import raterseg
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.out)
    result = json.loads(path.read_text()) if path.exists() else {}
    run = " ".join(args.parts) + (f" {json.dumps(args.cm_params)}" if args.cm_params else "")
    result.setdefault("machine", {})[run] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
        "torch": torch.__version__, "raterseg": raterseg.__version__, "git": _git_head(),
        "load_average": list(os.getloadavg())}
    for part in args.parts:
        if part == "cm_3d":
            key = f"cm_3d {json.dumps(args.cm_params)}" if args.cm_params else part
            result[key] = part_cm_3d(args.seeds, args.cm_params)
        else:
            result[part] = {"samples": part_samples, "left_right": part_left_right,
                            "cm_2d": part_cm_2d}[part]()
        path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

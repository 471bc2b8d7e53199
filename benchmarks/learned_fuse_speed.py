"""Time to ``fuse`` one 128×128×64 volume with 4 simulated raters, default parameters.

Also reports the training throughput (slices per second, counting every slice seen
in every epoch, validation excluded) and the Dice of the result against the
phantom's truth next to STAPLE's. Run once per device (``--out`` writes a JSON; the CPU
numbers in docs/BENCHMARKS.md were taken from the printed output, and no JSON of them
was kept; no GPU run yet):

    python benchmarks/learned_fuse_speed.py --device cpu --out docs/learned_fuse_speed_cpu.json
    python benchmarks/learned_fuse_speed.py --device cuda --out docs/learned_fuse_speed_gpu.json

On CUDA the engine trains with bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import raterseg as rs
from raterseg import metrics, synth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["cm"])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 128, 128], help="D H W")
    ap.add_argument("--raters", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per method (median)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="extra parameters k=v")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    params = dict(kv.split("=", 1) for kv in args.set)
    image, raters, truth = synth.sample_case(dims=3, num_raters=args.raters, seed=0,
                                             shape=tuple(args.shape))
    t0 = time.perf_counter()
    staple = rs.fuse(raters, method="staple")
    staple_s = time.perf_counter() - t0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    report = {
        "benchmark": "learned_fuse_speed", "shape": args.shape, "raters": args.raters,
        "device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "platform": platform.platform(), "processor": platform.processor(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "staple": {"seconds": staple_s, "dice": metrics.dice(staple.truth, truth)},
        "results": results,
    }
    failed = False
    for name in args.methods:
        times, runs = [], []
        try:
            for rep in range(args.repeats):
                stamps = []
                t0 = time.perf_counter()
                res = rs.fuse(raters, image=image, method=name, device=device, seed=rep,
                              progress=lambda e, s=stamps: s.append(time.perf_counter()), **params)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                total = time.perf_counter() - t0
                epochs = len(res.history)
                n_train = args.shape[0] * (1 - res.params["val_fraction"])
                train_s = stamps[-1] - t0 if stamps else total
                runs.append({"seconds": total, "epochs": epochs, "train_seconds": train_s,
                             "slices_per_second": n_train * epochs / train_s,
                             "dice": metrics.dice(res.truth, truth)})
                times.append(total)
                print(f"{name} run {rep}: {total:.1f} s, {epochs} epochs, "
                      f"{runs[-1]['slices_per_second']:.1f} slices/s, Dice {runs[-1]['dice']:.4f}",
                      file=sys.stderr, flush=True)
            results[name] = {"median_seconds": statistics.median(times), "runs": runs,
                             "params": res.params}
        except Exception as exc:  # noqa: BLE001 (one method failing must not lose the others)
            failed = True
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "runs": runs}
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        text = json.dumps(report, indent=1)
        if args.out:  # after every method, so a time limit keeps what finished
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

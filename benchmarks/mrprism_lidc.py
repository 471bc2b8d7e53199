"""MrPrism on LIDC-IDRI: soft Dice of ConP per recurrence (the paper's table 1, Rec0..)
against ``unet`` trained on the raters' mean mask with the same budget.

Slices of ../shared/data/lidc/lidc_dev.npz are split by patient (``split_by_patient``,
80 % train / 20 % test, the seed's split). ``mrprism`` (default 3 recurrences) and
``unet`` with ``target="mean"`` get the same backbone widths, epochs, batch size,
learning rate, early stopping and seed. On the test slices we report, as a mean over
slices, the soft Dice D^s (thresholds 0.1, 0.3, 0.5, 0.7, 0.9; ``raterseg.metrics.
soft_dice``) of the foreground probability against the mean of the 4 raters' masks:
for MrPrism of ConP after each recurrence (``recurrence_probabilities``), for the
U-Net of its output. A slice where both maps are empty at a threshold scores 1 there.

The issue's checks: D^s rises from recurrence 0 to recurrence 2, and MrPrism's final
D^s ≥ the U-Net's.

Full size (GPU):
    python benchmarks/mrprism_lidc.py --device cuda --epochs 30 --seeds 0 1 2 \
        --json docs/mrprism_lidc_gpu.json --markdown
Reduced (CPU), e.g.:
    python benchmarks/mrprism_lidc.py --device cpu --threads 1 --crop 64 --n-train 600 \
        --n-test 300 --epochs 6 --features 8 16 32 64 128 --json docs/mrprism_lidc_cpu.json

Needs ../shared/data/lidc/lidc_dev.npz.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import raterseg as rs
from _common import LIDC
from _common import load_lidc as load
from raterseg import metrics


def soft_dice_mean(prob_fg: np.ndarray, raters: np.ndarray) -> float:
    """Mean over slices of D^s(prob_fg, mean of the raters' foreground masks), in %."""
    mean = (raters == 1).mean(1)
    return 100 * float(np.mean([metrics.soft_dice(p, m) for p, m in zip(prob_fg, mean)]))


def run(seed: int, data, common: dict, mr_params: dict) -> dict:
    (xtr, ytr), (xte, yte) = data
    out: dict = {"seed": seed, "soft_dice": {}, "train_seconds": {}, "epochs_run": {}}

    def fit(name, method, **extra):
        t = time.perf_counter()
        m = rs.create(method, seed=seed, **common, **extra).fit(xtr, ytr)
        out["train_seconds"][name] = time.perf_counter() - t
        out["epochs_run"][name] = len(m.history_)
        print(f"  seed {seed} {name}: trained in {out['train_seconds'][name]:.0f} s, "
              f"{len(m.history_)} epochs", file=sys.stderr, flush=True)
        return m

    mr = fit("mrprism", "mrprism", **mr_params)
    rec = mr.recurrence_probabilities(xte)  # (N, T, L, H, W)
    for t in range(rec.shape[1]):
        out["soft_dice"][f"mrprism_rec{t}"] = soft_dice_mean(1 - rec[:, t, 0], yte)
    out["history_last"] = mr.history_[-1]
    un = fit("unet_mean", "unet", target="mean")
    out["soft_dice"]["unet_mean"] = soft_dice_mean(1 - un.predict(xte).probabilities[:, 0], yte)
    print(f"  seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in out["soft_dice"].items()),
          file=sys.stderr, flush=True)
    return out


def summarise(runs: list[dict]) -> dict:
    """Median over seeds of every score, and the issue's two checks (on the medians and per seed)."""
    keys = list(runs[0]["soft_dice"])
    table = {k: statistics.median(r["soft_dice"][k] for r in runs) for k in keys}
    recs = sorted(k for k in keys if k.startswith("mrprism_rec"))
    last = recs[-1]
    checks = {
        "rec2_minus_rec0": table["mrprism_rec2"] - table["mrprism_rec0"] if len(recs) >= 3 else None,
        "final_minus_unet_mean": table[last] - table["unet_mean"],
        "per_seed_rec2_minus_rec0": [r["soft_dice"]["mrprism_rec2"] - r["soft_dice"]["mrprism_rec0"]
                                     for r in runs] if len(recs) >= 3 else None,
        "per_seed_final_minus_unet_mean": [r["soft_dice"][last] - r["soft_dice"]["unet_mean"]
                                           for r in runs],
    }
    checks["rises_rec0_to_rec2"] = None if checks["rec2_minus_rec0"] is None else \
        checks["rec2_minus_rec0"] > 0
    checks["at_least_unet_mean"] = checks["final_minus_unet_mean"] >= 0
    return {"table": table, "checks": checks}


def markdown(summary: dict) -> str:
    lines = ["| model | soft Dice D^s vs mean of 4 raters (%) |", "|---|---|"]
    for k, v in summary["table"].items():
        name = (f"MrPrism ConP, recurrence {k.rsplit('rec', 1)[1]}" if k.startswith("mrprism")
                else "unet, mean target")
        lines.append(f"| {name} | {v:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=LIDC)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--crop", type=int, default=0, help="centre crop edge (0: full 128)")
    ap.add_argument("--n-train", type=int, default=None, help="training slices (default: all)")
    ap.add_argument("--n-test", type=int, default=None, help="test slices (default: all)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--recurrences", type=int, default=3)
    ap.add_argument("--mr-params", type=json.loads, default={},
                    help='extra mrprism parameters as JSON, e.g. \'{"shuffle_weight": 0.3}\'')
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--json", type=Path, default=None, help="write every number here")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        print(f"data not found: {args.data}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "patience": args.patience, "features": tuple(args.features), "device": args.device}
    mr_params = {"recurrences": args.recurrences, **args.mr_params}
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        data = load(args.data, args.crop, args.n_train, args.n_test, seed)
        print(f"seed {seed}: {len(data[0][0])} train / {len(data[1][0])} test slices of "
              f"{data[0][0].shape[1:]}", file=sys.stderr, flush=True)
        runs.append(run(seed, data, common, mr_params))
    summary = summarise(runs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "benchmark": "mrprism_lidc",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "device": device, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None},
        "wall_seconds": time.perf_counter() - t0,
        "runs": runs,
        **summary,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(summary["checks"], indent=2))
    if args.markdown:
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

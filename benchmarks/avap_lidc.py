"""AVAP vs U-Net baselines on LIDC-IDRI, in the style of Guo et al.'s table II (RIGA).

Rows: ``avap`` (its AVM consensus, and its APM estimate of each rater), ``unet`` trained
on the raters' mean mask (``target="mean"``, the paper's MV-UNet) and one ``unet`` per
rater trained on that rater alone (the paper's M1–M4). Every model gets the same
backbone widths, epochs, batch size, learning rate, early stopping and seed; AVAP's
epochs cover both of its training steps.

Columns, on held-out patients (``split_by_patient``), each a mean over test slices:

- ``A1..AR``: hard Dice (threshold 0.5) of the model's prediction against rater r —
  for AVAP's APM row, of its rater-r estimate; for the other rows, of their one map;
- ``Average``: mean of the A columns (AVAP APM: each estimate against its own rater);
- ``Mean Voting``: soft Dice (thresholds 0.1, 0.3, 0.5, 0.7, 0.9) of the predicted
  foreground probability against the raters' mean mask.

A slice where prediction and target are both empty scores 1 (``raterseg.metrics``).
The issue's claims: AVAP's Mean Voting ≥ that of ``unet`` on the mean target, and
AVAP's APM Average ≥ 1 point above every M_r row's Average.

Full size (GPU):
    python benchmarks/avap_lidc.py --device cuda --epochs 30 --seeds 0 1 2 --json docs/avap_lidc_gpu.json
Reduced (CPU), one JSON per seed (docs/avap_lidc_cpu_seed{0,1,2}.json; variants in
docs/BENCHMARKS.md, "AVAP on LIDC"):
    python benchmarks/avap_lidc.py --device cpu --threads 1 --crop 64 --n-train 800 --n-test 300 \
        --epochs 8 --patience 0 --features 8 16 32 64 128 --seeds 0 \
        --json docs/avap_lidc_cpu_seed0.json

``--markdown`` prints the table for docs/BENCHMARKS.md. Needs ../shared/data/lidc.
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


def hard_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over slices of Dice(pred, target); pred, target bool/int (N, H, W)."""
    return float(np.mean([metrics.dice(p.astype(np.int16), t) for p, t in zip(pred, target)]))


def mean_voting(prob: np.ndarray, raters: np.ndarray) -> float:
    """Mean over slices of the soft Dice of prob (N, H, W) against the raters' mean mask."""
    mean = (raters == 1).mean(1)
    return float(np.mean([metrics.soft_dice(p, m) for p, m in zip(prob, mean)]))


def row(maps: list[np.ndarray] | np.ndarray, prob: np.ndarray | None, raters: np.ndarray) -> dict:
    """Scores of one row: ``maps`` one foreground-probability map (N, H, W) for every rater
    column, or a list of R maps (one per rater: AVAP's APM)."""
    R = raters.shape[1]
    per = [maps[r] if isinstance(maps, list) else maps for r in range(R)]
    out = {f"A{r + 1}": 100 * hard_dice(per[r] > 0.5, raters[:, r]) for r in range(R)}
    out["Average"] = float(np.mean([out[f"A{r + 1}"] for r in range(R)]))
    if prob is not None:
        out["Mean Voting"] = 100 * mean_voting(prob, raters)
        # the same over all test pixels at once: per slice, a model that predicts nothing
        # scores 1 at every threshold no slice's mean mask reaches
        out["Mean Voting (pooled)"] = 100 * metrics.soft_dice(prob.ravel(),
                                                              (raters == 1).mean(1).ravel())
    return out


def run(seed: int, data, common: dict, avap_params: dict, raters_only: list[int] | None,
        on_progress=None, rows_wanted: tuple[str, ...] = ("avap", "unet_mean", "M")) -> dict:
    """Train and score every row for one seed; ``on_progress(partial)`` after each model."""
    (xtr, ytr), (xte, yte) = data
    R = ytr.shape[1]
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def fit(name, method, labels, **extra):
        t = time.perf_counter()
        m = rs.create(method, seed=seed, **{**common, **extra}).fit(xtr, labels)
        seconds[name] = time.perf_counter() - t
        print(f"  seed {seed} {name}: trained in {seconds[name]:.0f} s, "
              f"{len(m.history_)} epochs", file=sys.stderr, flush=True)
        return m.predict(xte)

    def progress():
        if on_progress is not None:
            on_progress({"seed": seed, "rows": dict(rows), "train_seconds": dict(seconds)})

    if "avap" in rows_wanted:
        res = fit("avap", "avap", ytr, **avap_params)
        est = [res.rater_estimates[:, r, 1] for r in range(R)]
        rows["AVAP: APM estimates; AVM for Mean Voting"] = row(est, res.probabilities[:, 1], yte)
        rows["AVAP (AVM consensus)"] = row(res.probabilities[:, 1], res.probabilities[:, 1], yte)
        progress()
    if "unet_mean" in rows_wanted:
        res = fit("unet_mean", "unet", ytr, target="mean")
        rows["unet, mean target (MV-UNet)"] = row(res.probabilities[:, 1], res.probabilities[:, 1],
                                                  yte)
        progress()
    for r in (raters_only if raters_only is not None else range(R)) if "M" in rows_wanted else ():
        res = fit(f"M{r + 1}", "unet", ytr[:, r:r + 1], target="mv")
        rows[f"M{r + 1}: unet on rater {r + 1} alone"] = row(res.probabilities[:, 1],
                                                             res.probabilities[:, 1], yte)
        progress()
    return {"seed": seed, "rows": rows, "train_seconds": seconds}


def summarise(runs: list[dict]) -> dict:
    """Median over seeds of every number, and the issue's two checks."""
    names = list(runs[0]["rows"])
    table = {n: {k: statistics.median(r["rows"][n][k] for r in runs) for k in runs[0]["rows"][n]}
             for n in names}
    apm = table.get("AVAP: APM estimates; AVM for Mean Voting")
    m_rows = {n: v for n, v in table.items() if n.startswith("M")}
    diag = [v[f"A{n.split(':')[0][1:]}"] for n, v in m_rows.items()]
    if apm is None or "unet, mean target (MV-UNet)" not in table:
        return {"table": table, "checks": {}}
    checks = {
        "mean_voting_avap_minus_unet_mean": apm["Mean Voting"]
        - table["unet, mean target (MV-UNet)"]["Mean Voting"],
        "average_apm_minus_best_M_row": apm["Average"] - max(v["Average"] for v in m_rows.values())
        if m_rows else None,
        "average_apm_minus_own_rater_models": apm["Average"] - float(np.mean(diag)) if diag else None,
    }
    checks["mean_voting_ok"] = checks["mean_voting_avap_minus_unet_mean"] >= 0
    if m_rows:
        checks["average_ok"] = checks["average_apm_minus_best_M_row"] >= 1.0
    return {"table": table, "checks": checks}


def markdown(summary: dict, R: int) -> str:
    cols = [f"A{r + 1}" for r in range(R)] + ["Average", "Mean Voting", "Mean Voting (pooled)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, v in summary["table"].items():
        cells = [f"{v[c]:.2f}" if c in v else "—" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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
    ap.add_argument("--backbone", default="unet", choices=("unet", "resnet34"),
                    help="AVAP's backbone (the baselines always use the shared U-Net)")
    ap.add_argument("--apm-raters", default="one", choices=("one", "all"))
    ap.add_argument("--apm-fraction", type=float, default=0.5)
    ap.add_argument("--avap-epochs", type=int, default=None,
                    help="AVAP's epochs, both steps together (default: --epochs). E.g. twice "
                         "--epochs with --apm-fraction 0.5 gives step 1 (backbone + AVM) the "
                         "U-Nets' epochs and trains the APM on top")
    ap.add_argument("--raters-only", type=int, nargs="*", default=None,
                    help="train M_r only for these 0-based raters (default: all)")
    ap.add_argument("--rows", nargs="+", default=["avap", "unet_mean", "M"],
                    choices=("avap", "unet_mean", "M"), help="which models to train")
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
    avap_params = {"backbone": args.backbone, "apm_raters": args.apm_raters,
                   "apm_fraction": args.apm_fraction}
    if args.avap_epochs is not None:
        avap_params["epochs"] = args.avap_epochs
    t0 = time.perf_counter()
    runs = []
    jargs = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}

    def save_partial(partial: dict) -> None:  # a run cut short still leaves its numbers
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"args": jargs, "partial": True,
                                             "wall_seconds": time.perf_counter() - t0,
                                             "runs": runs + [partial]}, indent=2))

    for seed in args.seeds:
        data = load(args.data, args.crop, args.n_train, args.n_test, seed)
        print(f"seed {seed}: {len(data[0][0])} train / {len(data[1][0])} test slices of "
              f"{data[0][0].shape[1:]}", file=sys.stderr, flush=True)
        runs.append(run(seed, data, common, avap_params, args.raters_only, save_partial,
                        tuple(args.rows)))
    first = next(iter(runs[0]["rows"].values()))
    R = sum(1 for k in first if k.startswith("A") and k[1:].isdigit())
    summary = summarise(runs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "args": jargs,
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
        print(markdown(summary, R))
    return 0


if __name__ == "__main__":
    sys.exit(main())

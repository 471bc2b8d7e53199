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
D^s ≥ the U-Net's. Each seed's JSON also holds ``probe`` (see :func:`probe`): how much
the trained ConP's output changes when the confidences are one-hot on a rater instead of
equal, and the confidences of each recurrence.

Full size (GPU):
    python benchmarks/mrprism_lidc.py --device cuda --epochs 30 --seeds 0 1 2 \
        --json docs/mrprism_lidc_gpu.json --markdown
Reduced (CPU), e.g. (docs/mrprism_lidc_cpu_e20_n300_s0.json; the other runs' commands
are in docs/BENCHMARKS.md, "MrPrism on LIDC-IDRI"):
    python benchmarks/mrprism_lidc.py --device cpu --threads 1 --crop 64 --n-train 300 \
        --n-test 150 --epochs 20 --features 8 16 32 64 128 --seeds 0 \
        --json docs/mrprism_lidc_cpu_e20_n300_s0.json

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


def probe(mr, xte: np.ndarray, yte: np.ndarray) -> dict:
    """How much the trained ConP depends on the confidences, and how they evolve.

    ``swap``: ConP (on the test slices' encoder features) given confidences one-hot on
    rater r instead of equal (1/R): mean and max |Δ p(foreground)| per rater, and the
    soft Dice of the one-hot output against rater r's own mask next to the equal one's.
    ``recurrences``: per recurrence t, the mean |P^t − P^(t−1)| of ConP's foreground and
    the confidences ``w^(t+1)`` (from DivP's maps) on voxels some rater marked: mean per
    rater and the mean over those voxels of their spread (sd) over the raters.
    """
    import torch
    from raterseg import train
    from raterseg.nn.mrprism_net import confidences

    net = mr.network_.eval()
    R, L, T = yte.shape[1], mr.num_classes, mr.config.recurrences
    x = torch.from_numpy(train.zscore(xte[:, None].astype(np.float32)))
    fg_any = torch.from_numpy((yte == 1).any(1))
    out: dict = {"swap": {}, "recurrences": []}
    with torch.no_grad():
        u = net.unet
        enc = [u.conv_0(x)]
        for down in (u.down_1, u.down_2, u.down_3, u.down_4):
            enc.append(down(enc[-1]))
        enc = tuple(enc)
        shape = (x.shape[0], R, L, *x.shape[2:])
        base = torch.softmax(net.conp(enc, torch.full(shape, 1.0 / R)), 1)[:, 1:].sum(1)
        for r in range(R):
            w = torch.zeros(shape)
            w[:, r] = 1.0
            fg = torch.softmax(net.conp(enc, w), 1)[:, 1:].sum(1)
            d = (fg - base).abs()
            own = (yte[:, r] == 1).astype(np.float32)
            out["swap"][f"onehot{r}"] = {
                "mean_abs_dp": float(d.mean()), "max_abs_dp": float(d.max()),
                "soft_dice_vs_rater": 100 * float(np.mean([metrics.soft_dice(a, b) for a, b in
                                                           zip(fg.numpy(), own)])),
                "equal_soft_dice_vs_rater": 100 * float(np.mean([metrics.soft_dice(a, b) for a, b
                                                                 in zip(base.numpy(), own)]))}
        o = net(x)
        conp = torch.softmax(o["conp"].unflatten(1, (T, L)), 2)[:, :, 1:].sum(2)
        divp = torch.softmax(o["divp"].unflatten(1, (T, R, L)), 3)
        for t in range(T):
            w = confidences(divp[:, t])[:, :, 1:].sum(2) / max(L - 1, 1)  # (N, R, *S)
            on = fg_any.unsqueeze(1).expand_as(w)
            rec = {"next_confidence_mean_per_rater": [float(w[:, r][fg_any].mean()) for r in range(R)],
                   "next_confidence_sd_over_raters": float(w.std(1)[fg_any].mean()) if on.any() else None}
            if t:
                rec["mean_abs_change_from_previous"] = float((conp[:, t] - conp[:, t - 1]).abs().mean())
            out["recurrences"].append(rec)
    return out


def run(seed: int, data, common: dict, mr_params: dict, unet: bool = True) -> dict:
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
    out["probe"] = probe(mr, xte, yte)
    sw = out["probe"]["swap"]
    print(f"  seed {seed}: ConP |Δp| one-hot vs equal confidences, max over raters: "
          f"{max(v['max_abs_dp'] for v in sw.values()):.4f} (mean "
          f"{max(v['mean_abs_dp'] for v in sw.values()):.5f})", file=sys.stderr, flush=True)
    if unet:
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
    has_unet = "unet_mean" in table
    checks = {
        "rec2_minus_rec0": table["mrprism_rec2"] - table["mrprism_rec0"] if len(recs) >= 3 else None,
        "final_minus_unet_mean": table[last] - table["unet_mean"] if has_unet else None,
        "per_seed_rec2_minus_rec0": [r["soft_dice"]["mrprism_rec2"] - r["soft_dice"]["mrprism_rec0"]
                                     for r in runs] if len(recs) >= 3 else None,
        "per_seed_final_minus_unet_mean": [r["soft_dice"][last] - r["soft_dice"]["unet_mean"]
                                           for r in runs] if has_unet else None,
        "per_seed_max_abs_dp_onehot_vs_equal": [
            max(v["max_abs_dp"] for v in r["probe"]["swap"].values()) for r in runs],
    }
    checks["rises_rec0_to_rec2"] = None if checks["rec2_minus_rec0"] is None else \
        checks["rec2_minus_rec0"] > 0
    checks["at_least_unet_mean"] = None if not has_unet else checks["final_minus_unet_mean"] >= 0
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
    ap.add_argument("--no-unet", action="store_true", help="skip the U-Net baseline")
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
        runs.append(run(seed, data, common, mr_params, unet=not args.no_unet))
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

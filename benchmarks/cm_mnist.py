"""CM vs U-Net baselines on MNIST with the CM paper's five simulated annotators.

Zhang et al. 2020, tables 1-2: digits thresholded at 0.5 are the truth; five
annotators (good, over, under, wrong, blank; ``raterseg.synth`` defaults) label every
training digit ("dense") or one random annotator per digit ("single"). Every
method trains on the same digits with the same backbone, epochs and seed, then
segments held-out digits; we report the mean Dice against the true masks and, for
CM, the RMSE between its estimated global confusion matrices and the empirical
ones of the annotators on the held-out digits.

    python benchmarks/cm_mnist.py --n-train 2000 --n-test 1000 --epochs 20 --seeds 0 1 2 \
        --device cpu --out docs/cm_mnist_cpu.json

The JSON holds every number and the arguments; ``--markdown`` prints the table for
docs/BENCHMARKS.md. Needs ../shared/data/mnist (the MNIST test set).
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
from raterseg import metrics, synth
from raterseg.methods._base import empirical_confusion

KINDS = ("good", "over", "under", "wrong", "blank")
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
PAPER = {"dense": {"cm": 82.92, "unet_staple": 78.03, "unet_mv": 62.89},
         "single": {"cm": 76.48, "unet_sample": 32.79}}


def make_data(n_train: int, n_test: int, seed: int, mnist: Path = MNIST,
              strength: list | None = None):
    """Images (N, 28, 28), truth (N, 28, 28) and raters (N, 5, 28, 28) for train and test.

    ``strength``: one value per annotator of :data:`KINDS` (None: ``synth`` defaults)."""
    images, truth = synth.load_mnist(mnist, n=n_train + n_test)
    raters = np.stack([synth.simulate_raters(t, KINDS, strength=strength, seed=seed * 100003 + i)
                       for i, t in enumerate(truth)])
    return (images[:n_train], truth[:n_train], raters[:n_train],
            images[n_train:], truth[n_train:], raters[n_train:])


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([metrics.dice(p, t) for p, t in zip(pred, truth)]))


def true_confusion(raters: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Empirical (R, 2, 2) confusion of the annotators over a set of digits."""
    onehot = np.stack([truth == 0, truth == 1]).astype(np.float32)  # (2, N, H, W)
    return empirical_confusion(np.moveaxis(raters, 1, 0), onehot)


def run(setting: str, seed: int, n_train: int, n_test: int, device: str | None,
        methods: list[str], cm_params: dict | None = None, strength: list | None = None,
        **params) -> dict:
    tr_img, _tr_truth, tr_raters, te_img, te_truth, te_raters = make_data(
        n_train, n_test, seed, strength=strength)
    if setting == "single":
        tr_raters = synth.drop_raters(tr_raters, mode="one_per_case", seed=seed, batched=True)
    out: dict = {"setting": setting, "seed": seed, "results": {}}
    rater_dice = [mean_dice(te_raters[:, r], te_truth) for r in range(len(KINDS))]
    out["rater_dice_test"] = dict(zip(KINDS, rater_dice))
    for name in methods:
        method, _, target = name.partition("_")
        kw = dict(params)
        if target:
            kw["target"] = target
        if method == "cm":
            kw.update(cm_params or {})
        model = rs.create(method, num_classes=2, device=device, seed=seed, **kw)
        t0 = time.perf_counter()
        model.fit(tr_img, tr_raters)
        fit_s = time.perf_counter() - t0
        res = model.predict(te_img)
        entry = {"dice": 100 * mean_dice(res.truth, te_truth), "fit_seconds": fit_s,
                 "epochs_run": len(model.history_)}
        if method == "cm":
            entry["cm_rmse"] = metrics.cm_rmse(res.rater_confusion,
                                               true_confusion(te_raters, te_truth))
            entry["rater_confusion"] = res.rater_confusion.round(4).tolist()
        out["results"][name] = entry
        print(f"[{setting} seed {seed}] {name}: Dice {entry['dice']:.2f} "
              f"({fit_s:.0f} s, {entry['epochs_run']} epochs)"
              + (f", CM RMSE {entry['cm_rmse']:.4f}" if "cm_rmse" in entry else ""),
              file=sys.stderr, flush=True)
    return out


def summarise(runs: list[dict]) -> dict:
    table: dict = {}
    for r in runs:
        for name, e in r["results"].items():
            table.setdefault(r["setting"], {}).setdefault(name, []).append(e)
    summary = {}
    for setting, by_method in table.items():
        summary[setting] = {}
        for name, entries in by_method.items():
            d = [e["dice"] for e in entries]
            s = {"dice_mean": statistics.fmean(d),
                 "dice_sd": statistics.stdev(d) if len(d) > 1 else 0.0, "n_seeds": len(d)}
            if "cm_rmse" in entries[0]:
                s["cm_rmse_mean"] = statistics.fmean(e["cm_rmse"] for e in entries)
            summary[setting][name] = s
    return summary


def markdown(summary: dict, args: dict) -> str:
    lines = ["| setting | method | Dice % (mean ± sd) | CM RMSE | paper Dice % |",
             "| --- | --- | --- | --- | --- |"]
    for setting, by_method in summary.items():
        for name, s in by_method.items():
            rmse = f"{s['cm_rmse_mean']:.4f}" if "cm_rmse_mean" in s else "–"
            paper = PAPER.get(setting, {}).get(name, "–")
            lines.append(f"| {setting} | {name} | {s['dice_mean']:.2f} ± {s['dice_sd']:.2f} "
                         f"| {rmse} | {paper} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--features", type=str, default="16,32,64,128,256")
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=["dense", "single"],
                    choices=["dense", "single"])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of cm, unet_staple, unet_mv, unet_sample (default: all)")
    ap.add_argument("--cm-params", type=json.loads, default={},
                    help='extra CM parameters as JSON, e.g. \'{"trace_weight": 0.3}\'')
    ap.add_argument("--strength", type=json.loads, default=None,
                    help="annotator strengths as a JSON list in the order good, over, under, "
                         "wrong, blank (null: the synth default), e.g. '[0.5, 1.5, 1, 1.5, null]'")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for every number")
    ap.add_argument("--markdown", action="store_true", help="print the summary table")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not MNIST.is_dir():
        print(f"MNIST not found at {MNIST}", file=sys.stderr)
        return 1
    params = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "features": tuple(int(v) for v in args.features.split(",")),
                  "patience": args.patience}
    method_sets = {"dense": ["cm", "unet_staple", "unet_mv"], "single": ["cm", "unet_sample"]}
    runs = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for setting in args.settings:
            names = [m for m in method_sets[setting] if not args.methods or m in args.methods]
            runs.append(run(setting, seed, args.n_train, args.n_test, args.device, names,
                            cm_params=args.cm_params, strength=args.strength, **params))
    summary = summarise(runs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "cm_mnist", "args": {**vars(args), "out": str(args.out)},
              "params": {**params, "features": list(params["features"])},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "device": device, "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                          "threads": torch.get_num_threads()},
              "total_seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.markdown or not args.out:
        print(markdown(summary, vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

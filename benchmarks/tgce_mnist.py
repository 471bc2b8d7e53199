"""TGCE vs a U-Net on the majority vote, on MNIST with five simulated raters.

The CM paper's set-up (Zhang et al. 2020, appendix A.1; ``raterseg.synth`` defaults):
digits thresholded at 0.5 are the truth; five raters (good, over, under, wrong, blank)
label every training digit ("dense") or one random rater per digit ("single"). TGCE
and ``unet`` with ``target="mv"`` train on the same digits with the same backbone,
epochs, learning rate and seed, then segment held-out digits. Reported per run:

- Dice (%) of the predicted truth against the true masks (mean over digits);
- TGCE's mean Λ_r on the true foreground and on the true background of the held-out
  digits, per rater (the issue asks blank < 0.3 and good > 0.7 on the foreground);
- the Dice of TGCE's prediction against each rater's masks (which raters it follows);
- the RMSE between TGCE's ``rater_confusion`` and the raters' empirical confusion;
- on the *ring*, the held-out pixels outside the true digit within 2 px of it (Euclidean
  distance ≤ 2, where the over rater's 2 px dilation adds foreground): the mean foreground
  probability f, the fraction predicted foreground, the fraction each rater labels
  foreground and, for TGCE, the mean Λ_r per rater;
- the best validation epoch (the one kept) and the fit time (seconds, wall clock, on the
  machine named in the JSON).

``--variants`` runs an ablation instead of ``--methods``: ``pixel``, ``image``, ``global``
(TGCE with that ``reliability``), ``none`` (TGCE with ``reliability="none"``: Λ ≡ 1, plain
GCE on every rater), ``literal_ek`` (TGCE with pixel Λ and eq. 2-6's first term read
literally as a mean over the classes, ``(1 − f_y^q)/(q·L)``, instead of eq. 2-1's GCE; an
ablation only, defined here, not an option of the method) and ``unet_mv`` (or any
``unet_<target>``). Results are keyed ``tgce_pixel``, ``tgce_none``, … and ``unet_mv``. The diagnosis table in docs/BENCHMARKS.md:

    python benchmarks/tgce_mnist.py --variants pixel none unet_mv --epochs 8 --seeds 0 \
        --device cpu --threads 1 --out docs/tgce_mnist_ablation_e8_s0.json   # seeds 1, 2; 15 epochs

    python benchmarks/tgce_mnist.py --n-train 200 --n-test 200 --epochs 15 --seeds 0 1 2 \
        --device cpu --threads 1 --out docs/tgce_mnist_cpu.json --markdown

Seeds can run as separate processes and be merged afterwards:
``--merge a.json b.json --out all.json --markdown``.

Needs ../shared/data/mnist (the MNIST test set).
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
from scipy import ndimage as ndi

KINDS = ("good", "over", "under", "wrong", "blank")
MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def make_data(n_train: int, n_test: int, seed: int, mnist: Path = MNIST,
              good_strength: float | None = None):
    """Images (N, 28, 28), truth (N, 28, 28) and raters (N, 5, 28, 28) for train and test;
    ``good_strength``: the good rater's boundary noise (None: the synth default)."""
    images, truth = synth.load_mnist(mnist, n=n_train + n_test)
    strength = [good_strength, None, None, None, None]
    raters = np.stack([synth.simulate_raters(t, KINDS, strength, seed=seed * 100003 + i)
                       for i, t in enumerate(truth)])
    return (images[:n_train], truth[:n_train], raters[:n_train],
            images[n_train:], truth[n_train:], raters[n_train:])


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([metrics.dice(p, t) for p, t in zip(pred, truth)]))


RING_PX = 2.0
VARIANTS = ("pixel", "image", "global", "none")


def literal_ek_tgce(**kwargs):
    """TGCE (pixel Λ) whose loss takes eq. 2-6's ``E_k`` literally: the GCE term is divided
    by L, ``Λ (1 − f_y^q)/(q L) + (1 − Λ)(1 − L^{-q})/q``, averaged like eq. 2-7. The method
    uses eq. 2-1's sum over classes (see raterseg.nn.tgce_loss); this is the ablation."""
    import torch
    from raterseg.methods.tgce import TruncatedGCE
    from raterseg.nn.tgce_loss import gce_per_pixel, uniform_gce

    class LiteralEk(TruncatedGCE):
        def loss(self, outputs, raters, annotated, state):
            seg = outputs["seg"]
            L = seg.shape[1]
            lam = self._reliability(outputs)
            per = lam * gce_per_pixel(seg, raters, self.config.q) / L \
                + (1.0 - lam) * uniform_gce(L, self.config.q)
            per = torch.where(annotated, per, torch.zeros((), dtype=per.dtype, device=per.device))
            b = per.shape[0]
            count = annotated.reshape(b, -1).sum(1).to(per.dtype)
            per_image = per.reshape(b, -1).sum(1) / count.clamp_min(1.0)
            has = count > 0
            return per_image[has].sum() / has.sum().clamp_min(1), {}

    return LiteralEk(**kwargs)


def ring_mask(truth: np.ndarray, width: float = RING_PX) -> np.ndarray:
    """Pixels outside each image's foreground within Euclidean distance ``width`` of it:
    truth (N, H, W) → bool (N, H, W)."""
    out = np.zeros(truth.shape, bool)
    for n, t in enumerate(truth):
        bg = t == 0
        if bg.all():
            continue
        out[n] = bg & (ndi.distance_transform_edt(bg) <= width)
    return out


def plan(methods: list[str], variants: list[str] | None, tgce_params: dict) -> list[tuple[str, str, dict]]:
    """``(result name, method, extra parameters)`` per model to train."""
    out = []
    if variants is None:
        for name in methods:
            method, _, target = name.partition("_")
            kw = {"target": target} if target else {}
            if method == "tgce":
                kw.update(tgce_params)
            out.append((name, method, kw))
        return out
    for v in variants:
        if v in VARIANTS:
            out.append((f"tgce_{v}", "tgce", {**tgce_params, "reliability": v}))
        elif v == "literal_ek":
            out.append(("tgce_literal_ek", "tgce_literal_ek", {**tgce_params, "reliability": "pixel"}))
        elif v.startswith("unet_"):
            out.append((v, "unet", {"target": v[len("unet_"):]}))
        else:
            raise SystemExit(f"--variants: unknown {v!r} (expected {', '.join(VARIANTS)}, "
                             "literal_ek or unet_<target>)")
    return out


def accuracy_data(n_train: int, n_test: int, seed: int):
    """As :func:`make_data`, but the digits of ``benchmarks/accuracy.py``: a random subset
    of the MNIST test set per seed (``_common.load_mnist_raters``), same rater seeding."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as C

    d = C.load_mnist_raters(n_train, n_test, seed, kinds=KINDS, path=MNIST)
    return d["x_train"], d["t_train"], d["y_train"], d["x_test"], d["t_test"], d["y_test"]


def run(setting: str, seed: int, n_train: int, n_test: int, device: str | None,
        methods: list[str], tgce_params: dict, good_strength: float | None = None,
        variants: list[str] | None = None, digits: str = "first", **params) -> dict:
    if digits == "accuracy":
        if good_strength is not None:
            raise SystemExit("--good-strength: not available with --digits accuracy")
        data = accuracy_data(n_train, n_test, seed)
    else:
        data = make_data(n_train, n_test, seed, good_strength=good_strength)
    tr_img, _, tr_raters, te_img, te_truth, te_raters = data
    if setting == "single":
        tr_raters = synth.drop_raters(tr_raters, mode="one_per_case", seed=seed, batched=True)
    out: dict = {"setting": setting, "seed": seed, "results": {}}
    out["rater_dice_test"] = {k: 100 * mean_dice(te_raters[:, r], te_truth) for r, k in enumerate(KINDS)}
    fg = te_truth.astype(bool)
    ring = ring_mask(te_truth)
    out["ring_pixels"] = int(ring.sum())
    out["rater_fg_on_ring"] = {k: float((te_raters[:, r][ring] == 1).mean()) for r, k in enumerate(KINDS)}
    for name, method, extra in plan(methods, variants, tgce_params):
        if method == "tgce_literal_ek":
            model = literal_ek_tgce(num_classes=2, num_raters=None, device=device, seed=seed,
                                    **params, **extra)
        else:
            model = rs.create(method, num_classes=2, device=device, seed=seed, **params, **extra)
        t0 = time.perf_counter()
        model.fit(tr_img, tr_raters)
        fit_s = time.perf_counter() - t0
        res = model.predict(te_img)
        entry = {"dice": 100 * mean_dice(res.truth, te_truth), "fit_seconds": fit_s,
                 "epochs_run": len(model.history_)}
        val = [h.get("val_loss") for h in model.history_]
        if val and None not in val:
            entry["best_epoch"] = int(np.argmin(val)) + 1
        f = res.probabilities[:, 1]
        entry["ring_f_mean"] = float(f[ring].mean())
        entry["ring_fg_fraction"] = float((res.truth[ring] == 1).mean())
        msg = (f"[{setting} seed {seed}] {name}: Dice {entry['dice']:.2f} ({fit_s:.0f} s), "
               f"ring f {entry['ring_f_mean']:.2f}, fg {entry['ring_fg_fraction']:.2f}")
        if method.startswith("tgce"):
            lam = res.rater_maps  # (N, R, H, W)
            entry["lambda_fg"] = {k: float(lam[:, r][fg].mean()) for r, k in enumerate(KINDS)}
            entry["lambda_bg"] = {k: float(lam[:, r][~fg].mean()) for r, k in enumerate(KINDS)}
            # where each rater's label is wrong / right on the held-out digits
            wrong = te_raters != te_truth[:, None]
            entry["lambda_rater_wrong"] = {k: float(lam[:, r][wrong[:, r]].mean()) if wrong[:, r].any()
                                           else float("nan") for r, k in enumerate(KINDS)}
            entry["lambda_rater_right"] = {k: float(lam[:, r][~wrong[:, r]].mean())
                                           for r, k in enumerate(KINDS)}
            entry["dice_vs_rater"] = {k: 100 * mean_dice(res.truth, te_raters[:, r])
                                      for r, k in enumerate(KINDS)}
            onehot = np.stack([te_truth == 0, te_truth == 1]).astype(np.float32)
            true_cm = empirical_confusion(np.moveaxis(te_raters, 1, 0), onehot)
            entry["cm_rmse"] = metrics.cm_rmse(res.rater_confusion, true_cm)
            entry["rater_confusion"] = res.rater_confusion.round(4).tolist()
            entry["lambda_ring"] = {k: float(lam[:, r][ring].mean()) for r, k in enumerate(KINDS)}
            msg += " Λ ring " + " ".join(f"{k} {v:.2f}" for k, v in entry["lambda_ring"].items())
            msg += " Λ fg " + " ".join(f"{k} {v:.2f}" for k, v in entry["lambda_fg"].items())
        out["results"][name] = entry
        print(msg, file=sys.stderr, flush=True)
    return out


def summarise(runs: list[dict]) -> dict:
    table: dict = {}
    for r in runs:
        for name, e in r["results"].items():
            table.setdefault(r["setting"], {}).setdefault(name, []).append(e)
    summary: dict = {}
    for setting, by_method in table.items():
        summary[setting] = {}
        for name, entries in by_method.items():
            d = [e["dice"] for e in entries]
            s = {"dice_mean": statistics.fmean(d), "dice_sd": statistics.stdev(d) if len(d) > 1 else 0.0,
                 "dice_per_seed": d, "n_seeds": len(d),
                 "fit_seconds_median": statistics.median(e["fit_seconds"] for e in entries)}
            for key in ("ring_f_mean", "ring_fg_fraction"):  # absent from older JSON files
                if all(key in e for e in entries):
                    s[key + "_per_seed"] = [e[key] for e in entries]
            if "lambda_fg" in entries[0]:
                keys = ["lambda_fg", "lambda_bg", "lambda_rater_wrong", "lambda_rater_right",
                        "dice_vs_rater"]
                if all("lambda_ring" in e for e in entries):
                    keys.append("lambda_ring")
                for key in keys:
                    s[key] = {k: statistics.fmean(e[key][k] for e in entries) for k in KINDS}
                s["cm_rmse_mean"] = statistics.fmean(e["cm_rmse"] for e in entries)
            summary[setting][name] = s
    return summary


def markdown(summary: dict) -> str:
    lines = [("| setting | method | Dice % (mean ± sd) | per seed | ring f (per seed) "
              "| ring predicted fg (per seed) | fit s (median) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for setting, by_method in summary.items():
        for name, s in by_method.items():
            per = ", ".join(f"{v:.1f}" for v in s["dice_per_seed"])
            ring = [", ".join(f"{v:.2f}" for v in s[k]) if k in s else "–"
                    for k in ("ring_f_mean_per_seed", "ring_fg_fraction_per_seed")]
            lines.append(f"| {setting} | {name} | {s['dice_mean']:.2f} ± {s['dice_sd']:.2f} | {per} "
                         f"| {ring[0]} | {ring[1]} | {s['fit_seconds_median']:.0f} |")
    lines += ["", "| setting | TGCE, mean over held-out digits | " + " | ".join(KINDS) + " |",
              "| --- | --- | " + " | ".join("---" for _ in KINDS) + " |"]
    for setting, by_method in summary.items():
        for name, s in by_method.items():
            if "lambda_fg" not in s:
                continue
            tag = setting if name == "tgce" else f"{setting}, {name}"
            for key, label in (("lambda_fg", "Λ on true foreground"), ("lambda_bg", "Λ on true background"),
                               ("lambda_ring", "Λ on the 2 px ring outside the digit"),
                               ("lambda_rater_wrong", "Λ where the rater is wrong"),
                               ("lambda_rater_right", "Λ where the rater is right"),
                               ("dice_vs_rater", "Dice % of prediction vs rater")):
                if key in s:
                    lines.append(f"| {tag} | {label} | " + " | ".join(f"{s[key][k]:.2f}" for k in KINDS) + " |")
            lines.append(f"| {tag} | CM RMSE vs empirical | {s['cm_rmse_mean']:.4f} |" + " |" * (len(KINDS) - 1))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--features", type=str, default="8,16,32,64,128")
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--q", type=float, default=0.7)
    ap.add_argument("--initial-reliability", type=float, default=None,
                    help="TGCE's Λ at the start (default: the method's own, 0.95)")
    ap.add_argument("--reliability", default="pixel", choices=["pixel", "image", "global", "none"])
    ap.add_argument("--good-strength", type=float, default=None,
                    help="good rater's boundary noise in pixels (default: synth's, 0.5)")
    ap.add_argument("--digits", default="first", choices=["first", "accuracy"],
                    help="first: digits 0..n_train+n_test-1 (this benchmark); accuracy: "
                         "benchmarks/accuracy.py's random subset per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--settings", nargs="+", default=["dense"], choices=["dense", "single"])
    ap.add_argument("--methods", nargs="+", default=["tgce", "unet_mv"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="ablation instead of --methods: pixel, image, global, none (TGCE's "
                         "reliability), literal_ek and unet_mv / unet_<target>")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for every number")
    ap.add_argument("--markdown", action="store_true", help="print the summary tables")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine the runs of these JSON files (same arguments but seeds) instead of running")
    args = ap.parse_args(argv)
    if args.merge:
        reports = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for rep in reports for r in rep["runs"]]
        merged = {**reports[0], "runs": runs, "summary": summarise(runs),
                  "merged_from": [str(p) for p in args.merge],
                  "total_seconds": [rep["total_seconds"] for rep in reports],
                  "args": {**reports[0]["args"], "seeds": [r["seed"] for r in runs]}}
        if args.out:
            args.out.write_text(json.dumps(merged, indent=1))
        print(markdown(merged["summary"]))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not MNIST.is_dir():
        print(f"MNIST not found at {MNIST}", file=sys.stderr)
        return 1
    params = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "features": tuple(int(v) for v in args.features.split(",")), "patience": args.patience}
    tgce_params = {"q": args.q, "reliability": args.reliability}
    if args.initial_reliability is not None:
        tgce_params["initial_reliability"] = args.initial_reliability
    runs = []
    t0 = time.perf_counter()
    for seed in args.seeds:
        for setting in args.settings:
            runs.append(run(setting, seed, args.n_train, args.n_test, args.device, args.methods,
                            tgce_params, good_strength=args.good_strength, variants=args.variants,
                            digits=args.digits, **params))
    summary = summarise(runs)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = {"benchmark": "tgce_mnist", "args": {**vars(args), "out": str(args.out)},
              "params": {**params, "features": list(params["features"])}, "tgce_params": tgce_params,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "device": device, "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
                          "threads": torch.get_num_threads()},
              "total_seconds": time.perf_counter() - t0, "summary": summary, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.markdown or not args.out:
        print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Why CM trails the U-Nets on LIDC-IDRI: CM variants against ``unet`` (STAPLE target).

Same data and budget as the LIDC part of ``benchmarks/accuracy.py`` (reduced CPU
profile): ``lidc_dev.npz`` split by patient (``_common.load_lidc``, 80/20), random
subsets of 400 train / 150 test slices, centre crop 64, 8 epochs, widths 8..128,
batch 16, lr 1e-3, no early stop (``patience=0``; the methods still hold out 10 % of the
training slices and keep the epoch with the best validation loss). Reference = STAPLE
of the 4 radiologists per test slice, as in ``accuracy.py``.

Per variant and seed, on the test slices:

- ``dice``: hard Dice (argmax, i.e. threshold 0.5) of the prediction against the
  reference, mean over slices (a slice where both are empty scores 1) — ``accuracy.py``'s
  "Dice % vs STAPLE";
- ``fg_pred`` / ``fg_raters`` / ``fg_staple``: foreground fraction of the prediction, mean
  over the 4 raters, and of the reference (% of test pixels);
- ``fg_where_all_bg``: % of the pixels that all 4 raters call background that the
  prediction calls foreground;
- CM only: ``a00`` / ``a11``: diagonal of ``rater_confusion`` (p(says bg | true bg),
  p(says fg | true fg); column j weighted by the predicted p_j), mean over raters and
  slices; ``rater_fit``: Dice of each rater estimate ``argmax A_r·p`` against rater r, mean
  over raters; ``trace`` / ``nll``: the last epoch's training terms.

Variants are named ``cm`` (defaults) or ``cm:key=value,key=value`` (CM parameters), and
``unet`` (``target="staple"``):

    python benchmarks/cm_lidc.py --threads 1 --seeds 0 1 2 \
        --variants unet cm cm:trace_weight=0 cm:trace_floor=0 cm:cm_level=global \
        --json docs/cm_lidc_cpu.json

Results are merged into the JSON by (variant, seed), so variants and seeds can run as
separate commands; ``--markdown`` prints the mean ± sd table of everything in the JSON.
Needs ../shared/data/lidc.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
from pathlib import Path

import _common as C
import numpy as np
import raterseg as rs

SIZES = {"crop": 64, "n_train": 400, "n_test": 150, "epochs": 8, "batch_size": 16, "lr": 1e-3,
         "features": (8, 16, 32, 64, 128)}


def parse_variant(name: str) -> tuple[str, dict]:
    """``"cm:trace_weight=0.1,cm_level=global"`` -> ("cm", {...}); ``"unet"`` -> staple target."""
    if name == "unet":
        return "unet", {"target": "staple"}
    method, _, rest = name.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            params[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            params[k] = v
    return method, params


def evaluate(model, xte, yte, ref) -> dict:
    res = model.predict(xte)
    pred = res.truth
    all_bg = (yte == 0).all(1)
    out = {"dice": 100 * C.mean_dice(pred, ref),
           "fg_pred": 100 * float(pred.mean()),
           "fg_raters": 100 * float((yte == 1).mean()),
           "fg_staple": 100 * float(ref.mean()),
           "fg_where_all_bg": 100 * float(pred[all_bg].mean()),
           "epochs_run": len(model.history_)}
    if res.rater_confusion is not None:
        cm = np.asarray(res.rater_confusion)  # (R, 2, 2) averaged over the test slices
        out["a00"], out["a11"] = float(cm[:, 0, 0].mean()), float(cm[:, 1, 1].mean())
        out["rater_confusion"] = cm.round(4).tolist()
    if res.rater_estimates is not None:
        est = res.rater_estimates.argmax(2)
        out["rater_fit"] = float(np.mean([100 * C.mean_dice(est[:, r], yte[:, r])
                                          for r in range(yte.shape[1])]))
    if method_name(model) == "cm":
        out.update(cm_at_background(model, xte, all_bg, pred))
    last = model.history_[-1] if model.history_ else {}
    for k in ("trace", "nll"):
        v = last.get(k, last.get(f"train_{k}"))
        if v is not None:
            out[k] = float(v)
    out["history"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
                      for h in model.history_]
    return out


def method_name(model) -> str:
    return getattr(model, "name", "")


def cm_at_background(model, xte, all_bg, pred) -> dict:
    """The pixel-wise CMs (mean over raters) where all 4 raters say background, split by
    what the prediction says there: ``bg_a00``/``bg_a01`` where it says background,
    ``fgpred_a00``/``fgpred_a01`` where it says foreground. ``a01 > a00`` means the CM
    labels a truly-foreground pixel background more often than a truly-background one:
    the columns have crossed (not diagonally dominant), and the likelihood then pulls ``p``
    towards foreground where everyone says background."""
    import torch
    from raterseg import train

    x = torch.from_numpy(train.zscore(xte[:, None]))
    with torch.no_grad():
        cms = [model.matrices(model.network_(x[i:i + 32])).mean(1) for i in range(0, len(x), 32)]
    a = torch.cat(cms).numpy()  # (N, L, L, H, W), mean over raters
    out = {}
    for tag, where in (("bg", all_bg & (pred == 0)), ("fgpred", all_bg & (pred == 1))):
        if where.any():
            out[f"{tag}_a00"] = float(a[:, 0, 0][where].mean())
            out[f"{tag}_a01"] = float(a[:, 0, 1][where].mean())
    return out


def summarise(records: list[dict]) -> dict:
    keys = ("dice", "fg_pred", "fg_where_all_bg", "a00", "a11", "rater_fit", "trace",
            "bg_a01", "fgpred_a00", "fgpred_a01")
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for name, rs_ in by.items():
        row = {"seeds": sorted(r["seed"] for r in rs_)}
        for k in keys + ("fg_raters", "fg_staple"):
            vals = [r[k] for r in rs_ if k in r]
            if vals:
                row[k] = statistics.mean(vals)
                row[k + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["dice_per_seed"] = [round(r["dice"], 2) for r in sorted(rs_, key=lambda r: r["seed"])]
        out[name] = row
    return out


def markdown(summary: dict) -> str:
    cols = [("dice", "Dice vs STAPLE"), ("fg_pred", "fg pred %"),
            ("fg_where_all_bg", "fg where all 4 say bg %"), ("a00", "CM a00"), ("a11", "CM a11"),
            ("rater_fit", "rater fit Dice")]
    lines = ["| variant | " + " | ".join(c[1] for c in cols) + " | Dice per seed |",
             "|---" * (len(cols) + 2) + "|"]
    for name, row in summary.items():
        cells = []
        for k, _ in cols:
            if k not in row:
                cells.append("—")
            elif k in ("a00", "a11"):
                cells.append(f"{row[k]:.3f} ± {row[k + '_sd']:.3f}")
            else:
                cells.append(f"{row[k]:.1f} ± {row[k + '_sd']:.1f}")
        seeds = ", ".join(f"{d:.1f}" for d in row["dice_per_seed"])
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def merge(path: Path, doc: dict, rec: dict) -> dict:
    """Put ``rec`` into the JSON at ``path`` (replacing its variant and seed), under a lock:
    other invocations may merge into the same file meanwhile."""
    import fcntl
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            doc = json.loads(path.read_text())
        doc["records"] = [r for r in doc["records"]
                          if (r["variant"], r["seed"]) != (rec["variant"], rec["seed"])] + [rec]
        doc["summary"] = summarise(doc["records"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["unet", "cm"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=SIZES["epochs"])
    ap.add_argument("--n-train", type=int, default=SIZES["n_train"])
    ap.add_argument("--n-test", type=int, default=SIZES["n_test"])
    ap.add_argument("--json", type=Path, default=None, help="merge results into this file")
    ap.add_argument("--markdown", action="store_true", help="print the table of the JSON")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sizes = {**SIZES, "epochs": args.epochs, "n_train": args.n_train, "n_test": args.n_test}
    common = {"epochs": sizes["epochs"], "batch_size": sizes["batch_size"], "lr": sizes["lr"],
              "features": sizes["features"], "patience": 0, "device": "cpu"}
    doc = {"sizes": {**sizes, "features": list(sizes["features"])}, "records": []}
    if args.json and args.json.exists():
        doc = json.loads(args.json.read_text())
        if doc["sizes"] != {**sizes, "features": list(sizes["features"])}:
            print(f"{args.json}: other sizes ({doc['sizes']}); not merging", file=sys.stderr)
            return 2
    command = "python benchmarks/cm_lidc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for seed in args.seeds:
        (xtr, ytr), (xte, yte) = C.load_lidc(C.LIDC, sizes["crop"], sizes["n_train"],
                                             sizes["n_test"], seed)
        ref = np.stack([rs.fuse(y, method="staple", num_classes=2, device="cpu").truth
                        for y in yte])
        for name in args.variants:
            method, params = parse_variant(name)
            t0 = time.perf_counter()
            model = rs.create(method, num_classes=2, seed=seed, **common, **params).fit(xtr, ytr)
            rec = {"variant": name, "seed": seed, "method": method, "params": params,
                   "config": {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in model.params_dict.items()},
                   "fit_seconds": time.perf_counter() - t0, "command": command,
                   **evaluate(model, xte, yte, ref)}
            print(f"seed {seed} {name}: Dice {rec['dice']:.1f}, fg pred {rec['fg_pred']:.2f} % "
                  f"(raters {rec['fg_raters']:.2f}), fg where all bg {rec['fg_where_all_bg']:.2f} %"
                  + (f", a00 {rec['a00']:.3f} a11 {rec['a11']:.3f}, rater fit "
                     f"{rec['rater_fit']:.1f}" if "a00" in rec else "")
                  + (f"; all-bg pixels: CM a01 {rec['bg_a01']:.2f} where pred bg, a00/a01 "
                     f"{rec.get('fgpred_a00', float('nan')):.2f}/{rec.get('fgpred_a01', float('nan')):.2f}"
                     " where pred fg" if "bg_a01" in rec else "")
                  + f" ({rec['fit_seconds']:.0f} s)", file=sys.stderr, flush=True)
            if args.json:
                doc = merge(args.json, doc, rec)
    if args.markdown:
        recs = doc["records"] if args.json else []
        print(markdown(summarise(recs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

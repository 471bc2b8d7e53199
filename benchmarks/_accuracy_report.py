"""Tables, headers and figures of ``benchmarks/accuracy.py`` from its run records (dicts)."""

from __future__ import annotations

import statistics
from pathlib import Path

import _common as C
import numpy as np

#: The CM paper's MNIST Dice (%) and CM RMSE (tables 1-2; its "naive CNN" rows = unet_*).
PAPER_MNIST = {
    "dense": {"cm": (82.92, 0.0893), "unet_mv": (62.89, None), "unet_mean": (38.36, None),
              "staple": (78.03, 0.1241), "spatial_staple": (78.96, 0.1195)},
    "single": {"cm": (76.48, 0.1329), "unet_sample": (32.79, None), "staple": (54.07, 0.2617),
               "spatial_staple": (56.73, 0.2384)},
}

# -- tables ------------------------------------------------------------------
def _ms(vals, digits: int = 2, scale: float = 1.0) -> str:
    """'mean ± sd' over seeds ('mean' for one seed, '–' for none)."""
    v = [scale * x for x in vals if x is not None and np.isfinite(x)]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def _collect(runs: list[dict], part: str, name: str, key: str) -> list:
    return [r[part][name].get(key) for r in runs if name in r[part]]


def _median_s(runs, part, name, key="fit_seconds") -> str:
    v = [x for x in _collect(runs, part, name, key) if x is not None]
    if not v:
        return "–"
    m = statistics.median(v)
    return f"{m:.1f}" if m < 10 else f"{m:.0f}"


def _avg_rater(runs, name) -> list:
    return [float(np.mean(x)) for x in _collect(runs, "learned", name, "rater_dice") if x]


def mnist_tables(runs: list[dict], levels: list[float]) -> str:
    lines = []
    main = [r for r in runs if r["scale"] == 1.0]
    for labels in dict.fromkeys(r["labels"] for r in main):
        rs_ = [r for r in main if r["labels"] == labels]
        rd = {k: _ms([r["rater_dice_test"][k] for r in rs_], 1) for k in C.MNIST_KINDS}
        lines += [f"**{labels} labels** — raters' Dice vs truth on the held-out digits: "
                  + ", ".join(f"{k} {v}" for k, v in rd.items()), "",
                  ("| method | Dice % vs truth | CM RMSE | GED | ECE % | rater-estimate Dice % (avg) "
                   "| fit s (median) | paper Dice % / CM RMSE |"), "|---" * 8 + "|"]
        for name in dict.fromkeys(n for r in rs_ for n in r["learned"]):
            p = PAPER_MNIST.get(labels, {}).get(name)
            paper = "–" if p is None else f"{p[0]}" + (f" / {p[1]}" if p[1] else "")
            lines.append(f"| {name} | {_ms(_collect(rs_, 'learned', name, 'dice'))} "
                         f"| {_ms(_collect(rs_, 'learned', name, 'cm_rmse'), 4)} "
                         f"| {_ms(_collect(rs_, 'learned', name, 'ged'), 3)} "
                         f"| {_ms(_collect(rs_, 'learned', name, 'ece'))} "
                         f"| {_ms(_avg_rater(rs_, name), 1)} | {_median_s(rs_, 'learned', name)} | {paper} |")
        if not any(r["fusion"] for r in rs_):
            lines.append("")
            continue
        cases = {e.get("cases") for r in rs_ for e in r["fusion"].values()} - {None}
        n_train = min(r.get("n_train", 0) for r in rs_)
        some = (f" (per-case fusions on the first {max(cases)} of {n_train} training digits)"
                if cases and max(cases) < n_train else "")
        lines += ["", (f"Classical fusions of the *training* raters ({labels} labels) against the "
                       f"known truth{some}:"),
                  "", "| fusion | Dice % vs truth | CM RMSE | GED vs raters | seconds | paper Dice % / CM RMSE |",
                  "|---" * 6 + "|"]
        for name in dict.fromkeys(n for r in rs_ for n in r["fusion"]):
            p = PAPER_MNIST.get(labels, {}).get(name)
            paper = "–" if p is None else f"{p[0]} / {p[1]}"
            lines.append(f"| {name} | {_ms(_collect(rs_, 'fusion', name, 'dice'))} "
                         f"| {_ms(_collect(rs_, 'fusion', name, 'cm_rmse'), 4)} "
                         f"| {_ms(_collect(rs_, 'fusion', name, 'ged'), 3)} "
                         f"| {_median_s(rs_, 'fusion', name, 'seconds')} | {paper} |")
        lines.append("")
    sweep = [r for r in runs if r["labels"] == "dense"]
    if len(levels) > 1 and sweep:
        by = {lv: [r for r in sweep if r["scale"] == lv] for lv in levels}
        rmean = {lv: [float(np.mean(list(r["rater_dice_test"].values()))) for r in by[lv]] for lv in levels}
        lines += [("Noise sweep (dense labels; every rater's default strength × scale): Dice % vs "
                   "truth (fusions: of the training raters)"),
                  "", "| method | " + " | ".join(f"×{lv:g}" for lv in levels) + " |",
                  "|---" * (len(levels) + 1) + "|",
                  "| *raters' mean Dice* | " + " | ".join(_ms(rmean[lv], 1) for lv in levels) + " |"]
        names = [("learned", n) for n in dict.fromkeys(n for r in sweep for n in r["learned"])]
        names += [("fusion", n) for n in dict.fromkeys(n for r in sweep for n in r["fusion"])]
        for part, n in names:
            cells = [_ms(_collect(by[lv], part, n, "dice")) for lv in levels]
            if "–" in cells:  # not in the sweep (--sweep-methods)
                continue
            lines.append(f"| {'fusion: ' if part == 'fusion' else ''}{n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def lidc_tables(runs: list[dict]) -> str:
    R = len(runs[0]["raters_vs_reference"])
    cols = ["Dice % vs STAPLE", "soft Dice % vs mean", "GED", "ECE %", "Brier", "entropy MAE"]
    head = cols + [f"A{r + 1}" for r in range(R)] + ["Average", "fit s (median)"]
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    rv = [[r["raters_vs_reference"][i] for r in runs] for i in range(R)]
    lines.append("| *each rater vs STAPLE* | – | – | – | – | – | – | "
                 + " | ".join(_ms(v, 1) for v in rv) + f" | {_ms([float(np.mean(x)) for x in zip(*rv)], 1)} | – |")
    for name in dict.fromkeys(n for r in runs for n in r["learned"]):
        def g(k, name=name):
            return _collect(runs, "learned", name, k)

        per = [x for x in g("rater_dice") if x]
        rater_cells = ([_ms([p[i] for p in per], 1) for i in range(R)] + [_ms(_avg_rater(runs, name), 1)]
                       if per else ["–"] * (R + 1))
        lines.append(f"| {name} | {_ms(g('dice'))} | {_ms(g('soft_dice'))} | {_ms(g('ged'), 3)} "
                     f"| {_ms(g('ece'))} | {_ms(g('brier'), 4)} | {_ms(g('entropy_mae'), 1)} | "
                     + " | ".join(rater_cells) + f" | {_median_s(runs, 'learned', name)} |")
    return "\n".join(lines)


# -- figures --------------------------------------------------------------------------------
def figures(dataset: str, runs: list[dict], levels, images: Path, tag: str) -> list[Path]:
    import _accuracy_plots as P

    images.mkdir(parents=True, exist_ok=True)
    out = []
    main = [r for r in runs if r.get("scale", 1.0) == 1.0]
    first = next((r for r in main if "_gallery" in r), main[0] if main else None)
    if first is None:
        return out
    what = "held-out digits" if dataset == "mnist" else "test slices vs STAPLE"
    bins = {n: e["reliability"] for n, e in first["learned"].items()}
    if bins:
        path = images / f"accuracy_{dataset}_reliability_{tag}.png"
        P.reliability(bins, path, f"{dataset.upper()} reliability, {what}, seed {first['seed']}")
        out.append(path)
    g = first.get("_gallery", {"preds": {}})
    kept = images / f"accuracy_{dataset}_gallery_{tag}.png"
    # Only a run that trained every method can draw the whole gallery; --render-only and a
    # --resume that kept some methods leave the gallery of the run that trained them all.
    complete = bool(g["preds"]) and set(first["learned"]) <= set(g["preds"])
    if not complete and kept.exists():
        out.append(kept)
    if complete:
        path = images / f"accuracy_{dataset}_gallery_{tag}.png"
        P.gallery(g["images"], g["raters"], g["reference"], "truth" if dataset == "mnist" else "STAPLE",
                  g["preds"], path, f"{dataset.upper()}: raters, each method's truth and uncertainty",
                  rater_names=C.MNIST_KINDS if dataset == "mnist" else None)
        out.append(path)
    if dataset == "mnist":
        for r in runs:
            if r["scale"] != 1.0 or r["seed"] != first["seed"]:
                continue
            est = {n: np.array(e["rater_confusion"]) for n, e in r["learned"].items()
                   if "rater_confusion" in e}
            if "staple (whole set)" in r["fusion"]:
                est["staple (whole set)"] = np.array(r["fusion"]["staple (whole set)"]["rater_confusion"])
            if est:
                path = images / f"accuracy_mnist_cms_{r['labels']}_{tag}.png"
                P.confusions(np.array(r["true_confusion_train"]), est, C.MNIST_KINDS, path,
                             f"MNIST {r['labels']} labels: p(says i | true j), seed {r['seed']}")
                out.append(path)
        dense = [r for r in runs if r["labels"] == "dense"]
        if len(levels) > 1 and dense:
            rmean = [statistics.fmean(float(np.mean(list(r["rater_dice_test"].values())))
                                      for r in dense if r["scale"] == lv) for lv in levels]
            curves = {}
            for part, prefix in (("learned", ""), ("fusion", "fusion: ")):
                for n in dict.fromkeys(n for r in dense for n in r[part]):
                    ys = [_collect([r for r in dense if r["scale"] == lv], part, n, "dice") for lv in levels]
                    if all(ys):
                        curves[prefix + n] = [statistics.fmean(y) for y in ys]
            path = images / f"accuracy_mnist_sweep_{tag}.png"
            P.sweep(list(levels), rmean, curves, path, "MNIST, dense labels: Dice vs rater noise")
            out.append(path)
    return out


def _where(m: dict) -> str:
    return m["gpu"] or f"{m['cpu']}, {m['threads']} torch thread(s)"


def machines(reports: list[dict]) -> list[dict]:
    """Each distinct machine of the seed reports with its seeds and their start loads."""
    out: dict[str, dict] = {}
    for rep in reports:
        m = rep["machine"]
        entry = out.setdefault(_where(m), {"where": _where(m), "seeds": [], "loads": []})
        entry["seeds"].append(rep["seed"])
        if m.get("load_average_at_start"):
            entry["loads"].append(m["load_average_at_start"][0])
    return list(out.values())


def header(dataset: str, report: dict, figs: list[Path], docs: Path) -> str:
    """The section's first paragraph: which machine, sizes, seeds, wall time, commands, files."""
    m, a = report["machine"], report["sizes"]
    where = _where(m)
    ms = report.get("machines") or []
    if len(ms) > 1:  # seeds run on different machines: say which ran where
        where = "; ".join(f"{e['where']} for seed(s) {', '.join(map(str, e['seeds']))}" for e in ms)
    kind = {"gpu": "full-size GPU run", "cpu": "**reduced CPU run**", "smoke": "smoke run"}[report["profile"]]
    first = report["runs"][0]
    sizes = (f"{a['mnist_train']} training / {a['mnist_test']} held-out digits, {a['epochs']} epochs"
             if dataset == "mnist" else
             f"{first['n_train']} training / {first['n_test']} test slices of "
             f"{first['size'][0]}×{first['size'][1]}, {a['lidc_epochs']} epochs")
    title = ("MNIST with simulated raters (CM paper tables 1-2, figure 4)" if dataset == "mnist"
             else "LIDC-IDRI, 4 radiologists (CM paper tables 4-5; Lemay et al. 2022)")
    partial = (f" (seeds {report['partial_seeds']} unfinished: some rows have fewer seeds)"
               if report.get("partial_seeds") else "")
    load = m.get("load_average_at_start")
    lines = [f"## Accuracy: {title}", "",
             f"{kind}: `benchmarks/accuracy.py`, {where} ({m['device']}, torch {m['torch']}); "
             f"{sizes}; batch {a['batch_size']}, Adam lr {a['lr']}, U-Net widths {tuple(a['features'])}, "
             f"no early stop; seeds {report['seeds']}{partial} (mean ± sd over seeds; one number = "
             f"one seed). Wall time {report['wall_seconds'] / 60:.1f} min in all"
             + (f", load average at start {load[0]:.1f}" if load and len(ms) <= 1 else "")
             + (", load averages at start " + ", ".join(
                 f"{x:.1f}" for e in ms for x in e["loads"]) if len(ms) > 1 else "")
             + ". Command: " + "; ".join(f"`python benchmarks/accuracy.py {c}`" for c in report["commands"])
             + "; every number in " + ", ".join(f"`{j}`" for j in report["json"]) + ".", ""]
    if figs:
        lines += [" ".join(f"![{p.stem}]({p.relative_to(docs.parent).as_posix()})" for p in figs), ""]
    return "\n".join(lines)

"""Accuracy of every registered method on simulated (MNIST) and real (LIDC) raters (issue #8).

Every learned method of ``raterseg.available_methods()`` (``unet`` once per ``target``:
mv / mean / staple / sample) trains with the same budget — U-Net widths ``features``,
``epochs``, batch size, learning rate, no early stop — for each seed; tables give the
mean ± sd over seeds.

MNIST (CM paper, Zhang et al. 2020, tables 1-2 and figure 4): truth = digit > 0.5;
five simulated raters good / over / under / wrong / blank (``raterseg.synth``); "dense"
(every rater on every digit) and "single" (one random rater per digit) labels; and a
sweep over the raters' noise (each kind's default strength × a scale). Scores on
held-out digits: Dice vs truth, CM RMSE of ``rater_confusion`` against the raters'
empirical confusion on those digits, GED (d = 1 − IoU) of the method's samples (its
rater estimates where it has them, else its one map) against the 5 raters, and ECE
against the truth. The classical methods fuse the *training* raters and are scored
against the known truth (their CM RMSE uses the confusion of the raters against the
fused probabilities; "staple (whole set)" runs one STAPLE over all training digits).

LIDC (CM paper tables 4-5; Lemay et al. 2022 §2.3): ``lidc_dev.npz`` split by patient
(80/20; the methods hold out ``val_fraction`` of the training slices themselves);
reference = STAPLE of the 4 radiologists per slice. Dice vs the reference, soft Dice
vs the raters' mean, GED vs the 4 raters, ECE (top label, 10 bins, vs the reference) and
reliability bins, Brier vs the raters' mean, entropy MAE (per-slice total entropy vs
that of the raters' mean), and per-rater Dice A1..A4 / Average of rater estimates.

    python benchmarks/accuracy.py --smoke --out /tmp/acc        # ~1 min, nothing in docs/
    python benchmarks/accuracy.py --device cpu --seeds 0        # reduced CPU sizes -> docs/
    python benchmarks/accuracy.py --device cuda                 # full sizes, 3 seeds -> docs/

Sizes follow the device (``--device cuda``: full; otherwise reduced) unless given.
Without ``--out`` results go to docs/BENCHMARKS.md (sections ``accuracy_mnist_cpu``,
``accuracy_lidc_gpu``, ...: one per dataset and machine kind), one JSON per dataset and
seed (docs/accuracy_mnist_gpu_seed0.json, ...) and docs/images/accuracy_*.png; with it
(and always with ``--smoke``) into that folder instead. Each invocation draws the tables
from every seed file of the same sizes, so seeds and datasets can run as separate
commands; ``--resume`` keeps the methods an interrupted invocation finished (the JSON is
written after every method) and ``--render-only`` trains nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import _accuracy_report as R
import _common as C
import numpy as np
import raterseg as rs
from raterseg import metrics
from raterseg.methods._base import empirical_confusion
from raterseg.methods._registry import get_method

# CPU (reduced) and GPU (full) sizes; --smoke overrides both.
PROFILES = {
    "cpu": {"mnist_train": 300, "mnist_test": 200, "epochs": 8, "batch_size": 16,
            "features": (8, 16, 32, 64, 128), "sweep": (0.5, 1.0, 1.5), "lidc_crop": 64,
            "lidc_train": 400, "lidc_test": 150, "lidc_epochs": 8, "seeds": (0, 1, 2),
            "sweep_methods": ("cm", "tgce", "unet_mv", "unet_staple"), "fusion_cases": None},
    "gpu": {"mnist_train": 8000, "mnist_test": 2000, "epochs": 30, "batch_size": 32,
            "features": (16, 32, 64, 128, 256), "sweep": (0.5, 1.0, 1.5, 2.0), "lidc_crop": 0,
            "lidc_train": None, "lidc_test": None, "lidc_epochs": 30, "seeds": (0, 1, 2),
            "sweep_methods": None, "fusion_cases": 1000},
    "smoke": {"mnist_train": 32, "mnist_test": 16, "epochs": 2, "batch_size": 16,
              "features": (8, 16, 32, 64, 128), "sweep": (1.0, 2.0), "lidc_crop": 32,
              "lidc_train": 32, "lidc_test": 12, "lidc_epochs": 2, "seeds": (0,),
              "sweep_methods": ("cm", "unet_mv"), "fusion_cases": None},
}
GALLERY = 3  # test cases shown in the gallery


def learned_entries() -> dict[str, tuple[str, dict]]:
    """Entry name -> (method, extra params): one per learned method, one per ``target``."""
    out: dict[str, tuple[str, dict]] = {}
    for name in rs.available_methods(learned=True):
        target = next((p for p in get_method(name).params() if p.name == "target"), None)
        if target is not None and target.choices:
            out.update({f"{name}_{t}": (name, {"target": t}) for t in target.choices})
        else:
            out[name] = (name, {})
    return out


def select(entries, wanted: list[str] | None) -> list[str]:
    """Entries named in ``wanted`` (an entry, or a method name for all its entries)."""
    if not wanted:
        return list(entries)
    return [e for e in entries if e in wanted or e.split("_")[0] in wanted
            or (e in rs.available_methods(learned=False) and e in wanted)]


def _ged(samples_by_case, raters) -> float:
    return float(np.mean([metrics.generalized_energy_distance(s, r, 2)
                          for s, r in zip(samples_by_case, raters)]))


def _samples(res) -> np.ndarray:
    """(N, n, H, W): each rater estimate's argmax where the method has them, else its map."""
    if res.rater_estimates is not None:
        return res.rater_estimates.argmax(2).astype(np.int16)
    return res.truth[:, None]


def _bins(prob, target) -> dict:
    """Top-label reliability bins and ECE of prob (N, L, H, W) against labels (N, H, W)."""
    p = np.moveaxis(prob, 1, 0)
    b = metrics.reliability_bins(p, target, 10)
    out = {k: np.asarray(v).tolist() for k, v in b.items()}
    out["ece"] = metrics.expected_calibration_error(p, target, 10)
    return out


def train(entry: str, spec, x, y, seed: int, common: dict):
    method, extra = spec
    t0 = time.perf_counter()
    model = rs.create(method, num_classes=2, seed=seed, **common, **extra).fit(x, y)
    return model, time.perf_counter() - t0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- MNIST -------------------------------------------------------------------------------
def mnist_run(seed: int, labels: str, scale: float, cfg: dict, learned: list[str],
              classical: list[str], keep: bool, save, done: dict | None = None) -> dict:
    """One MNIST setting for one seed; ``save(run)`` after each method; methods already in
    ``done`` (a run record of an earlier, interrupted invocation) are not trained again."""
    d = C.load_mnist_raters(cfg["mnist_train"], cfg["mnist_test"], seed,
                            strength=C.kind_strengths(C.MNIST_KINDS, scale), labels=labels)
    tag = f"[mnist {labels} ×{scale:g} seed {seed}]"
    run: dict = {"labels": labels, "scale": scale, "seed": seed, "fusion": {}, "learned": {},
                 "n_train": len(d["x_train"]),
                 "rater_dice_test": {k: 100 * C.mean_dice(d["y_test"][:, r], d["t_test"])
                                     for r, k in enumerate(C.MNIST_KINDS)}}
    cm_train = C.true_confusion(d["y_train_dense"], d["t_train"])
    cm_test = C.true_confusion(d["y_test"], d["t_test"])
    run["true_confusion_train"] = cm_train.round(4).tolist()
    ytr = d["y_train"]
    # per-case fusions of the first ``fusion_cases`` training digits (all when None): spatial
    # STAPLE takes ~30 ms a digit on one core, too long for 8,000 digits x 15 settings
    k = slice(0, cfg.get("fusion_cases"))
    for name in classical:  # fuse the training raters, score against the known truth
        t0 = time.perf_counter()
        res = [rs.fuse(y, method=name, num_classes=2, device="cpu") for y in ytr[k]]
        sec = time.perf_counter() - t0
        truth = np.stack([r.truth for r in res])
        prob = np.stack([r.probabilities for r in res], axis=1)  # (L, N, H, W)
        implied = empirical_confusion(np.moveaxis(ytr[k], 1, 0), prob)
        run["fusion"][name] = {"dice": 100 * C.mean_dice(truth, d["t_train"][k]),
                               "cm_rmse": metrics.cm_rmse(implied, cm_train),
                               "ged": _ged(truth[:, None], d["y_train_dense"][k]), "seconds": sec,
                               "cases": len(res)}
    if "staple" in classical:  # one STAPLE over the whole training set: global rater CMs
        t0 = time.perf_counter()
        res = rs.fuse(np.moveaxis(ytr, 1, 0), method="staple", num_classes=2, device="cpu")
        run["fusion"]["staple (whole set)"] = {
            "dice": 100 * C.mean_dice(res.truth, d["t_train"]),
            "cm_rmse": metrics.cm_rmse(res.rater_confusion, cm_train),
            "ged": _ged(res.truth[:, None], d["y_train_dense"]),
            "seconds": time.perf_counter() - t0, "rater_confusion": res.rater_confusion.round(4).tolist()}
    for name, e in run["fusion"].items():
        log(f"{tag} fusion {name}: Dice {e['dice']:.2f}, CM RMSE {e['cm_rmse']:.4f}")
    if keep:
        k = slice(0, GALLERY)
        run["_gallery"] = {"images": d["x_test"][k], "raters": d["y_test"][k],
                           "reference": d["t_test"][k], "preds": {}}
    entries = learned_entries()
    for name in learned:
        if done and name in done.get("learned", {}):
            run["learned"][name] = done["learned"][name]
            log(f"{tag} {name}: kept from the earlier run")
            continue
        model, sec = train(name, entries[name], d["x_train"], ytr, seed, cfg["common"])
        res = model.predict(d["x_test"])
        e = {"dice": 100 * C.mean_dice(res.truth, d["t_test"]), "fit_seconds": sec,
             "epochs_run": len(model.history_), "ged": _ged(_samples(res), d["y_test"])}
        b = _bins(res.probabilities, d["t_test"])
        e["ece"], e["reliability"] = 100 * b["ece"], b
        if res.rater_confusion is not None:
            e["cm_rmse"] = metrics.cm_rmse(res.rater_confusion, cm_test)
            e["rater_confusion"] = res.rater_confusion.round(4).tolist()
        if res.rater_estimates is not None:
            est = res.rater_estimates.argmax(2)
            e["rater_dice"] = [100 * C.mean_dice(est[:, r], d["y_test"][:, r])
                               for r in range(est.shape[1])]
        if keep:
            run["_gallery"]["preds"][name] = {"truth": res.truth[:GALLERY],
                                              "uncertainty": res.uncertainty[:GALLERY]}
        run["learned"][name] = e
        log(f"{tag} {name}: Dice {e['dice']:.2f}, GED {e['ged']:.3f}"
            + (f", CM RMSE {e['cm_rmse']:.4f}" if "cm_rmse" in e else "") + f" ({sec:.0f} s)")
        save(run)
    return run


# -- LIDC --------------------------------------------------------------------------------
def lidc_run(seed: int, cfg: dict, learned: list[str], keep: bool, save,
             done: dict | None = None) -> dict:
    """LIDC for one seed; ``save``/``done`` as :func:`mnist_run`."""
    (xtr, ytr), (xte, yte) = C.load_lidc(C.LIDC, cfg["lidc_crop"], cfg["lidc_train"],
                                         cfg["lidc_test"], seed)
    ytr, yte = ytr.astype(np.int16), yte.astype(np.int16)
    ref = np.stack([rs.fuse(y, method="staple", num_classes=2, device="cpu").truth for y in yte])
    mean = (yte == 1).mean(1)
    run: dict = {"seed": seed, "n_train": len(xtr), "n_test": len(xte), "size": list(xte.shape[1:]),
                 "learned": {},
                 "raters_vs_reference": [100 * C.mean_dice(yte[:, r], ref) for r in range(yte.shape[1])]}
    log(f"[lidc seed {seed}] {len(xtr)} train / {len(xte)} test slices of {xte.shape[1:]}")
    if keep:
        run["_gallery"] = {"images": xte[:GALLERY], "raters": yte[:GALLERY],
                           "reference": ref[:GALLERY], "preds": {}}
        # the gallery shows slices where the raters marked something
        pick = np.flatnonzero((yte == 1).any((1, 2, 3)))[:GALLERY]
        if len(pick):
            run["_gallery"] = {"images": xte[pick], "raters": yte[pick], "reference": ref[pick],
                               "preds": {}, "index": pick}
    common = {**cfg["common"], "epochs": cfg["lidc_epochs"]}
    entries = learned_entries()
    for name in learned:
        if done and name in done.get("learned", {}):
            run["learned"][name] = done["learned"][name]
            log(f"[lidc seed {seed}] {name}: kept from the earlier run")
            continue
        model, sec = train(name, entries[name], xtr, ytr, seed, common)
        res = model.predict(xte)
        fg = res.probabilities[:, 1]
        e = {"fit_seconds": sec, "epochs_run": len(model.history_),
             "dice": 100 * C.mean_dice(res.truth, ref),
             "soft_dice": 100 * float(np.mean([metrics.soft_dice(p, m) for p, m in zip(fg, mean)])),
             "ged": _ged(_samples(res), yte),
             "brier": metrics.brier_score(fg, mean),
             "entropy_mae": metrics.entropy_mae(fg, mean, batched=True)}
        b = _bins(res.probabilities, ref)
        e["ece"], e["reliability"] = 100 * b["ece"], b
        if res.rater_estimates is not None:
            est = res.rater_estimates.argmax(2)
            e["rater_dice"] = [100 * C.mean_dice(est[:, r], yte[:, r]) for r in range(est.shape[1])]
        if keep:
            idx = run["_gallery"].get("index", np.arange(GALLERY))
            run["_gallery"]["preds"][name] = {"truth": res.truth[idx],
                                              "uncertainty": res.uncertainty[idx]}
        run["learned"][name] = e
        log(f"[lidc seed {seed}] {name}: Dice vs STAPLE {e['dice']:.2f}, soft Dice {e['soft_dice']:.2f}, "
            f"GED {e['ged']:.3f}, ECE {e['ece']:.2f} ({sec:.0f} s)")
        save(run)
    return run


# -- driver -----------------------------------------------------------------------------------
def _machine(device: str) -> dict:
    import os

    import torch

    return {"cpu": C.cpu_model(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


#: The sizes that must agree for runs of a dataset to share a table (seeds may differ).
_SIZES = {"mnist": ("mnist_train", "mnist_test", "epochs", "batch_size", "features", "lr", "sweep",
                    "sweep_methods", "fusion_cases"),
          "lidc": ("lidc_crop", "lidc_train", "lidc_test", "lidc_epochs", "batch_size", "features", "lr")}


def _same(a: dict, b: dict, dataset: str) -> bool:
    def pick(d):
        return json.loads(json.dumps({k: d.get(k) for k in _SIZES[dataset]}))

    return pick(a) == pick(b)


def _earlier(path: Path, sizes: dict, dataset: str) -> dict:
    """An earlier invocation's record for this seed, runs keyed by (labels, scale)."""
    if not path.exists():
        return {}
    rep = json.loads(path.read_text())
    if not _same(rep["sizes"], sizes, dataset):
        log(f"--resume: {path} has other sizes; starting this seed afresh")
        return {}
    return {"wall_seconds": rep.get("wall_seconds"),
            "commands": rep.get("commands", [rep["command"]]),
            "runs": {(r.get("labels", "lidc"), r.get("scale", 1.0)): r for r in rep["runs"]}}


def _reports(out_dir: Path, dataset: str, tag: str, sizes: dict) -> list[dict]:
    reports = []
    for p in sorted(out_dir.glob(f"accuracy_{dataset}_{tag}_seed*.json")):
        rep = json.loads(p.read_text())
        if _same(rep["sizes"], sizes, dataset):
            reports.append(rep)
        else:
            log(f"{p.name}: other sizes than this invocation's; left out of the tables")
    return sorted(reports, key=lambda r: r["seed"])


def _rel(path: Path, docs: Path) -> str:
    return path.relative_to(docs.parent).as_posix() if path.is_relative_to(docs.parent) else str(path)


def _jsonable(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 seed, 2 epochs, all methods")
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--datasets", nargs="+", default=["mnist", "lidc"], choices=["mnist", "lidc"])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="entries or method names (default: every registered method)")
    ap.add_argument("--sweep-methods", nargs="+", default=None,
                    help="learned entries in the noise sweep (default: the profile's; all on GPU)")
    ap.add_argument("--labels", nargs="+", default=["dense", "single"], choices=["dense", "single"])
    ap.add_argument("--sweep", type=float, nargs="+", default=None, help="noise scales (1 = defaults)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--epochs", type=int, default=None, help="MNIST epochs")
    ap.add_argument("--lidc-epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--features", type=int, nargs=5, default=None)
    ap.add_argument("--mnist-train", type=int, default=None)
    ap.add_argument("--mnist-test", type=int, default=None)
    ap.add_argument("--lidc-crop", type=int, default=None, help="centre crop (0: full 128)")
    ap.add_argument("--lidc-train", type=int, default=None, help="training slices (0: all)")
    ap.add_argument("--lidc-test", type=int, default=None, help="test slices (0: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for tables (BENCHMARKS.md), JSON and images instead of docs/")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the methods already in this seed's JSON (same sizes); train the rest")
    ap.add_argument("--render-only", action="store_true",
                    help="train nothing: redo the tables (and figures but the gallery) from the JSON")
    args = ap.parse_args(argv)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    import torch

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = "smoke" if args.smoke else ("gpu" if device.startswith("cuda") else "cpu")
    cfg = dict(PROFILES[profile])
    for key in ("mnist_train", "mnist_test", "epochs", "batch_size", "lidc_crop", "lidc_epochs",
                "seeds", "features", "sweep", "lidc_train", "lidc_test"):
        val = getattr(args, key)
        if val is not None:
            cfg[key] = (val or None) if key in ("lidc_train", "lidc_test") else val
    cfg["lr"] = args.lr
    cfg["common"] = {"epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "lr": args.lr,
                     "features": tuple(cfg["features"]), "patience": 0, "device": device}
    levels = sorted(set(cfg["sweep"]) | {1.0})
    entries = learned_entries()
    learned = select(entries, args.methods)
    sweep_wanted = args.sweep_methods or cfg["sweep_methods"]
    sweep_learned = [e for e in select(entries, sweep_wanted) if e in learned] if sweep_wanted else learned
    classical = select(rs.available_methods(learned=False), args.methods)
    if args.methods and not (learned or classical):
        ap.error(f"--methods: none of {args.methods} is a method or entry; "
                 f"expected some of {list(entries) + rs.available_methods(learned=False)}")

    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="accuracy_smoke_")) if args.smoke else C.ROOT / "docs")
    docs = out_dir / "BENCHMARKS.md" if (args.out or args.smoke) else C.DOCS
    images = out_dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = {"smoke": "smoke", "gpu": "gpu", "cpu": "cpu"}[profile]
    cfg["sweep_methods"] = sweep_learned
    sizes = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k != "common"}
    log(f"accuracy: {profile} profile on {device}; learned {learned}; classical {classical}; "
        f"writing to {docs}")
    status = 0
    for dataset in args.datasets:
        path = C.MNIST if dataset == "mnist" else C.LIDC
        if not path.exists():
            log(f"SKIPPED {dataset}: {path} is absent (the shared data folder exists only on the "
                "dev machine)")
            continue
        fresh: dict[int, list[dict]] = {}  # this invocation's runs (they hold the gallery arrays)
        for i, seed in enumerate([] if args.render_only else cfg["seeds"]):
            json_path = out_dir / f"accuracy_{dataset}_{tag}_seed{seed}.json"
            earlier = _earlier(json_path, sizes, dataset) if args.resume else {}
            runs: list[dict] = []
            report = {"benchmark": f"accuracy_{dataset}", "profile": profile, "command": command,
                      "machine": _machine(device), "sizes": sizes, "seed": seed, "runs": runs}
            if earlier:  # every invocation that produced rows of this file
                report["commands"] = list(dict.fromkeys(earlier["commands"] + [command]))
            t0 = time.perf_counter() - (earlier.get("wall_seconds") or 0.0)

            def save(current=None, partial=True, report=report, runs=runs, t0=t0, json_path=json_path):
                report["wall_seconds"] = time.perf_counter() - t0
                report["partial"] = partial
                new = current is not None and all(current is not r for r in runs)
                done = runs + ([current] if new else [])
                json_path.write_text(json.dumps({**report, "runs": _jsonable(done)}, indent=1))

            def prev(labels, scale, earlier=earlier):
                return earlier.get("runs", {}).get((labels, scale))

            if dataset == "lidc":
                runs.append(lidc_run(seed, cfg, learned, keep=i == 0, save=save,
                                     done=prev("lidc", 1.0)))
            else:
                for labels in args.labels:
                    runs.append(mnist_run(seed, labels, 1.0, cfg, learned, classical, keep=i == 0,
                                          save=save, done=prev(labels, 1.0)))
                    save()
                if "dense" in args.labels:
                    for lv in levels:
                        if lv != 1.0:
                            runs.append(mnist_run(seed, "dense", lv, cfg, sweep_learned, classical,
                                                  keep=False, save=save, done=prev("dense", lv)))
                            save()
            save(partial=False)
            fresh[seed] = runs
            log(f"{dataset} seed {seed}: {report['wall_seconds'] / 60:.1f} min, numbers in {json_path}")
        # tables from every seed file of this dataset and machine kind with the same sizes
        reports = _reports(out_dir, dataset, tag, sizes)
        if not reports:
            log(f"{dataset}: no results with these sizes in {out_dir}")
            continue
        runs = [r for rep in reports for r in (fresh.get(rep["seed"]) or rep["runs"])]
        summary = {**reports[-1], "seeds": [rep["seed"] for rep in reports],
                   "partial_seeds": [rep["seed"] for rep in reports if rep.get("partial")],
                   "wall_seconds": sum(rep["wall_seconds"] for rep in reports),
                   "machines": R.machines(reports),
                   "commands": list(dict.fromkeys(c for rep in reports
                                                  for c in rep.get("commands", [rep["command"]]))),
                   "json": [_rel(out_dir / f"accuracy_{dataset}_{tag}_seed{rep['seed']}.json", docs)
                            for rep in reports], "runs": runs}
        figs = [] if args.no_figures else R.figures(dataset, runs, levels, images, tag)
        table = R.mnist_tables(runs, levels if "dense" in args.labels else [1.0]) if dataset == "mnist" \
            else R.lidc_tables(runs)
        # one section per dataset and machine kind, so a GPU run does not replace the CPU tables
        C.replace_section(f"accuracy_{dataset}_{tag}",
                          R.header(dataset, summary, figs, docs) + "\n" + table, docs)
        print(table)
        log(f"{dataset}: tables in {docs}")
    return status


if __name__ == "__main__":
    sys.exit(main())

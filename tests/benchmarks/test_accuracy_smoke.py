"""The accuracy benchmark (benchmarks/accuracy.py --smoke) end to end, as `make bench` runs it.

It trains every registered learned method for 2 epochs on a few MNIST digits with the
five simulated raters (and a few LIDC slices), so the learned numbers are only checked
to be present, finite and in range; the classical fusions of the simulated raters have
known outcomes (majority vote recovers the digit, the blank rater is found), which the
test checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import raterseg as rs
from raterseg.methods._registry import get_method

ROOT = Path(__file__).resolve().parents[2]


def expected_entries() -> list[str]:
    """One row per learned method, one per ``target`` for ``unet``."""
    out = []
    for name in rs.available_methods(learned=True):
        target = next((p for p in get_method(name).params() if p.name == "target"), None)
        out += [f"{name}_{t}" for t in target.choices] if target and target.choices else [name]
    return out


@pytest.fixture(scope="module")
def smoke(shared_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--smoke", "--threads", "1",
         "--out", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def section(md: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert start in md and end in md, f"section {name} missing"
    return md[md.index(start):md.index(end)]


def tables(text: str) -> list[list[list[str]]]:
    """Markdown tables in ``text``: lists of rows (header first, separator dropped)."""
    found, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                cur.append(cells)
        elif cur:
            found.append(cur)
            cur = []
    return found


def number(cell: str) -> float:
    """The mean of 'mean ± sd' (or the one number); NaN for '–'."""
    head = cell.split("±")[0].strip()
    return float("nan") if head in ("–", "") else float(head)


def check_rows(table, names, bounds: dict[str, tuple[float, float]], required: set[str]):
    header, rows = table[0], {r[0]: r for r in table[1:]}
    assert set(names) <= set(rows), f"rows missing: {set(names) - set(rows)}"
    for name in names:
        for col, (lo, hi) in bounds.items():
            v = number(rows[name][header.index(col)])
            if col in required or not math.isnan(v):
                assert math.isfinite(v) and lo <= v <= hi, f"{name}: {col} = {v}"


def test_mnist_table_has_a_row_per_method_with_numbers_in_range(smoke):
    out, _ = smoke
    md = section((out / "BENCHMARKS.md").read_text(), "accuracy_mnist_smoke")
    assert "smoke run" in md and "seeds [0]" in md and "Wall time" in md
    learned = tables(md)
    dense, single = learned[0], learned[2]  # learned / fusion tables per label setting
    bounds = {"Dice % vs truth": (0, 100), "GED": (-0.05, 2.0), "ECE %": (0, 100),
              "CM RMSE": (0, 1), "fit s (median)": (0, 600)}
    for table in (dense, single):
        check_rows(table, expected_entries(), bounds,
                   required={"Dice % vs truth", "GED", "ECE %", "fit s (median)"})
        rows = {r[0]: r for r in table[1:]}
        # every method that models raters reports a CM error; the plain U-Nets do not
        for name in ("cm", "tgce"):
            assert math.isfinite(number(rows[name][table[0].index("CM RMSE")]))
        assert math.isnan(number(rows["unet_mv"][table[0].index("CM RMSE")]))
    assert_figures(out, "mnist", ("reliability", "gallery", "cms_dense", "cms_single", "sweep"))
    fusions = learned[1]
    check_rows(fusions, rs.available_methods(learned=False),
               {"Dice % vs truth": (0, 100), "CM RMSE": (0, 1), "GED vs raters": (-0.05, 2.0)},
               required={"Dice % vs truth", "CM RMSE", "GED vs raters"})


def test_classical_fusions_score_as_expected_on_simulated_raters(smoke):
    out, _ = smoke
    report = json.loads((out / "accuracy_mnist_smoke_seed0.json").read_text())
    assert report["partial"] is False
    dense = next(r for r in report["runs"] if r["labels"] == "dense" and r["scale"] == 1.0)
    raters, fusion = dense["rater_dice_test"], dense["fusion"]
    assert raters["blank"] == 0.0 and raters["good"] > 90
    mv = fusion["majority_vote"]["dice"]
    # five raters of whom only "good" is faithful: the vote still recovers the digit,
    # far above every imperfect rater
    assert mv > 85
    assert mv > max(raters[k] for k in ("over", "under", "wrong", "blank")) + 20
    # with 5 binary raters the mean label's argmax is the majority vote
    assert fusion["mean"]["dice"] == pytest.approx(mv)
    # STAPLE over the whole set finds the blank rater: it never says foreground
    cm = fusion["staple (whole set)"]["rater_confusion"]
    assert cm[4][1][1] < 0.05 and cm[4][0][1] > 0.95
    # noisier raters (default strengths x2) fuse worse
    noisy = next(r for r in report["runs"] if r["labels"] == "dense" and r["scale"] == 2.0)
    assert noisy["fusion"]["majority_vote"]["dice"] < mv - 5
    assert max(noisy["rater_dice_test"].values()) < max(raters.values())


def test_lidc_table_and_figures(smoke, shared_dir):
    out, proc = smoke
    md = (out / "BENCHMARKS.md").read_text()
    if not (shared_dir / "data" / "lidc" / "lidc_dev.npz").exists():
        assert "SKIPPED lidc" in proc.stderr
        return
    (table,) = tables(section(md, "accuracy_lidc_smoke"))
    check_rows(table, expected_entries(),
               {"Dice % vs STAPLE": (0, 100), "soft Dice % vs mean": (0, 100), "GED": (-0.05, 2.0),
                "ECE %": (0, 100), "Brier": (0, 1), "entropy MAE": (0, 1e5), "Average": (0, 100)},
               required={"Dice % vs STAPLE", "soft Dice % vs mean", "GED", "ECE %", "Brier"})
    rows = {r[0]: r for r in table[1:]}
    # the 4 radiologists against their own STAPLE consensus agree well
    assert number(rows["*each rater vs STAPLE*"][table[0].index("Average")]) > 60
    # methods that model raters give a per-rater Dice, the plain U-Nets do not
    assert math.isfinite(number(rows["avap"][table[0].index("Average")]))
    assert math.isnan(number(rows["unet_mean"][table[0].index("Average")]))
    assert_figures(out, "lidc", ("reliability", "gallery"))


def assert_figures(out: Path, dataset: str, kinds) -> None:
    for kind in kinds:
        path = out / "images" / f"accuracy_{dataset}_{kind}_smoke.png"
        assert path.is_file() and path.stat().st_size > 5000, path
        assert path.name in (out / "BENCHMARKS.md").read_text()  # linked from the tables

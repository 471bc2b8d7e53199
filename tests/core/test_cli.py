"""The ``raterseg`` command: methods, fuse, demo, progress and bad input (exit 2, one line)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import raterseg as rs
import skimage.io
from raterseg import io as rio
from raterseg import metrics
from raterseg.cli import TextProgress, main
from raterseg.types import TrainingEvent

SPACING = (2.0, 0.5, 0.75)


@pytest.fixture
def case_dir(tmp_path):
    """Three raters and an image as NIfTI files; rater2 misses slice 1, rater3 over-segments."""
    raters = np.zeros((3, 5, 9, 11), np.int16)
    raters[:, 1:4, 2:7, 3:9] = 1
    raters[1, 1] = 0
    raters[2, :, 1:8, 2:10] = 1
    rng = np.random.default_rng(0)
    for r in range(3):
        rio.write_array(tmp_path / f"rater{r + 1}.nii.gz", raters[r], {"spacing": SPACING})
    rio.write_array(tmp_path / "image.nii.gz", rng.random((5, 9, 11)).astype(np.float32),
                    {"spacing": SPACING})
    return tmp_path, raters


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raterseg: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_methods_lists_every_method_and_parameter(capsys):
    code, out, _ = _run(["methods"], capsys)
    assert code == 0
    blocks = {b.split()[0]: b for b in out.split("\n\n")}
    assert list(blocks) == rs.available_methods()
    # every method of DESIGN.md is registered (a module that failed to load would drop out
    # of the list, and the tests parametrised over it would shrink silently)
    assert set(blocks) >= {"majority_vote", "mean", "staple", "spatial_staple", "cm", "tgce",
                           "mrprism", "avap", "unet", "softseg"}
    for name, block in blocks.items():
        cls = rs.get_method(name)
        assert block.startswith(f"{name} ({'learned' if cls.learned else 'classical'})")
        for info in cls.params():
            line = next((ln for ln in block.splitlines() if ln.split()[:1] == [info.name]), None)
            assert line is not None, (name, info.name)
            assert info.help[:40] in line
            assert line.split()[1] == getattr(info.type, "__name__", str(info.type))
    assert "one of lowest|undecided" in out
    code, md, _ = _run(["methods", "--format", "markdown"], capsys)
    assert code == 0 and "### `majority_vote` (classical)" in md
    assert "| `tie` | str | `lowest` |" in md


def test_docs_methods_table_is_current():
    """docs/METHODS.md is the generated table under a short heading: a parameter added or
    changed in a Config must be regenerated there (raterseg methods --format markdown)."""
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "METHODS.md"
    # a fresh process, so nothing earlier tests left in this one can reach the output
    proc = subprocess.run([sys.executable, "-m", "raterseg", "methods", "--format", "markdown"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    # every parameter row has its 4 cells (a bare | in a help text would split one)
    rows = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert rows and all(len(re.split(r"(?<!\\)\|", ln)) == 6 for ln in rows), rows
    body = doc.read_text()
    assert body.endswith(md), "docs/METHODS.md is stale: regenerate it with " \
        "`raterseg methods --format markdown` (keeping its first 4 lines)"


@pytest.mark.parametrize("method, params", [("majority_vote", {"tie": "undecided"}),
                                            ("mean", {})])
def test_fuse_files_matches_the_api(case_dir, capsys, method, params):
    folder, raters = case_dir
    sets = [a for k, v in params.items() for a in ("--set", f"{k}={v}")]
    argv = ["fuse", *(folder / f"rater{r}.nii.gz" for r in (1, 2, 3)), "--image",
            folder / "image.nii.gz", "--method", method, *sets, "-o", folder / "out", "-q"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    want = rs.fuse(raters, method=method, **params)
    truth, meta = rio.read_array(folder / "out" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, want.truth)
    prob, _ = rio.read_array(folder / "out" / "probabilities.nii.gz")
    np.testing.assert_allclose(prob, want.probabilities)
    assert meta["spacing"] == pytest.approx(SPACING)  # geometry of the inputs kept
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["rater_names"] == ["rater1", "rater2", "rater3"]
    assert summary["params"] == {**want.params}
    # the printed table compares each rater with the fused truth
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()
            if re.match(r"rater\d ", ln)}
    assert set(rows) == {"rater1", "rater2", "rater3"}
    table = metrics.rater_table(raters, want.truth)
    assert float(rows["rater2"][0]) == pytest.approx(table[1]["sensitivity"], abs=1e-3)
    assert float(rows["rater3"][2]) == pytest.approx(table[2]["dice"], abs=1e-3)
    assert err == ""  # -q: no progress output


def test_fuse_case_folder_and_python_m(case_dir):
    folder, raters = case_dir
    out = subprocess.run([sys.executable, "-m", "raterseg", "fuse", str(folder), "-m",
                          "majority_vote", "-o", str(folder / "res")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    truth, _ = rio.read_array(folder / "res" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, rs.fuse(raters, method="majority_vote").truth)
    assert "raterseg fuse: 3 raters" in out.stderr


def test_fuse_case_folder_chunked(case_dir, capsys):
    # the case-folder form of fuse works in slabs too (it was refused as "got 'case03'")
    folder, raters = case_dir
    code, _, err = _run(["fuse", folder, "--chunked", "-m", "staple", "-o", folder / "slabs",
                           "-q"], capsys)
    assert code == 0, err
    truth, meta = rio.read_array(folder / "slabs" / "truth.nii")
    np.testing.assert_array_equal(truth, rs.fuse(raters, method="staple").truth)
    assert meta["spacing"] == pytest.approx(SPACING)  # the raters' geometry
    summary = json.loads((folder / "slabs" / "fusion.json").read_text())
    assert summary["rater_names"] == ["rater1", "rater2", "rater3"]
    (folder / "empty").mkdir()
    code, _, err = _run(["fuse", folder / "empty", "--chunked", "-o", folder / "x"], capsys)
    assert code == 2 and "has no rater* files" in err and str(folder / "empty") in err


@pytest.mark.parametrize("method", rs.available_methods(learned=False))
def test_fuse_every_classical_method(tmp_path, capsys, method):
    raters = np.zeros((3, 12, 12), np.int16)
    raters[:, 3:9, 3:9] = 1
    raters[0, 3:9, 8] = 0
    raters[2, 0:2, 0:2] = 1
    for r in range(3):
        rio.write_array(tmp_path / f"r{r}.png", raters[r] * 255)  # 0/255 masks read as 0/1
    code, _, err = _run(["fuse", *(tmp_path / f"r{r}.png" for r in range(3)), "-m", method,
                         "--device", "cpu", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    truth, _ = rio.read_array(tmp_path / "out" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, rs.fuse(raters, method=method, device="cpu").truth)


@pytest.mark.parametrize("make_argv, match", [
    (lambda d: ["fuse", d / "rater1.nii.gz", d / "absent.nii.gz", "-o", d / "o"],
     "raters: no such file or folder"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "maen", "-o", d / "o"],
     "method: .*did you mean 'mean'"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "majority_vote", "--set", "ties=lowest",
                "-o", d / "o"], "ties: not a parameter .*did you mean 'tie'"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "majority_vote", "--set", "tie",
                "-o", d / "o"], "--set: expected key=value"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "cm", "--set", "seed=3", "-o", d / "o"],
     "--set: seed is set with the option --seed"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "staple", "--set", "device=cpu",
                "-o", d / "o"], "--set: device is set with the option --device"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "--image", d / "small.npy", "-m", "mean",
                "-o", d / "o"], r"image \('.*small.npy'\): expected shape \(5, 9, 11\) or \(C, 5, 9, 11\).*\(4, 4\)"),
    (lambda d: ["fuse", d / "rater1.nii.gz", d / "small.npy", "-m", "mean", "-o", d / "o"],
     "raters: expected every rater's labels to have the same shape"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "mean", "--num-classes", "1", "-o", d / "o"],
     "num_classes: expected an integer >= 2"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-m", "mean", "--device", "tpu", "-o", d / "o"],
     "device: expected"),
    (lambda d: ["fuse", d / "notes.txt", "-m", "mean", "-o", d / "o"],
     "raters: expected a file ending in"),
    (lambda d: ["fuse", d / "fake.nii.gz", "-m", "mean", "-o", d / "o"],
     "is not a readable nifti file"),
    (lambda d: ["fuse", d / "rater1.nii.gz", "-o", d / "o", "--seed", "x"],
     "argument --seed: invalid int value"),
    (lambda d: ["fuse", d / "rater1.nii.gz"], "required: --output"),
    (lambda d: ["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_exit_2_one_line(case_dir, capsys, make_argv, match):
    folder, _ = case_dir
    rio.write_array(folder / "small.npy", np.zeros((4, 4), np.int16))
    (folder / "notes.txt").write_text("hello")
    (folder / "fake.nii.gz").write_text("not nifti")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    code, out, err = _run(make_argv(folder), capsys)
    line = _one_error_line(code, err)
    assert re.search(match, line), line
    assert out == ""
    assert not (folder / "o").exists()  # nothing written on bad input
    assert before == {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_case_folder_naming_mistakes_are_explained(tmp_path, capsys):
    # raters not named rater*: the folder was read as a stack of 2D slices, image included,
    # and the message complained about a fractional label
    case = tmp_path / "case"
    case.mkdir()
    rng = np.random.default_rng(0)
    rio.write_array(case / "image.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
    for name in ("seg_A", "seg_B"):
        rio.write_array(case / f"{name}.nii.gz", (rng.random((4, 8, 8)) > 0.5).astype(np.int16))
    code, _, err = _run(["fuse", case, "-m", "staple", "-o", tmp_path / "o"], capsys)
    line = _one_error_line(code, err)
    assert re.search(r"expected rater files \(rater\*.*found none among .*seg_A", line), line
    # a learned method without an image.* file says how to give it one
    for name in ("seg_A", "seg_B"):
        (case / f"{name}.nii.gz").rename(case / f"rater_{name}.nii.gz")
    (case / "image.nii.gz").rename(case / "ct.nii.gz")
    code, _, err = _run(["fuse", case, "-m", "cm", "-o", tmp_path / "o"], capsys)
    assert "pass --image FILE, or name it image.* in the case folder" in _one_error_line(code, err)


def test_stack_npy_with_one_0_255_rater_fuses_as_with_chunked(tmp_path, capsys):
    # one (R, *S) .npy whose first rater was saved as 0/255 and the others as 0/1: each rater
    # is read as a 0/1 mask, in memory as in slabs (--chunked)
    raters = np.zeros((3, 6, 10, 12), np.int16)
    raters[:, 1:5, 2:8, 3:9] = 1
    raters[1, 1, 2:8, 3:9] = 0
    stack = raters.copy()
    stack[0] *= 255
    np.save(tmp_path / "stack.npy", stack)
    for extra in ([], ["--chunked"]):
        out = tmp_path / f"o{len(extra)}"
        code, text, err = _run(["fuse", tmp_path / "stack.npy", "-m", "majority_vote", *extra,
                                "-o", out], capsys)
        assert code == 0, err
        assert "(2 classes" in text
    truth = np.load(tmp_path / "o1" / "truth.npy")
    np.testing.assert_array_equal(truth, rs.fuse(raters, method="majority_vote").truth)
    in_memory, _ = rio.read_array(tmp_path / "o0" / "truth.nii.gz")
    np.testing.assert_array_equal(in_memory, truth)


def test_bad_input_through_the_installed_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "raterseg", "fuse", str(tmp_path / "x.nii.gz"),
                          "-o", str(tmp_path / "o")], capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"raterseg: error: raters: no such file or folder '{tmp_path / 'x.nii.gz'}'"]


def test_demo_small_phantom(tmp_path, capsys):
    outdir = tmp_path / "demo"
    code, out, err = _run(["demo", "-o", outdir, "--shape", "12,24,24", "--raters", "3",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    methods = rs.available_methods(learned=False)
    # the written raters and image form a case folder; fusing it again gives the same truth
    case = rio.read_case(outdir)
    assert case.rater_names == ["rater1", "rater2", "rater3"] and case.image.shape == (12, 24, 24)
    known, _ = rio.read_array(outdir / "known_truth.nii.gz")
    for m in methods:
        truth, _ = rio.read_array(outdir / m / "truth.nii.gz")
        np.testing.assert_array_equal(truth, rs.fuse(case.raters, method=m, device="cpu").truth)
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [m])
        dice = metrics.dice(truth, known)
        assert float(line.split()[1]) == pytest.approx(dice, abs=1e-3)
    table = metrics.rater_table(case.raters, known)
    for r, row in enumerate(table):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"rater{r + 1} "))
        assert [float(v) for v in line.split()[2:5]] == pytest.approx(
            [row["sensitivity"], row["specificity"], row["dice"]], abs=1e-3)
    assert "fusing with" in err


def test_demo_method_choice(tmp_path, capsys):
    code, out, err = _run(["demo", "-o", tmp_path, "--shape", "8,16,16", "--raters", "2",
                           "--methods", "mean", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mean"]
    assert "mean " in out and "staple" not in out
    code, _, err = _run(["demo", "-o", tmp_path, "--methods", "mean,staplee"], capsys)
    assert "did you mean 'staple'" in _one_error_line(code, err)
    code, _, err = _run(["demo", "-o", tmp_path, "--shape", "8,16"], capsys)
    assert "--shape: expected three sizes" in _one_error_line(code, err)


def test_demo_says_n_a_for_a_class_no_rater_drew(tmp_path, capsys, monkeypatch):
    """Raters that draw nothing: no voxel is class 1 in the fused truth, so each rater's
    sensitivity estimate is undefined (a NaN column), printed as n/a, not 'nan'."""
    from raterseg import synth

    shape = (8, 16, 16)
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    known = np.zeros(shape, np.int16)
    known[2:6, 4:12, 4:12] = 1
    monkeypatch.setattr(synth, "sample_case",
                        lambda **kw: (image, np.zeros((2, *shape), np.int16), known))
    code, out, err = _run(["demo", "-o", tmp_path, "--shape", "8,16,16", "--raters", "2",
                           "--methods", "staple", "-q"], capsys)
    assert code == 0, err
    estimates = out.split("(from rater_confusion):")[1].splitlines()
    rows = [ln.split() for ln in estimates if ln.startswith(("rater1", "rater2"))]
    assert rows == [["rater1", "n/a", "/", "1.000"], ["rater2", "n/a", "/", "1.000"]], out
    assert "nan" not in out


def test_text_progress_is_short_in_logs_and_draws_in_place_on_a_terminal():
    log = io.StringIO()
    bar = TextProgress("staple", stream=log, width=10)
    for i in range(1, 101):
        bar(TrainingEvent(i, 100, f"iteration {i}", {"change": 1.0 / i}))
    bar.close()
    lines = log.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("staple [##########] 100/100 iteration 100 change=0.01")
    # numbers the message gives are not repeated as metrics; the others are shown
    epoch = io.StringIO()
    TextProgress("cm", stream=epoch, width=4)(TrainingEvent(
        4, 4, "cm: epoch 4/4, loss 0.4100, val_loss 0.3800", {"loss": 0.41, "val_loss": 0.38,
                                                             "trace": 1.5}))
    assert epoch.getvalue().strip() == "cm [####] 4/4 epoch 4/4, loss 0.4100, val_loss 0.3800 trace=1.5"

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    bar = TextProgress("cm", stream=tty, width=4)
    for i in range(1, 5):
        bar(TrainingEvent(i, 4, "epoch"))
    bar.close()
    text = tty.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    quiet = io.StringIO()
    TextProgress(stream=quiet, quiet=True)(TrainingEvent(1, 1))
    assert quiet.getvalue() == ""


def test_text_progress_shows_where_early_stopping_ended():
    log = io.StringIO()
    bar = TextProgress("staple", stream=log, width=10)
    for i in range(1, 8):  # EM converged after 7 of at most 1000 iterations
        bar(TrainingEvent(i, 1000, f"EM iteration {i}"))
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("staple [----------] 1/1000")
    assert lines[1].startswith("staple [----------] 7/1000 EM iteration 7")
    tty = type("Tty", (io.StringIO,), {"isatty": lambda self: True})()
    bar = TextProgress("staple", stream=tty)
    for i in range(1, 8):
        bar(TrainingEvent(i, 1000, "EM"))
    bar.close()
    assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1


def test_text_progress_keeps_the_end_of_each_phase():
    """Chunked STAPLE reports slabs, then EM iterations (stopping long before the limit),
    then slabs again: where EM stopped must show in a log, not be overwritten by the next
    phase; and the method's name is not printed twice when the message repeats it."""
    log = io.StringIO()
    bar = TextProgress("staple", stream=log, width=10)
    for i in range(1, 49):
        bar(TrainingEvent(i, 10000, f"staple: EM iteration {i}"))
    bar(TrainingEvent(1, 1, "staple: writing, slab 1/1"))
    bar.close()
    lines = log.getvalue().splitlines()
    assert [ln.split("] ")[1] for ln in lines] == [
        "1/10000 EM iteration 1", "48/10000 EM iteration 48", "1/1 writing, slab 1/1"]
    tty = type("Tty", (io.StringIO,), {"isatty": lambda self: True})()
    bar = TextProgress("staple", stream=tty)
    for i in range(1, 8):
        bar(TrainingEvent(i, 1000, "EM"))
    for i in range(1, 3):
        bar(TrainingEvent(i, 4, "writing"))
    bar.close()
    finished = [seg.rsplit("\r", 1)[-1] for seg in tty.getvalue().split("\n")[:-1]]
    assert len(finished) == 2 and "7/1000 EM" in finished[0] and "2/4 writing" in finished[1]


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """An output folder that cannot be written (read-only mount, someone else's folder) or
    created (a file in the way) is one line naming --output, before any fusion: not a
    traceback from the chunked writers or fuse-dir's summary, nor an error after the work."""
    import os

    raters = np.zeros((3, 4, 6, 8), np.int16)
    raters[:, 1:3, 2:5, 2:6] = 1
    for r in range(3):
        np.save(tmp_path / f"rater{r + 1}.npy", raters[r])
    np.save(tmp_path / "raters.npy", raters)
    (tmp_path / "cohort" / "case1").mkdir(parents=True)
    for r in range(3):
        np.save(tmp_path / "cohort" / "case1" / f"rater{r + 1}.npy", raters[r])
    (tmp_path / "afile").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked
                        and real_access(p, mode, **kw))
    files = [tmp_path / f"rater{r + 1}.npy" for r in range(3)]
    for out, why in [(locked, "not writable"), (locked / "sub", "not writable"),
                     (tmp_path / "afile" / "sub", "not a folder")]:
        for argv in (["fuse", *files, "-m", "mean", "-o", out],
                     ["fuse", tmp_path / "raters.npy", "--chunked", "-o", out],
                     ["fuse-dir", tmp_path / "cohort", "-o", out],
                     ["demo", "--shape", "8,8,8", "--raters", "2", "-o", out]):
            code, out_text, err = _run(argv, capsys)
            line = _one_error_line(code, err)
            assert line.startswith("raterseg: error: --output: ") and why in line, line
            assert out_text == ""
    assert list(locked.iterdir()) == []


def test_fuse_one_npy_stack_as_with_chunked(tmp_path, capsys):
    """`raterseg fuse raters.npy` takes one (R, *S) .npy as R raters, as `--chunked` does,
    instead of one rater of shape (R, *S)."""
    raters = np.zeros((3, 4, 6, 8), np.int16)
    raters[:, 1:3, 2:5, 2:6] = 1
    raters[2, :, 0, 0] = 1
    np.save(tmp_path / "raters.npy", raters)
    code, out, err = _run(["fuse", tmp_path / "raters.npy", "-m", "staple", "-o",
                           tmp_path / "mem", "-q"], capsys)
    assert code == 0, err
    code, _, err = _run(["fuse", tmp_path / "raters.npy", "-m", "staple", "--chunked", "-o",
                             tmp_path / "chunked", "-q"], capsys)
    assert code == 0, err
    truth, _ = rio.read_array(tmp_path / "mem" / "truth.nii.gz")
    np.testing.assert_array_equal(truth, rs.fuse(raters, method="staple").truth)
    np.testing.assert_array_equal(truth, np.load(tmp_path / "chunked" / "truth.npy"))
    assert "fused 3 raters" in out and "rater3" in out


def test_case_folders_among_several_raters_point_to_fuse_dir(tmp_path, capsys):
    for case in ("case1", "case2"):
        (tmp_path / case).mkdir()
        for r in range(2):
            np.save(tmp_path / case / f"rater{r + 1}.npy", np.eye(4, dtype=np.int16))
        np.save(tmp_path / case / "image.npy", np.random.default_rng(0).random((4, 4)))
    for argv in (["fuse", tmp_path / "case1", tmp_path / "case2", "-o", tmp_path / "o"],
                 ["fuse", tmp_path, "-o", tmp_path / "o"]):
        code, _, err = _run(argv, capsys)
        line = _one_error_line(code, err)
        assert "case folder" in line and "fuse-dir" in line, line
    assert not (tmp_path / "o").exists()


def test_train_labels_beyond_num_classes_one_line_before_progress(tmp_path, capsys):
    raters = np.zeros((2, 2, 8, 8), np.int16)
    raters[0, 0, 2:5, 2:5] = 3
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 8, 8), np.float32), raters=raters)
    code, out, err = _run(["train", tmp_path / "d.npz", "-m", "cm", "--num-classes", "2",
                           "-o", tmp_path / "m.safetensors"], capsys)
    line = _one_error_line(code, err)
    assert "0..1" in line and "got a label 3" in line and "--num-classes" in line, line
    assert out == "" and not (tmp_path / "m.safetensors").exists()


def test_fuse_never_writes_over_its_inputs(case_dir, capsys):
    """An input named like an output (truth.nii.gz) in the output folder is not overwritten,
    and the case folder itself is refused as output: its rater_maps.nii.gz would read as a
    rater the next time the case is fused."""
    folder, _ = case_dir
    (folder / "rater3.nii.gz").rename(folder / "truth.nii.gz")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for argv in (["fuse", folder / "rater1.nii.gz", folder / "rater2.nii.gz",
                  folder / "truth.nii.gz", "-m", "mean", "-o", folder],
                 ["fuse", folder, "-m", "spatial_staple", "-o", folder]):
        code, out, err = _run(argv, capsys)
        line = _one_error_line(code, err)
        assert line.startswith("raterseg: error: --output: "), line
        assert out == ""
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_output_piped_into_head_is_no_traceback(monkeypatch, capsys):
    """`raterseg methods | head -3`: the reader goes away; the command ends quietly (as
    shell tools do) instead of a BrokenPipeError traceback."""

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise io.UnsupportedOperation("no file descriptor")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["methods"])
    assert code == 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    assert "Traceback" not in capsys.readouterr().err


def test_nifti_raters_on_different_voxel_grids_are_refused(case_dir, capsys):
    """Two label files of one shape whose NIfTI affines disagree (one flipped left-right,
    or shifted) do not label the same voxels: fusing them voxel by voxel is wrong, so the
    command refuses, naming the file (SimpleITK's STAPLE filters refuse them too). A
    header that differs by float rounding is the same grid."""
    import nibabel as nib

    folder, _ = case_dir
    img = nib.load(folder / "rater2.nii.gz")
    data = np.asarray(img.dataobj)
    flipped = img.affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0],
                                     [0, 0, 1, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(data[::-1], flipped), folder / "flipped.nii.gz")
    shifted = img.affine.copy()
    shifted[:3, 3] += 2.0
    nib.save(nib.Nifti1Image(data, shifted), folder / "shifted.nii.gz")
    rounded = img.affine.copy()
    rounded[:3, 3] += 1e-6
    nib.save(nib.Nifti1Image(data, rounded), folder / "rounded.nii.gz")
    for name in ("flipped", "shifted"):
        code, _, err = _run(["fuse", folder / "rater1.nii.gz", folder / f"{name}.nii.gz",
                             "-m", "mean", "-o", folder / "o"], capsys)
        line = _one_error_line(code, err)
        assert f"{name}.nii.gz" in line and "rater1.nii.gz" in line and "grid" in line, line
    code, _, err = _run(["fuse", folder / "rater1.nii.gz", folder / "rater3.nii.gz",
                         "--image", folder / "shifted.nii.gz", "-m", "mean", "-o", folder / "o"],
                        capsys)
    assert "shifted.nii.gz" in _one_error_line(code, err)
    code, _, err = _run(["fuse", folder / "rater1.nii.gz", folder / "rounded.nii.gz",
                         "-m", "mean", "-o", folder / "o", "-q"], capsys)
    assert code == 0, err


def test_predict_writes_no_disagreement_map_without_raters(tmp_path, capsys):
    """predict has no raters, so there is no observed disagreement: no all-zero map that
    reads as 'the raters agreed everywhere'."""
    import torch

    torch.set_num_threads(1)
    from raterseg import synth

    cases = [synth.sample_case(dims=2, num_raters=2, seed=i, shape=(16, 16)) for i in range(2)]
    model = rs.create("unet", epochs=1, features=(4, 4, 4, 4, 4), batch_size=2, device="cpu")
    model.fit(np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases]))
    model.save(tmp_path / "m.safetensors")
    rio.write_array(tmp_path / "new.nii.gz", cases[0][0])
    code, _, err = _run(["predict", tmp_path / "m.safetensors", tmp_path / "new.nii.gz",
                         "--device", "cpu", "-q", "-o", tmp_path / "pred"], capsys)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "pred" / "new").iterdir())
    assert "truth.nii.gz" in files and "uncertainty.nii.gz" in files
    assert "disagreement.nii.gz" not in files
    summary = json.loads((tmp_path / "pred" / "new" / "summary.json").read_text())
    assert "disagreement" not in summary["files"]


def _square_raters() -> np.ndarray:
    raters = np.zeros((3, 12, 10), np.uint8)
    raters[0, 2:9, 2:8] = 1
    raters[1, 1:10, 2:8] = 1
    raters[2, 3:8, 3:7] = 1
    return raters


def test_npz_of_raters_fuses_like_the_npy_stack(tmp_path, capsys):
    """An .npz given alone: its (R, *S) array under 'raters' is R raters (0/255 raters read
    as 0/1 one by one, as for .npy); an image beside it is the case's image, not a rater;
    arrays under other names are one rater each, named by their key."""
    raters = _square_raters()
    want = rs.fuse(raters.astype(np.int16), method="staple").truth
    stack = raters.copy()
    stack[1] *= 255  # one rater saved as a 0/255 mask
    rng = np.random.default_rng(0)
    np.save(tmp_path / "raters.npy", stack)
    np.savez(tmp_path / "raters.npz", raters=stack)
    np.savez(tmp_path / "case.npz", image=rng.random((12, 10)).astype(np.float32), raters=stack)
    np.savez(tmp_path / "named.npz", alice=raters[0], bob=raters[1], carol=raters[2])
    for name in ("raters.npy", "raters.npz", "case.npz", "named.npz"):
        code, out, err = _run(["fuse", tmp_path / name, "-m", "staple", "-o",
                               tmp_path / name.replace(".", "_"), "-q"], capsys)
        assert code == 0, (name, err)
        assert "fused 3 raters (2 classes, shape (12, 10))" in out, (name, out)
        truth, _ = rio.read_array(tmp_path / name.replace(".", "_") / "truth.nii.gz")
        np.testing.assert_array_equal(truth, want)
    csv = (tmp_path / "named_npz" / "rater_confusion.csv").read_text()
    assert {ln.split(",")[0] for ln in csv.splitlines()[1:]} == {"alice", "bob", "carol"}
    summary = json.loads((tmp_path / "case_npz" / "summary.json").read_text())
    assert summary["rater_names"] == ["rater1", "rater2", "rater3"]
    # the image of case.npz is the image: a learned method gets it without --image
    code, _, err = _run(["fuse", tmp_path / "raters.npz", "-m", "cm", "-o", tmp_path / "x"],
                        capsys)
    assert "needs the image" in _one_error_line(code, err)


def test_npz_raters_beside_an_image_an_affine_or_a_truth(tmp_path, capsys):
    # archives users make: the label array is the raters, the rest is left alone
    r = _square_raters()
    img = np.random.default_rng(0).random(r.shape[1:]).astype(np.float32)
    cases = {"vol_seg": {"vol": img, "seg": r[0]},
             "seg_affine": {"seg": r[0], "affine": np.eye(4)},
             "raters_truth": {"raters": r, "truth": r[0]}}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        code, out, err = _run(["fuse", tmp_path / f"{name}.npz", "-m", "majority_vote", "-o",
                               tmp_path / name], capsys)
        assert code == 0, (name, err)
        n = 3 if name == "raters_truth" else 1
        assert f"fused {n} rater" in out, (name, out)
    # several rater files, each with a spacing beside its mask
    for i in range(3):
        np.savez(tmp_path / f"r{i}.npz", data=r[i], spacing=np.array([0.5, 0.5]))
    code, out, err = _run(["fuse", *(tmp_path / f"r{i}.npz" for i in range(3)), "-o",
                           tmp_path / "three"], capsys)
    assert code == 0 and "fused 3 raters" in out, err


def test_npz_arrays_that_are_not_one_rater_each_are_refused(tmp_path, capsys):
    r = _square_raters()
    np.savez(tmp_path / "shapes.npz", alice=r[0], bob=r[1, :5])
    np.savez(tmp_path / "image.npz", image=np.zeros((12, 10), np.float32))
    np.savez(tmp_path / "two.npz", alice=r[0], bob=r[1])
    np.save(tmp_path / "carol.npy", r[2])
    # a rater key beside other rater-like arrays: which are the raters? (was: 'mask' alone,
    # 'mask_bob' silently dropped)
    np.savez(tmp_path / "mixed.npz", mask=r[0], mask_bob=r[1])
    for argv, match in [
        ([tmp_path / "shapes.npz"], r"one rater each .*'alice' \(12, 10\).*'bob' \(5, 10\)"),
        ([tmp_path / "image.npz"], r"expected raters in .*image.npz.*got only \['image'\]"),
        ([tmp_path / "two.npz", tmp_path / "carol.npy"], r"one rater in .*two.npz.*alice"),
        ([tmp_path / "mixed.npz"], r"holds \['mask'\] and other rater-like arrays \['mask_bob'\]"),
    ]:
        code, _, err = _run(["fuse", *argv, "-o", tmp_path / "o"], capsys)
        assert re.search(match, _one_error_line(code, err)), err
    assert not (tmp_path / "o").exists()


def test_image_without_geometry_keeps_the_raters_nifti_geometry(case_dir, capsys):
    """NIfTI raters with a TIFF, .npy or PNG image: the outputs carry the raters' affine,
    not the identity of a file that has none."""
    folder, _ = case_dir
    image, _ = rio.read_array(folder / "image.nii.gz")
    np.save(folder / "image.npy", image)
    _, rater_meta = rio.read_array(folder / "rater1.nii.gz")
    code, _, err = _run(["fuse", folder / "rater1.nii.gz", folder / "rater2.nii.gz",
                         "--image", folder / "image.npy", "-m", "mean", "-o", folder / "o",
                         "-q"], capsys)
    assert code == 0, err
    _, meta = rio.read_array(folder / "o" / "truth.nii.gz")
    np.testing.assert_allclose(meta["affine"], rater_meta["affine"])
    assert meta["spacing"] == pytest.approx(SPACING)


def test_nifti_mixed_with_nibabel_order_npy_is_explained(tmp_path, capsys):
    """A .npy saved from nibabel's (x, y, z) array beside NIfTI raters: its shape is the
    reverse of theirs, and the error says so; in a cube the shapes cannot tell, so the
    command fuses and notes the axis order on stderr."""
    for shape in ((6, 8, 10), (8, 8, 8)):
        data = np.zeros(shape, np.uint8)  # (x, y, z), as nibabel gives it
        data[1:5, 2:6, 3:7] = 1
        for i in (1, 2):
            rio.write_array(tmp_path / f"r{i}.nii.gz", data.T)  # written back as (x, y, z)
        np.save(tmp_path / "r3.npy", data)
        code, _, err = _run(["fuse", tmp_path / "r1.nii.gz", tmp_path / "r2.nii.gz",
                             tmp_path / "r3.npy", "-m", "mean", "-o", tmp_path / f"o{shape[0]}"],
                            capsys)
        if shape[0] != shape[2]:
            line = _one_error_line(code, err)
            assert "(10, 8, 6)" in line and "(6, 8, 10)" in line and "axes reversed?" in line
            assert "with .T" in line
        else:
            assert code == 0, err
            notes = [ln for ln in err.splitlines() if "note:" in ln]
            assert len(notes) == 1 and "(z, y, x)" in notes[0] and ".T" in notes[0], err
    # NIfTI raters alone: no note
    code, _, err = _run(["fuse", tmp_path / "r1.nii.gz", tmp_path / "r2.nii.gz", "-m", "mean",
                         "-o", tmp_path / "o", "-q"], capsys)
    assert code == 0 and "note:" not in err


def test_raters_sharing_a_file_name_are_named_by_their_folders(case_dir, capsys):
    folder, _ = case_dir
    paths = []
    for i, who in enumerate(["alice", "bob", "carol"]):
        (folder / who).mkdir()
        (folder / f"rater{i + 1}.nii.gz").rename(folder / who / "mask.nii.gz")
        paths.append(folder / who / "mask.nii.gz")
    code, out, err = _run(["fuse", *paths, "-m", "mean", "-o", folder / "o", "-q"], capsys)
    assert code == 0, err
    assert [ln.split()[0] for ln in out.splitlines()[4:7]] == ["alice", "bob", "carol"]
    summary = json.loads((folder / "o" / "summary.json").read_text())
    assert summary["rater_names"] == ["alice", "bob", "carol"]


def test_distinct_names(tmp_path):
    from raterseg.datasets import distinct_names as _distinct_names

    assert _distinct_names(["a/x.nii", "b/y.nii"], ["x", "y"]) == ["x", "y"]
    assert _distinct_names(["a/m.nii", "b/m.nii", "c.nii"], ["m", "m", "c"]) == ["a", "b", "c"]
    # a parent name taken by another input: parent/name
    assert _distinct_names(["a/m.nii", "b/m.nii", "a.nii"], ["m", "m", "a"]) == \
        ["a/m", "b/m", "a"]
    # one folder: numbered
    assert _distinct_names(["a/m.nii", "a/m.nii.gz"], ["m", "m"], sep="_") == ["m", "m_2"]
    # case folders of two sites sharing a case name keep it (the site alone named one case)
    cases = [tmp_path / "A" / "case00", tmp_path / "A" / "case01", tmp_path / "B" / "case00"]
    for c in cases:
        c.mkdir(parents=True)
    assert _distinct_names(cases, ["case00", "case01", "case00"], sep="_") == \
        ["A_case00", "case01", "B_case00"]
    # their images: the case folder's name clashes too, so the site's is added
    images = [c / "image.nii.gz" for c in (cases[0], cases[2])]
    assert _distinct_names(images, ["image", "image"], sep="_") == ["A_case00", "B_case00"]


def test_rater_table_title_says_what_is_measured(tmp_path, capsys):
    raters = np.zeros((3, 6, 8), np.int16)
    raters[:, 1:4, 1:4] = 1
    raters[:, 4:6, 5:8] = 2
    np.save(tmp_path / "r.npy", raters)
    code, out, err = _run(["fuse", tmp_path / "r.npy", "-m", "mean", "-o", tmp_path / "o", "-q"],
                          capsys)
    assert code == 0, err
    assert "Dice: mean over labels 1..2" in out and "any label > 0" in out
    np.save(tmp_path / "b.npy", (raters > 0).astype(np.int16))
    code, out, err = _run(["fuse", tmp_path / "b.npy", "-m", "mean", "-o", tmp_path / "p", "-q"],
                          capsys)
    assert code == 0 and "(label 1 vs 0)" in out and "mean over" not in out
    # a rater who left a quarter unannotated shows it: its other numbers are 1.000 too
    part = (raters > 0).astype(np.int16)
    part[1, :, 6:] = -1
    np.save(tmp_path / "c.npy", part)
    code, out, err = _run(["fuse", tmp_path / "c.npy", "-m", "majority_vote", "-o",
                           tmp_path / "q", "-q"], capsys)
    assert code == 0, err
    header = next(ln for ln in out.splitlines() if ln.startswith("rater "))
    assert header.split()[-1] == "annotated"
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("rater")}
    assert rows["rater2"] == ["1.000", "1.000", "1.000", "0.750"], out
    assert rows["rater1"][-1] == "1.000"


def test_messages_name_the_command_line_options(case_dir, tmp_path, capsys):
    folder, _ = case_dir
    grey = np.zeros((8, 8), np.uint8)
    grey[2:6, 2:6] = 255
    grey[2, 2:6] = 128  # an anti-aliased edge
    for i in (1, 2):
        skimage.io.imsave(tmp_path / f"aa{i}.png", grey, check_contrast=False)
    code, _, err = _run(["fuse", tmp_path / "aa1.png", tmp_path / "aa2.png", "-o",
                         tmp_path / "o"], capsys)
    line = _one_error_line(code, err)
    assert "--num-classes 256" in line and "num_classes=" not in line, line
    # the image on another grid: either may be resampled
    import nibabel as nib

    img = nib.load(folder / "image.nii.gz")
    shifted = img.affine.copy()
    shifted[:3, 3] += 3.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), folder / "moved.nii.gz")
    code, _, err = _run(["fuse", folder / "rater1.nii.gz", folder / "rater2.nii.gz", "--image",
                         folder / "moved.nii.gz", "-o", tmp_path / "o"], capsys)
    assert "resample the image or the labels" in _one_error_line(code, err)


def test_threads_option(case_dir, capsys, monkeypatch):
    import torch

    folder, _ = case_dir
    before = torch.get_num_threads()
    try:
        code, _, err = _run(["fuse", folder, "-m", "mean", "--threads", "1", "-o", folder / "o",
                             "-q"], capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    code, _, err = _run(["fuse", folder, "--threads", "0", "-o", folder / "o"], capsys)
    assert "--threads: expected a positive" in _one_error_line(code, err), err
    # fuse-dir: --threads is each worker process's (with --workers 1, this process's)
    import raterseg.cohort

    seen = {}
    monkeypatch.setattr(raterseg.cohort, "fuse_cohort",
                        lambda *a, **kw: seen.update(kw) or [])
    try:
        code, _, err = _run(["fuse-dir", folder, "--workers", "2", "--threads", "1", "--force",
                             "-o", folder / "o"], capsys)
    finally:
        torch.set_num_threads(before)
    assert code == 0, err
    assert (seen["workers"], seen["threads"], seen["force"]) == (2, 1, True)
    for command in ("fuse", "fuse-dir", "train", "predict", "demo"):
        assert main([command, "--help"]) == 0
        assert "--threads N" in capsys.readouterr().out, command


def test_fuse_dir_says_when_cases_have_fewer_classes(tmp_path, capsys):
    # a case where nobody drew class 2 gets 2-class outputs beside 3-class ones (the default
    # is per case); the run says so and how to get one layout
    for i in range(3):
        lab = np.zeros((3, 6, 8, 8), np.int16)
        lab[:, 1:5, 2:6, 2:6] = 1
        if i != 1:
            lab[:, 2:4, 3:5, 3:5] = 2
        for r in range(3):
            rio.write_array(tmp_path / "c" / f"case{i}" / f"rater{r + 1}.nii.gz", lab[r])
    code, _, err = _run(["fuse-dir", tmp_path / "c", "-m", "majority_vote", "-o",
                         tmp_path / "o", "-q"], capsys)
    assert code == 0
    assert "1 case (case1) had fewer classes than the 3" in err and "--num-classes 3" in err
    probs = [rio.read_array(tmp_path / "o" / f"case{i}" / "probabilities.nii.gz")[0].shape[0]
             for i in range(3)]
    assert probs == [3, 2, 3]
    code, _, err = _run(["fuse-dir", tmp_path / "c", "-m", "majority_vote", "-o",
                         tmp_path / "o3", "-q", "--num-classes", "3"], capsys)
    assert code == 0 and "fewer classes" not in err
    assert rio.read_array(tmp_path / "o3" / "case1" / "probabilities.nii.gz")[0].shape[0] == 3

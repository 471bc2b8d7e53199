"""Fusing a cohort folder: same results as rs.fuse per case, failures reported and skipped,
reruns resume, several workers give the same outputs, summary.csv holds the rater table."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import raterseg as rs
from raterseg import io as rio
from raterseg import metrics, synth
from raterseg.cli import main
from raterseg.cohort import MARKER, fuse_cohort, load_training_set

# (dims, shape, raters) of the six synthetic cases
CASES = [(2, (32, 32), 3), (2, (24, 40), 4), (3, (8, 24, 24), 3), (2, (32, 32), 5),
         (3, (10, 16, 20), 4), (2, (16, 16), 2)]


def _write_cohort(root, cases=CASES):
    data = {}
    for i, (dims, shape, n_r) in enumerate(cases):
        image, raters, _ = synth.sample_case(dims=dims, num_raters=n_r, seed=i, shape=shape)
        folder = root / f"case{i + 1}"
        rio.write_array(folder / "image.nii.gz", image, {"spacing": (1.5,) * dims})
        for r in range(n_r):
            rio.write_array(folder / f"rater{r + 1}.nii.gz", raters[r], {"spacing": (1.5,) * dims})
        data[folder.name] = raters
    return data


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    return root, _write_cohort(root)


@pytest.fixture(scope="module")
def fused(cohort, tmp_path_factory):
    """The cohort fused once with staple in-process."""
    root, _ = cohort
    out = tmp_path_factory.mktemp("fused")
    events = []
    rows = fuse_cohort(root, out, "staple", progress=events.append)
    return out, rows, events


def _truths(out, names):
    return {n: rio.read_array(out / n / "truth.nii.gz")[0] for n in names}


def test_every_case_equals_rs_fuse(cohort, fused):
    _, data = cohort
    out, rows, events = fused
    assert [r["case"] for r in rows] == list(data)
    assert all(r["status"] == "fused" and r["error"] == "" for r in rows)
    assert [(e.step, e.total) for e in events] == [(i + 1, len(data)) for i in range(len(data))]
    for name, raters in data.items():
        want = rs.fuse(raters, method="staple")
        truth, meta = rio.read_array(out / name / "truth.nii.gz")
        np.testing.assert_array_equal(truth, want.truth)
        prob, _ = rio.read_array(out / name / "probabilities.nii.gz")
        np.testing.assert_allclose(prob, want.probabilities, atol=1e-6)
        assert meta["spacing"] == pytest.approx((1.5,) * raters[0].ndim)  # geometry kept
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["rater_names"] == [f"rater{r + 1}" for r in range(len(raters))]


def test_summary_csv_holds_each_rater_against_the_fused_truth(cohort, fused):
    _, data = cohort
    out = fused[0]
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == sum(len(r) for r in data.values())  # one row per rater of each case
    for name, raters in data.items():
        mine = [t for t in table if t["case"] == name]
        truth = rs.fuse(raters, method="staple").truth
        want = metrics.rater_table(raters, truth)
        assert [t["rater"] for t in mine] == [f"rater{r + 1}" for r in range(len(raters))]
        for t, w in zip(mine, want):
            assert t["status"] == "fused" and t["method"] == "staple" and t["error"] == ""
            assert int(t["voxels"]) == truth.size and int(t["raters"]) == len(raters)
            assert float(t["seconds"]) >= 0
            for k in ("sensitivity", "specificity", "dice"):
                assert float(t[k]) == pytest.approx(w[k], abs=1e-5), (name, k)


def test_rerun_skips_finished_cases_and_redoes_incomplete_ones(cohort, fused, tmp_path):
    root, data = cohort
    out = tmp_path / "out"
    shutil.copytree(fused[0], out)
    names = list(data)
    mtimes = {n: (out / n / "truth.nii.gz").stat().st_mtime_ns for n in names}
    rows = fuse_cohort(root, out, "staple")
    assert [r["status"] for r in rows] == ["skipped"] * len(names)
    assert {n: (out / n / "truth.nii.gz").stat().st_mtime_ns for n in names} == mtimes
    # the summary still holds the statistics of the skipped cases
    assert (out / "summary.csv").read_text() == (fused[0] / "summary.csv").read_text() \
        .replace(",fused,", ",skipped,")
    # an interrupted case (no marker) and a case with a lost file are fused again
    (out / "case2" / MARKER).unlink()
    (out / "case5" / "uncertainty.nii.gz").unlink()
    rows = fuse_cohort(root, out, "staple")
    assert [r["case"] for r in rows if r["status"] == "fused"] == ["case2", "case5"]
    assert (out / "case5" / "uncertainty.nii.gz").is_file()
    assert (out / "case1" / "truth.nii.gz").stat().st_mtime_ns == mtimes["case1"]
    # a parameter given at its default is the same run: nothing redone (it redid every case)
    rows = fuse_cohort(root, out, "staple", max_iterations=10000, tolerance="0")
    assert [r["status"] for r in rows] == ["skipped"] * len(names)
    for n in names:  # a marker that recorded a default (earlier versions did) matches too
        marker = json.loads((out / n / MARKER).read_text())
        marker["params"] = {"max_iterations": 10000}
        (out / n / MARKER).write_text(json.dumps(marker))
    rows = fuse_cohort(root, out, "staple")
    assert [r["status"] for r in rows] == ["skipped"] * len(names)
    assert (out / "case1" / "truth.nii.gz").stat().st_mtime_ns == mtimes["case1"]
    # a case fused there again by hand with another method keeps the marker and the same
    # file names: it is not taken for the staple result (it was skipped, summary.csv said
    # staple of mean's files)
    rio.write_result(out / "case1", rs.fuse(data["case1"], method="mean"))
    rows = fuse_cohort(root, out, "staple")
    assert [(r["case"], r.get("replaced")) for r in rows if r["status"] == "fused"] == [
        ("case1", "staple, result since rewritten by mean")]
    summary = json.loads((out / "case1" / "summary.json").read_text())
    assert summary["method"] == "staple"
    # another method or parameter is not "finished": everything is redone
    rows = fuse_cohort(root, out, "majority_vote", tie="undecided")
    assert [r["status"] for r in rows] == ["fused"] * len(names)
    # ... and each row says which earlier result it replaced
    assert {r.get("replaced") for r in rows} == {"staple"}
    rows = fuse_cohort(root, out, "majority_vote")
    assert {r.get("replaced") for r in rows} == {'majority_vote {"tie": "undecided"}'}
    rows = fuse_cohort(root, out, "majority_vote", seed=3)  # a setting: named with its value
    assert {r.get("replaced") for r in rows} == {"majority_vote, seed 0"}
    (out / "case1" / "uncertainty.nii.gz").unlink()  # a repair replaces nothing
    rows = fuse_cohort(root, out, "majority_vote", seed=3)
    assert [r.get("replaced") for r in rows if r["status"] == "fused"] == [None]
    rows = fuse_cohort(root, out, "majority_vote", tie="undecided")
    for name, raters in data.items():
        np.testing.assert_array_equal(rio.read_array(out / name / "truth.nii.gz")[0],
                                      rs.fuse(raters, method="majority_vote",
                                              tie="undecided").truth)


def test_a_corrupt_case_is_reported_and_skipped(cohort, tmp_path, capsys):
    root, data = cohort
    shutil.copytree(root, tmp_path / "c")
    (tmp_path / "c" / "case3" / "rater2.nii.gz").write_bytes(b"not a nifti file")
    shutil.copytree(root / "case1", tmp_path / "c" / "case7")
    rio.write_array(tmp_path / "c" / "case7" / "rater3.nii.gz", np.zeros((5, 5), np.int16))
    code = main(["fuse-dir", str(tmp_path / "c"), "-m", "majority_vote", "-o",
                 str(tmp_path / "out"), "-q"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith("raterseg fuse-dir: case 'case3' failed: raters: ")
    assert "rater2.nii.gz' is not a readable nifti file" in lines[0]
    assert lines[1].startswith("raterseg fuse-dir: case 'case7' failed: raters: expected every "
                               "rater in")
    with open(tmp_path / "out" / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    failed = [t for t in table if t["status"] == "failed"]
    assert [t["case"] for t in failed] == ["case3", "case7"]
    assert all(t["rater"] == "" and t["error"] for t in failed)
    for name, raters in data.items():  # the other cases are complete and right
        if name != "case3":
            np.testing.assert_array_equal(
                rio.read_array(tmp_path / "out" / name / "truth.nii.gz")[0],
                rs.fuse(raters, method="majority_vote").truth)
    assert not (tmp_path / "out" / "case3" / MARKER).exists()
    assert "5 fused, 0 already done, 2 failed, of 7 cases" in out
    # once repaired, a rerun fuses only the failed cases
    shutil.copy(root / "case3" / "rater2.nii.gz", tmp_path / "c" / "case3" / "rater2.nii.gz")
    shutil.rmtree(tmp_path / "c" / "case7")
    code = main(["fuse-dir", str(tmp_path / "c"), "-m", "majority_vote", "-o",
                 str(tmp_path / "out"), "-q"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "1 fused, 5 already done, 0 failed, of 6 cases" in out


def test_two_workers_give_the_same_outputs(cohort, fused, tmp_path):
    import torch

    root, data = cohort
    before = torch.get_num_threads()
    # threads=3: neither the default here (cores // 2) nor on a 16-core machine (8)
    rows = fuse_cohort(root, tmp_path / "out", "staple", workers=2, threads=3)
    assert [r["case"] for r in rows] == list(data)
    assert all(r["status"] == "fused" for r in rows)
    # this process and one worker process shared the cases, each with the threads asked for
    assert len({r["process"] for r in rows}) == 2 and os.getpid() in {r["process"] for r in rows}
    assert {r["threads"] for r in rows} == {3}
    assert torch.get_num_threads() == before  # this process's setting is given back
    for name in data:
        for f in ("truth", "probabilities", "uncertainty"):
            a = rio.read_array(tmp_path / "out" / name / f"{f}.nii.gz")[0]
            b = rio.read_array(fused[0] / name / f"{f}.nii.gz")[0]
            np.testing.assert_array_equal(a, b)
        assert (tmp_path / "out" / name / "rater_confusion.csv").read_text() == \
            (fused[0] / name / "rater_confusion.csv").read_text()


def test_bad_arguments_exit_2_before_any_work(cohort, tmp_path, capsys):
    root, _ = cohort
    for argv, match in [
        (["fuse-dir", str(tmp_path / "absent"), "-o", str(tmp_path / "o")], "COHORT: no such folder"),
        (["fuse-dir", str(root), "-m", "stapel", "-o", str(tmp_path / "o")], "did you mean 'staple'"),
        (["fuse-dir", str(root), "--set", "prior=x", "-o", str(tmp_path / "o")], "prior"),
        (["fuse-dir", str(root), "--workers", "0", "-o", str(tmp_path / "o")], "workers: expected"),
        (["fuse-dir", str(tmp_path), "-o", str(tmp_path / "o")], "COHORT: expected a cohort"),
    ]:
        code = main(argv)
        _, err = capsys.readouterr()
        assert code == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and match in err, err
        assert not (tmp_path / "o").exists()
    # the API names the argument for any bad value (threads="x" was a bare ValueError)
    for kw in ({"threads": "x"}, {"threads": float("nan")}, {"workers": "2"}, {"threads": 0}):
        with pytest.raises(rs.RaterSegError, match=next(iter(kw))):
            fuse_cohort(root, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


def test_output_inside_the_cohort_is_not_taken_for_cases(cohort, tmp_path):
    root, data = cohort
    shutil.copytree(root, tmp_path / "c")
    for _ in range(2):  # the second run must not see c/fused/case*/rater_maps... as cases
        rows = fuse_cohort(tmp_path / "c", tmp_path / "c" / "fused", "mean")
        assert [r["case"] for r in rows] == list(data)


def test_load_training_set_matches_raters_by_name(tmp_path):
    _write_cohort(tmp_path / "a", [(2, (16, 16), 3), (2, (16, 16), 2)])
    (tmp_path / "a" / "case2" / "rater2.nii.gz").rename(tmp_path / "a" / "case2" / "rater3.nii.gz")
    images, raters, ids, names = load_training_set(tmp_path / "a")
    assert ids == ["case1", "case2"] and images.shape == (2, 1, 16, 16)
    assert raters.shape == (2, 3, 16, 16) and names == ["rater1", "rater2", "rater3"]
    assert (raters[1, 1] == -1).all() and (raters[1, 2] >= 0).all()  # rater2 absent in case2
    case2 = rio.read_case(tmp_path / "a" / "case2")
    np.testing.assert_array_equal(raters[1, 2], case2.raters[1])


def _bump_mtime(path):
    """A file rewritten within the file system's time resolution keeps its mtime: move it on."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_rerun_redoes_a_case_whose_input_files_changed(tmp_path):
    data = _write_cohort(tmp_path / "c", CASES[:2])
    root, out = tmp_path / "c", tmp_path / "out"
    rows = fuse_cohort(root, out, "majority_vote")
    assert [r["status"] for r in rows] == ["fused", "fused"]
    assert [e["path"] for e in rows[0]["inputs"]] == ["image.nii.gz", "rater1.nii.gz",
                                                      "rater2.nii.gz", "rater3.nii.gz"]
    assert [r["status"] for r in fuse_cohort(root, out, "majority_vote")] == ["skipped"] * 2
    # case1: rater2 corrected (now empty) and a fourth rater delivered
    raters = data["case1"].copy()
    raters[1] = 0
    rio.write_array(root / "case1" / "rater2.nii.gz", raters[1], {"spacing": (1.5, 1.5)})
    _bump_mtime(root / "case1" / "rater2.nii.gz")
    fourth = raters[0].copy()
    rio.write_array(root / "case1" / "rater4.nii.gz", fourth, {"spacing": (1.5, 1.5)})
    rows = fuse_cohort(root, out, "majority_vote")
    assert [r["status"] for r in rows] == ["fused", "skipped"]
    assert rows[0]["replaced"] == ("majority_vote, inputs changed (rater2.nii.gz modified, "
                                   "rater4.nii.gz new)")
    want = rs.fuse(np.concatenate([raters, fourth[None]]), method="majority_vote").truth
    np.testing.assert_array_equal(rio.read_array(out / "case1" / "truth.nii.gz")[0], want)
    with open(out / "summary.csv", newline="") as fh:
        table = [t for t in csv.DictReader(fh) if t["case"] == "case1"]
    assert [t["rater"] for t in table] == ["rater1", "rater2", "rater3", "rater4"]
    assert float(table[1]["dice"]) == 0  # the corrected (empty) rater2
    # a rater removed counts too; unchanged inputs are skipped again
    (root / "case2" / "rater3.nii.gz").unlink()
    rows = fuse_cohort(root, out, "majority_vote")
    assert [r["status"] for r in rows] == ["skipped", "fused"]
    assert rows[1]["replaced"] == "majority_vote, inputs changed (rater3.nii.gz removed)"
    assert [r["status"] for r in fuse_cohort(root, out, "majority_vote")] == ["skipped"] * 2
    # a marker of an older raterseg (no input record): the inputs are unknown, so redone
    marker = json.loads((out / "case2" / MARKER).read_text())
    del marker["inputs"]
    (out / "case2" / MARKER).write_text(json.dumps(marker))
    rows = fuse_cohort(root, out, "majority_vote")
    assert [(r["status"], r.get("replaced")) for r in rows] == [
        ("skipped", None), ("fused", "majority_vote, inputs not recorded")]
    # force: every case again
    rows = fuse_cohort(root, out, "majority_vote", force=True)
    assert [(r["status"], r.get("replaced")) for r in rows] == \
        [("fused", "majority_vote, redo forced")] * 2


def test_folders_that_are_no_case_are_reported_not_dropped(tmp_path):
    root = tmp_path / "c"
    data = _write_cohort(root, CASES[:2])
    shutil.copytree(root / "case1", root / "case3")
    for r in (1, 2, 3):  # misnamed masks
        (root / "case3" / f"rater{r}.nii.gz").rename(root / "case3" / f"seg{r}.nii.gz")
    (root / "case4").mkdir()  # raters not delivered yet
    shutil.copy(root / "case1" / "image.nii.gz", root / "case4")
    (root / "notes").mkdir()
    seen = []
    rows = fuse_cohort(root, root / "fused", "majority_vote", on_case=seen.append)
    assert [(r["case"], r["status"]) for r in rows] == [
        ("case1", "fused"), ("case2", "fused"), ("case3", "ignored"), ("case4", "ignored"),
        ("notes", "ignored")]  # the output folder inside the cohort is not listed
    why = {r["case"]: r["error"] for r in rows[2:]}
    assert why == {"case3": "no rater* label files or rater*/ folders (found image.nii.gz, "
                            "seg1.nii.gz, seg2.nii.gz, seg3.nii.gz)",
                   "case4": "no rater* label files or rater*/ folders (found image.nii.gz)",
                   "notes": "empty folder"}
    assert [r["case"] for r in seen[:3]] == ["case3", "case4", "notes"]
    with open(root / "fused" / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["case"], t["status"], t["error"]) for t in table if t["status"] != "fused"] == \
        [(k, "ignored", v) for k, v in why.items()]
    assert len([t for t in table if t["status"] == "fused"]) == sum(map(len, data.values()))


def test_fuse_dir_names_ignored_folders_even_quiet_and_force_redoes(tmp_path, capsys):
    root = tmp_path / "c"
    _write_cohort(root, CASES[:2])
    (root / "case3").mkdir()  # raters not delivered yet
    shutil.copy(root / "case1" / "image.nii.gz", root / "case3")
    (root / "notes").mkdir()
    argv = ["fuse-dir", str(root), "-m", "majority_vote", "-o", str(tmp_path / "out"), "-q"]
    assert main(argv) == 0  # ignored folders are no failure
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        ("raterseg fuse-dir: folder 'case3' ignored: no rater* label files or rater*/ folders "
         "(found image.nii.gz)"),
        "raterseg fuse-dir: folder 'notes' ignored: empty folder"]
    assert "2 fused, 0 already done, 0 failed, of 2 cases, 2 folders ignored in " in out
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert "0 fused, 2 already done, 0 failed, of 2 cases, 2 folders ignored" in out
    mtime = (tmp_path / "out" / "case1" / "truth.nii.gz").stat().st_mtime_ns
    shutil.rmtree(root / "notes")
    assert main([*argv, "--force"]) == 0
    out, err = capsys.readouterr()
    assert "2 fused, 0 already done, 0 failed, of 2 cases, 1 folder ignored" in out
    assert "(replaced majority_vote, redo forced)" in out and err.count("\n") == 1
    assert (tmp_path / "out" / "case1" / "truth.nii.gz").stat().st_mtime_ns != mtime


def test_cohort_root_with_a_raters_csv_is_still_a_cohort(tmp_path):
    root = tmp_path / "c"
    _write_cohort(root, [(2, (16, 16), 3), (2, (16, 16), 2)])
    (root / "raters.csv").write_text("rater,name\nrater1,alice\n")
    (root / "rater_notes.txt").write_text("rater2 was late\n")
    rows = fuse_cohort(root, tmp_path / "out", "majority_vote")
    assert [(r["case"], r["status"]) for r in rows] == [("case1", "fused"), ("case2", "fused")]
    assert load_training_set(root)[2] == ["case1", "case2"]


def test_a_tiff_image_beside_nifti_raters_keeps_their_geometry(tmp_path):
    import nibabel as nib
    import tifffile

    _, raters, _ = synth.sample_case(dims=3, num_raters=3, seed=0, shape=(8, 12, 10))
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = (-40.0, 12.0, 7.5)
    case = tmp_path / "c" / "case1"
    case.mkdir(parents=True)
    for r, lab in enumerate(raters):  # NIfTI (x, y, z): the array (z, y, x) is lab
        nib.save(nib.Nifti1Image(lab.T.astype(np.int16), affine), case / f"rater{r + 1}.nii.gz")
    tifffile.imwrite(case / "image.tif", np.ones(raters.shape[1:], np.float32))
    rows = fuse_cohort(tmp_path / "c", tmp_path / "out", "majority_vote")
    assert rows[0]["status"] == "fused", rows[0]["error"]
    truth = nib.load(tmp_path / "out" / "case1" / "truth.nii.gz")
    np.testing.assert_allclose(truth.affine, affine)
    np.testing.assert_array_equal(np.asarray(truth.dataobj).T,
                                  rs.fuse(raters, method="majority_vote").truth)

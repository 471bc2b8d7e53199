"""Chunked fusion (raterseg.fuse_chunked): identical to the in-memory path, bounded memory,
bad input refused before anything is written."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import raterseg as rs
from raterseg import io as rio
from raterseg import synth

FIELDS = ("truth", "probabilities", "uncertainty", "disagreement", "rater_confusion")


def _raters_3d(num_classes: int = 2, missing: bool = True) -> np.ndarray:
    truth = np.zeros((24, 30, 36), np.int16)
    truth[5:19, 6:24, 8:30] = 1
    if num_classes == 3:
        truth[9:15, 10:20, 12:26] = 2
    kinds = ("good", "over", "under", "wrong", "good")
    raters = np.stack([synth.simulate_rater(truth, k, seed=i) for i, k in enumerate(kinds)])
    raters = raters.astype(np.int16)
    if missing:
        raters[1, :6] = -1  # rater 1 skipped the first slices
        raters[3, :, :, 30:] = -1
    return raters


def _same(a: rs.FusionResult, b: rs.FusionResult) -> None:
    for k in FIELDS:
        x, y = getattr(a, k), getattr(b, k)
        assert x.shape == np.asarray(y).shape, k
        assert np.array_equal(x, np.asarray(y), equal_nan=x.dtype.kind == "f"), k
    assert len(a.history) == len(b.history)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("method", ["staple", "majority_vote", "mean"])
@pytest.mark.parametrize("num_classes", [2, 3])
def test_npy_stack_identical_to_in_memory(tmp_path, method, num_classes):
    raters = _raters_3d(num_classes)
    np.save(tmp_path / "raters.npy", raters)
    before = _digest(tmp_path / "raters.npy")
    ref = rs.fuse(raters, method=method)
    # 7777 voxels = 7 planes of 1080: several slabs and a short last one
    res = rs.fuse_chunked(tmp_path / "raters.npy", tmp_path / "out", method=method,
                          chunk_voxels=7777)
    _same(ref, res)
    assert res.method == method and res.params == ref.params
    assert _digest(tmp_path / "raters.npy") == before  # input untouched
    meta = json.loads((tmp_path / "out" / "fusion.json").read_text())
    assert meta["shape"] == list(raters.shape[1:]) and meta["num_raters"] == 5
    # the files are plain .npy a user can open
    assert np.array_equal(np.load(tmp_path / "out" / "truth.npy"), ref.truth)


def test_a_rater_all_missing_has_no_confusion_matrix_as_in_memory(tmp_path):
    raters = _raters_3d()
    raters[2] = -1  # rater 2 did not annotate this case at all
    ref = rs.fuse(raters, method="staple")
    res = rs.fuse_chunked(raters, tmp_path / "out", method="staple", chunk_voxels=5000)
    _same(ref, res)
    assert np.isnan(res.rater_confusion[2]).all()
    assert np.isfinite(np.delete(res.rater_confusion, 2, axis=0)).all()
    # the others are fused as if rater 2 were not there
    without = rs.fuse(np.delete(raters, 2, axis=0), method="staple")
    np.testing.assert_allclose(res.probabilities, without.probabilities, atol=1e-6)
    rows = (tmp_path / "out" / "rater_confusion.csv").read_text().splitlines()
    assert [r.split(",")[-1] for r in rows if r.startswith("rater3,")] == ["nan"] * 4
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["rater_confusion"][2] == \
        [[None, None], [None, None]]


def test_nifti_in_nifti_out_with_the_raters_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    from raterseg.datasets import read_labels

    raters = _raters_3d(missing=False)  # written as NIfTI (x, y, z) = these arrays' axes
    affine = np.array([[0, 0, 0.7, 10], [0, 0.8, 0, -5], [2.5, 0, 0, 3], [0, 0, 0, 1]])
    paths = []
    for r, lab in enumerate(raters):
        paths.append(tmp_path / f"rater{r}.nii.gz")
        nib.save(nib.Nifti1Image(lab.astype(np.int16), affine), paths[-1])
    # raterseg reads NIfTI (x, y, z) as arrays (z, y, x), everywhere
    as_read = np.stack([read_labels(p)[0] for p in paths])
    assert np.array_equal(as_read, raters.transpose(0, 3, 2, 1))
    ref = rs.fuse(as_read, method="staple")
    res = rs.fuse_chunked(paths, tmp_path / "out", method="staple", chunk_voxels=3000)
    _same(ref, res)
    truth_img = nib.load(tmp_path / "out" / "truth.nii")
    np.testing.assert_allclose(truth_img.affine, affine)
    assert np.array_equal(np.asanyarray(truth_img.dataobj), ref.truth.T)
    prob_img = nib.load(tmp_path / "out" / "probabilities.nii")
    assert prob_img.shape == raters.shape[1:] + (2,)
    assert np.array_equal(np.asanyarray(prob_img.dataobj)[..., 1], ref.probabilities[1].T)
    # the per-rater table and the summary read as raterseg fuse's do
    written = rs.io.write_result(tmp_path / "mem", ref, rater_names=[p.name[:-7] for p in paths])
    assert (tmp_path / "out" / "rater_confusion.csv").read_text() == \
        written["rater_confusion"].read_text()
    meta = json.loads((tmp_path / "out" / "fusion.json").read_text())
    summary = json.loads(written["summary"].read_text())
    assert meta["rater_names"] == summary["rater_names"] == [f"rater{r}" for r in range(5)]
    assert meta["class_voxels"] == summary["class_voxels"]
    assert meta["spacing"] == pytest.approx(read_labels(paths[0])[1]["spacing"])  # (z, y, x)
    assert meta["spacing"] == pytest.approx([0.7, 0.8, 2.5])
    assert meta["source"] == str(paths[0])
    # .npy on request; a second run replaces the first result's files
    res2 = rs.fuse_chunked(paths, tmp_path / "out", method="staple", output_format="npy")
    _same(ref, res2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "disagreement.npy", "fusion.json", "probabilities.npy", "rater_confusion.csv", "truth.npy",
        "uncertainty.npy"]
    with pytest.raises(rs.RaterSegError, match="output_format"):
        rs.fuse_chunked(raters, tmp_path / "o2", output_format="nii")


def test_0_255_mask_files_and_grids_as_in_memory(tmp_path):
    # a 0/255 mask file is a binary mask (2 classes), in slabs as in memory; a file on
    # another voxel grid is refused, as in memory
    nib = pytest.importorskip("nibabel")
    from raterseg.datasets import read_labels

    raters = _raters_3d(missing=False)
    paths = []
    for r, lab in enumerate(raters):
        paths.append(tmp_path / f"mask{r}.nii.gz")
        scaled = (lab * 255).astype(np.uint8 if r % 2 else np.int16)
        nib.save(nib.Nifti1Image(scaled, np.eye(4)), paths[-1])
    as_read = np.stack([read_labels(p)[0] for p in paths])
    assert set(np.unique(as_read)) == {0, 1}
    ref = rs.fuse(as_read, method="staple")
    for num_classes in (None, 2):
        res = rs.fuse_chunked(paths, tmp_path / "out", method="staple", chunk_voxels=3000,
                              num_classes=num_classes)
        assert res.num_classes == 2
        _same(ref, res)
    shifted = np.eye(4)
    shifted[0, 3] = 50.0
    nib.save(nib.Nifti1Image((raters[0] * 255).astype(np.uint8), shifted), tmp_path / "far.nii.gz")
    with pytest.raises(rs.RaterSegError, match="far.nii.gz' lies on another voxel grid"):
        rs.fuse_chunked([paths[0], tmp_path / "far.nii.gz"], tmp_path / "o2")
    assert not (tmp_path / "o2").exists()
    # an array holding 0/255 is taken as given (as by rs.fuse): refused as grey levels
    with pytest.raises(rs.RaterSegError, match="0/255 mask"):
        rs.fuse_chunked(raters * 255, tmp_path / "o3")


def test_array_likes_and_2d(tmp_path):
    truth = synth.phantom_2d((64, 80), seed=3)[1]
    raters = synth.simulate_raters(truth, ("good", "over", "under"), seed=1).astype(np.int32)
    np.save(tmp_path / "a.npy", raters[0])
    maps = [np.load(tmp_path / "a.npy", mmap_mode="r"), raters[1], raters[2]]
    ref = rs.fuse(raters, method="majority_vote", tie="undecided")
    res = rs.fuse_chunked(maps, tmp_path / "out", method="majority_vote", tie="undecided",
                          chunk_voxels=500, num_classes=2)
    _same(ref, res)
    # torch tensors, as rs.fuse takes them
    torch = pytest.importorskip("torch")
    _same(ref, rs.fuse_chunked(torch.from_numpy(raters), tmp_path / "out2", chunk_voxels=500,
                               method="majority_vote", tie="undecided"))


def test_many_raters_beyond_int64_pattern_codes(tmp_path):
    # 45 binary raters with missing labels: 3^45 pattern codes overflow int64, so the
    # slab-to-histogram lookup goes through its tuple table instead of codes.
    rng = np.random.default_rng(0)
    truth = np.zeros((10, 12, 14), np.int16)
    truth[2:8, 3:9, 4:11] = 1
    flip = rng.random((45,) + truth.shape) < 0.1
    raters = np.where(flip, 1 - truth, truth).astype(np.int16)
    raters[rng.random(raters.shape) < 0.05] = -1
    ref = rs.fuse(raters, method="mean")
    res = rs.fuse_chunked(raters, tmp_path / "out", method="mean", chunk_voxels=300)
    _same(ref, res)


def test_reloads_from_disk(tmp_path):
    raters = _raters_3d()
    res = rs.fuse_chunked(raters, tmp_path / "out", method="staple", chunk_voxels=5000)
    again = rs.load_chunked(tmp_path / "out")
    _same(res, again)
    with pytest.raises(rs.RaterSegError, match="output_dir"):
        rs.load_chunked(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "cm"}, "method: chunked fusion needs a method with a global model"),
        ({"method": "spatial_staple"}, "method: chunked fusion"),
        ({"num_classes": 2, "bad_label": 5}, r"raters: expected labels in 0\.\.1"),
        ({"bad_label": -3}, "raters: expected labels >= -1"),
        ({"float": True}, "raters: expected integer class labels"),
        ({"all_missing": True}, "every rater is -1"),
        ({"chunk_voxels": 0}, "chunk_voxels"),
        ({"chunk_voxels": "4000"}, "chunk_voxels: expected a positive whole number"),
        ({"chunk_voxels": 2.5}, "chunk_voxels: expected a positive whole number"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, kwargs, match):
    raters = _raters_3d(missing=False)
    if "bad_label" in kwargs:
        raters[2, -1, -1, -1] = kwargs.pop("bad_label")  # in the last slab: found late
    if kwargs.pop("float", False):
        raters = raters.astype(np.float32)
    if kwargs.pop("all_missing", False):
        raters[:] = -1
    kwargs.setdefault("chunk_voxels", 4000)
    with pytest.raises(rs.RaterSegError, match=match):
        rs.fuse_chunked(raters, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_paths_and_shapes(tmp_path):
    with pytest.raises(rs.RaterSegError, match="not found"):
        rs.fuse_chunked([tmp_path / "nope.npy", tmp_path / "nope2.npy"], tmp_path / "out")
    np.save(tmp_path / "a.npy", np.zeros((4, 5, 6), np.int16))
    np.save(tmp_path / "b.npy", np.zeros((4, 5, 7), np.int16))
    with pytest.raises(rs.RaterSegError, match="same shape"):
        rs.fuse_chunked([tmp_path / "a.npy", tmp_path / "b.npy"], tmp_path / "out")
    (tmp_path / "c.png").write_bytes(b"x")
    with pytest.raises(rs.RaterSegError, match=r"raters\[0\]: expected \.npy or \.nii"):
        rs.fuse_chunked([tmp_path / "c.png"], tmp_path / "out")
    (tmp_path / "d.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(rs.RaterSegError, match="not a valid .npy"):
        rs.fuse_chunked([tmp_path / "d.npy"], tmp_path / "out")
    with pytest.raises(rs.RaterSegError, match=r"raters: expected non-empty label maps"):
        rs.fuse_chunked(np.zeros((3, 0, 4, 5), np.int16), tmp_path / "out")


def test_peak_memory_stays_bounded(tmp_path):
    """A 5-rater 128x256x256 volume with 1 Mi-voxel slabs: the process grows by less than
    the outputs alone (144 MiB; measured: 52 MiB with 1 Mi-voxel slabs, 208 MiB with one
    slab for the whole volume)."""
    shape = (128, 256, 256)
    mm = np.lib.format.open_memmap(tmp_path / "raters.npy", "w+", np.uint8, (5,) + shape)
    z = np.arange(shape[0])[:, None, None]
    y = np.arange(shape[1])[None, :, None]
    x = np.arange(shape[2])[None, None, :]
    ball = ((z - 64) ** 2 / 40**2 + (y - 128) ** 2 / 90**2 + (x - 128) ** 2 / 80**2)
    for r in range(5):
        mm[r] = ball < 1.0 + 0.1 * (r - 2)
    del mm
    script = textwrap.dedent(f"""
        import numpy as np, raterseg as rs, torch
        def hwm():  # peak resident set of this process (ru_maxrss keeps the parent's peak)
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        torch.ones(1)
        base = hwm()
        res = rs.fuse_chunked({str(tmp_path / 'raters.npy')!r}, {str(tmp_path / 'out')!r},
                              method="staple", chunk_voxels=1 << 20)
        peak = hwm()
        print((peak - base) / 1024, int(np.asarray(res.truth[64]).sum()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    grown_mib, fg_mid = out.stdout.split()
    outputs_mib = np.prod(shape) * (2 + 4 * 2 + 4 + 4) / 2**20  # 144 MiB
    assert float(grown_mib) < outputs_mib, out.stdout
    assert int(fg_mid) > 0.5 * np.pi * 90 * 80  # the middle slice holds most of the ellipse


def test_cli_fuse_chunked(tmp_path, capsys):
    from raterseg.cli import main

    nib = pytest.importorskip("nibabel")
    raters = _raters_3d(missing=False)
    paths = []
    for r, lab in enumerate(raters):
        paths.append(tmp_path / f"reader{r}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.eye(4)), paths[-1])
    code = main(["fuse", *map(str, paths), "--chunked", "--chunk-voxels", "4000", "-q",
                 "-m", "staple", "--set", "prior=0.3", "-o", str(tmp_path / "out")])
    out, _ = capsys.readouterr()
    assert code == 0
    ref = rs.fuse(raters.transpose(0, 3, 2, 1), method="staple", prior=0.3)  # NIfTI axes
    assert np.array_equal(rs.load_chunked(tmp_path / "out").truth, ref.truth)
    assert "reader1" in out and f"{ref.rater_confusion[1, 1, 1]:.3f}" in out  # sensitivity
    # mistakes: exit 2 and one line, before anything is written
    for argv, msg in [(["-m", "cm"], "method: chunked fusion"),
                      (["--image", str(paths[0])], "--image"),
                      (["--set", "tie=lowest"], "tie")]:
        code = main(["fuse", *map(str, paths), "--chunked", "-o", str(tmp_path / "bad"), *argv])
        _, err = capsys.readouterr()
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    code = main(["fuse", *map(str, paths), "--chunk-voxels", "10", "-o", str(tmp_path / "bad")])
    assert code == 2 and "--chunked" in capsys.readouterr().err


def _save_nifti(nib, path, data, cls=None):
    cls = cls or nib.Nifti1Image
    nib.save(cls(data, np.eye(4)), path)
    return path


def test_nifti2_and_2d_nifti_raters(tmp_path):
    nib = pytest.importorskip("nibabel")
    from raterseg.datasets import read_labels

    raters = _raters_3d(missing=False)
    # NIfTI-2 raters: the outputs are NIfTI-2 too (a NIfTI-1 magic in a NIfTI-2 header
    # made nibabel refuse to write them)
    paths = [_save_nifti(nib, tmp_path / f"r{r}.nii", lab, nib.Nifti2Image)
             for r, lab in enumerate(raters)]
    ref = rs.fuse(np.stack([read_labels(p)[0] for p in paths]), method="staple")
    res = rs.fuse_chunked(paths, tmp_path / "out", method="staple", chunk_voxels=3000)
    _same(ref, res)
    assert isinstance(nib.load(tmp_path / "out" / "truth.nii"), nib.Nifti2Image)
    # 2D NIfTI raters: the default output format is one that can hold them (.npy)
    paths2 = [_save_nifti(nib, tmp_path / f"s{r}.nii.gz", lab[12]) for r, lab in enumerate(raters)]
    ref2 = rs.fuse(np.stack([read_labels(p)[0] for p in paths2]), method="majority_vote")
    res2 = rs.fuse_chunked(paths2, tmp_path / "out2", method="majority_vote", chunk_voxels=50)
    _same(ref2, res2)
    assert (tmp_path / "out2" / "truth.npy").exists()


def test_4d_nifti_rater_with_one_volume_is_the_3d_volume(tmp_path):
    """A rater saved as (x, y, z, 1), as some tools save label maps: read_labels takes it
    as (x, y, z), and so does fuse_chunked (first rater or not, .nii or .nii.gz)."""
    nib = pytest.importorskip("nibabel")
    from raterseg.datasets import read_labels

    raters = _raters_3d(missing=False)[:3]
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    paths = [tmp_path / "r0.nii", tmp_path / "r1.nii.gz", tmp_path / "r2.nii.gz"]
    for p, lab, four_d in zip(paths, raters, (True, False, True)):
        nib.save(nib.Nifti1Image(lab[..., None] if four_d else lab, affine), p)
    as_read = np.stack([read_labels(p)[0] for p in paths])
    assert as_read.shape == (3, *raters.shape[:0:-1])  # (3, z, y, x)
    ref = rs.fuse(as_read, method="staple")
    res = rs.fuse_chunked(paths, tmp_path / "out", method="staple", chunk_voxels=3000)
    _same(ref, res)
    truth = nib.load(tmp_path / "out" / "truth.nii")  # NIfTI out: the 3D volume
    assert truth.shape == raters.shape[1:]
    np.testing.assert_allclose(truth.header.get_zooms(), (0.7, 0.8, 2.5))
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["spacing"] == \
        pytest.approx([2.5, 0.8, 0.7])


def _set_nifti_scaling(path: Path, slope: float, inter: float = 0.0) -> None:
    """Write scl_slope/scl_inter (bytes 112-119 of an uncompressed NIfTI-1 header)."""
    with open(path, "r+b") as f:
        f.seek(112)
        f.write(np.array([slope, inter], "<f4").tobytes())


def test_float_and_scaled_nifti_labels_read_as_raterseg_fuse_reads_them(tmp_path):
    nib = pytest.importorskip("nibabel")
    from raterseg.datasets import read_labels

    raters = _raters_3d(missing=False)
    # labels stored as float32 (as many tools write them): accepted, like the in-memory path
    paths = [_save_nifti(nib, tmp_path / f"f{r}.nii.gz", lab.astype(np.float32))
             for r, lab in enumerate(raters)]
    ref = rs.fuse(np.stack([read_labels(p)[0] for p in paths]), method="staple")
    _same(ref, rs.fuse_chunked(paths, tmp_path / "out", chunk_voxels=3000))
    # stored 0/2 with scl_slope 0.5: labels 0/1, as nibabel (and raterseg.io) read them
    paths = [_save_nifti(nib, tmp_path / f"s{r}.nii", (2 * lab).astype(np.int16))
             for r, lab in enumerate(raters)]
    for p in paths:
        _set_nifti_scaling(p, 0.5)
    as_read = np.stack([read_labels(p)[0] for p in paths])
    assert np.array_equal(as_read, raters.transpose(0, 3, 2, 1))
    _same(rs.fuse(as_read, method="staple"), rs.fuse_chunked(paths, tmp_path / "out2",
                                                             chunk_voxels=3000))
    # a scaling that makes labels fractional is refused (it was silently truncated)
    _set_nifti_scaling(paths[1], 0.3)
    with pytest.raises(rs.RaterSegError, match=r"raters.*s1\.nii.*integer class labels"):
        rs.fuse_chunked(paths, tmp_path / "out3", chunk_voxels=3000)
    bad = np.full(raters.shape[1:], 0.5, np.float32)
    _save_nifti(nib, tmp_path / "half.nii", bad)
    with pytest.raises(rs.RaterSegError, match=r"half\.nii.*got the value 0\.5"):
        rs.fuse_chunked([paths[0], tmp_path / "half.nii"], tmp_path / "out4")
    assert not (tmp_path / "out3").exists() and not (tmp_path / "out4").exists()


def test_labels_a_round_off_away_from_whole_numbers_are_rounded_fractions_refused(tmp_path):
    """A 0/255 mask with scl_slope 1/255 (1.0000000591 as read) and float32 labels
    0.99999994 are the labels 1, as read_labels reads them (a cast made 0.99999994 into 0)."""
    nib = pytest.importorskip("nibabel")

    raters = _raters_3d(num_classes=3)
    slope = nib.Nifti1Image((raters[0].T.clip(0) * 127).astype(np.uint8), np.eye(4))
    slope.header.set_slope_inter(1 / 127, 0)  # labels 0, 1, 2 stored as 0, 127, 254
    nib.save(slope, tmp_path / "slope.nii")
    assert float(np.asanyarray(nib.load(tmp_path / "slope.nii").dataobj).max()) != 2.0
    paths = [tmp_path / "slope.nii"]
    for r in range(1, len(raters)):
        off = raters[r].T.astype(np.float32) * np.float32(0.99999994)
        paths.append(_save_nifti(nib, tmp_path / f"off{r}.nii.gz", off))
    want = raters.copy()
    want[0] = want[0].clip(0)  # -1 is not stored by the uint8 file
    ref = rs.fuse(want, method="staple", num_classes=3)
    res = rs.fuse_chunked(paths, tmp_path / "out", method="staple", chunk_voxels=3000)
    _same(ref, res)
    # the files read in memory give the same
    from raterseg.datasets import read_labels

    assert np.array_equal(np.stack([read_labels(p)[0] for p in paths]), want)
    half = raters[1].T.astype(np.float32)
    half[3, 4, 5] = 0.5
    _save_nifti(nib, tmp_path / "half.nii.gz", half)
    with pytest.raises(rs.RaterSegError, match=r"half\.nii\.gz.*got the value 0\.5"):
        rs.fuse_chunked([paths[0], tmp_path / "half.nii.gz"], tmp_path / "out2")


def test_bad_output_dir_and_chunk_voxels_refused_up_front(tmp_path, capsys):
    from raterseg.cli import main

    raters = _raters_3d(missing=False)
    np.save(tmp_path / "raters.npy", raters)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(rs.RaterSegError, match="output_dir"):
        rs.fuse_chunked(raters, tmp_path / "afile")
    # a file where a parent folder should be: refused before the passes, not a bare OSError
    with pytest.raises(rs.RaterSegError, match=r"output_dir: .*'.*afile' is not a folder"):
        rs.fuse_chunked(raters, tmp_path / "afile" / "out")
    code = main(["fuse", str(tmp_path / "raters.npy"), "--chunked", "-o", str(tmp_path / "afile")])
    assert code == 2 and "afile" in capsys.readouterr().err
    for n in ("0", "-5"):
        code = main(["fuse", str(tmp_path / "raters.npy"), "--chunked", "--chunk-voxels", n,
                     "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and "--chunk-voxels" in err and n in err, err
    assert not (tmp_path / "out").exists()


def test_interrupted_run_keeps_the_previous_result_and_leaves_no_temporaries(tmp_path):
    raters = _raters_3d()
    first = rs.fuse_chunked(raters, tmp_path / "out", method="majority_vote", chunk_voxels=5000)
    truth_before = np.array(first.truth)
    del first

    def interrupt(event):
        if "writing" in event.message and event.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rs.fuse_chunked(raters, tmp_path / "out", method="staple", chunk_voxels=5000,
                        progress=interrupt)

    def disk_full(event):
        if "writing" in event.message and event.step == 1:
            raise OSError(28, "No space left on device")

    with pytest.raises(rs.RaterSegError, match="output_dir: writing the result .*No space left"):
        rs.fuse_chunked(raters, tmp_path / "out", method="staple", chunk_voxels=5000,
                        progress=disk_full)
    assert rs.load_chunked(tmp_path / "out").method == "majority_vote"  # still whole
    # the interrupted run left no temporary files and the first result is whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "disagreement.npy", "fusion.json", "probabilities.npy", "rater_confusion.csv", "truth.npy",
        "uncertainty.npy"]
    again = rs.load_chunked(tmp_path / "out")
    assert again.method == "majority_vote" and np.array_equal(again.truth, truth_before)


def test_rater_files_are_never_overwritten_by_outputs(tmp_path):
    raters = _raters_3d()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("truth.npy", "probabilities.npy"):
        np.save(out / name, raters[0])
        before = _digest(out / name)
        files = [out / name, *(tmp_path / f"r{r}.npy" for r in (1, 2))]
        for r in (1, 2):
            np.save(files[r], raters[r])
        with pytest.raises(rs.RaterSegError, match=r"output_dir: .*rater"):
            rs.fuse_chunked(files, out, method="mean")
        # also when given as a memory map
        with pytest.raises(rs.RaterSegError, match=r"output_dir: .*rater"):
            rs.fuse_chunked([np.load(out / name, mmap_mode="r"), raters[1]], out, method="mean")
        assert _digest(out / name) == before
        (out / name).unlink()


def test_load_chunked_checks_the_files_against_fusion_json(tmp_path):
    nib = pytest.importorskip("nibabel")
    raters = _raters_3d(missing=False)
    paths = [_save_nifti(nib, tmp_path / f"r{r}.nii", lab) for r, lab in enumerate(raters)]
    res = rs.fuse_chunked(paths, tmp_path / "out", chunk_voxels=3000)
    # the arrays are read-only views of the files, NIfTI ones included
    for k in ("truth", "probabilities", "uncertainty", "disagreement"):
        assert not getattr(res, k).flags.writeable, k
    del res
    # a file that does not belong to the result fusion.json describes is refused
    rs.fuse_chunked(raters[:, :5], tmp_path / "other", output_format="npy", method="mean")
    rs.fuse_chunked(raters, tmp_path / "out2", output_format="npy")
    (tmp_path / "other" / "truth.npy").replace(tmp_path / "out2" / "truth.npy")
    with pytest.raises(rs.RaterSegError, match=r"output_dir: .*truth\.npy"):
        rs.load_chunked(tmp_path / "out2")


def test_damaged_nifti_refused_naming_the_file(tmp_path):
    nib = pytest.importorskip("nibabel")
    raters = _raters_3d(missing=False)
    for suffix in (".nii.gz", ".nii"):
        paths = [_save_nifti(nib, tmp_path / f"r{r}{suffix}", lab) for r, lab in enumerate(raters)]
        data = paths[2].read_bytes()
        paths[2].write_bytes(data[: len(data) // 2])
        with pytest.raises(rs.RaterSegError, match=rf"raters: .*r2\{suffix}.*not a readable NIfTI"):
            rs.fuse_chunked(paths, tmp_path / "out", chunk_voxels=3000)
        assert not (tmp_path / "out").exists()


def test_outputs_that_would_not_fit_on_disk_refused_before_writing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    raters = _raters_3d()
    raters[0].flat[:256] = np.arange(256)  # 256 classes of probabilities
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**8, 0, 10**7))
    seen = []
    with pytest.raises(rs.RaterSegError, match=r"output_dir: .*256 classes.*free"):
        rs.fuse_chunked(raters, tmp_path / "out", method="majority_vote",
                        progress=lambda e: seen.append(e.message))
    assert not (tmp_path / "out").exists()
    # found as soon as the number of classes is known, before the histogram and the fit
    assert seen and not any("histogram" in m for m in seen), seen


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["staple", "majority_vote", "mean"])
def test_cuda_slabs_equal_cpu(tmp_path, method):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    raters = _raters_3d(3)
    ref = rs.fuse_chunked(raters, tmp_path / "cpu", method=method, chunk_voxels=7777, device="cpu")
    res = rs.fuse_chunked(raters, tmp_path / "gpu", method=method, chunk_voxels=7777,
                          device="cuda")
    _same(ref, res)


@pytest.mark.parametrize("num_raters", [5, 45])
def test_raters_changing_between_passes_refused(tmp_path, num_raters):
    """A rater file rewritten while it is fused (say, a copy still in progress) gives patterns
    the fitted tables never saw: refused, not gathered from a neighbouring pattern."""
    rng = np.random.default_rng(1)
    raters = (rng.random((num_raters, 6, 7, 8)) < 0.5).astype(np.int16)

    def change(event):
        if event.message.startswith("mean: histogram") and event.step == event.total:
            raters[:-1, -1] = -1  # a pattern (-1, ..., -1, x) the histogram never had

    with pytest.raises(rs.RaterSegError, match="raters: .*changed"):
        rs.fuse_chunked(raters, tmp_path / "out", method="mean", num_classes=2,
                        chunk_voxels=100, progress=change)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fusion_json_counts_undecided_voxels_and_names_raters_like_fuse(tmp_path):
    # majority_vote's tie="undecided" leaves -1 voxels: counted as -1, not as a class;
    # rater files sharing a name are named by their folder, as raterseg fuse names them
    raters = _raters_3d(missing=False)[:2]
    paths = []
    for who, lab in zip(("alice", "bob"), raters):
        (tmp_path / who).mkdir()
        paths.append(tmp_path / who / "mask.npy")
        np.save(paths[-1], lab)
    ref = rs.fuse(raters, method="majority_vote", tie="undecided")
    rs.fuse_chunked(paths, tmp_path / "out", method="majority_vote", tie="undecided",
                    chunk_voxels=5000)
    meta = json.loads((tmp_path / "out" / "fusion.json").read_text())
    labels, counts = np.unique(ref.truth, return_counts=True)
    assert -1 in labels
    assert meta["class_voxels"] == {str(k): int(v) for k, v in zip(labels, counts)}
    # a class no voxel was fused to is listed with 0, as raterseg fuse lists it
    rs.fuse_chunked(paths, tmp_path / "three", method="majority_vote", num_classes=3,
                    chunk_voxels=5000)
    three = json.loads((tmp_path / "three" / "fusion.json").read_text())["class_voxels"]
    assert three["2"] == 0 and sum(three.values()) == ref.truth.size
    assert meta["rater_names"] == ["alice", "bob"]


def test_in_memory_and_chunked_results_never_share_a_folder(tmp_path):
    # both write rater_confusion.csv (and truth.nii vs truth.nii.gz): the second overwrote
    # the first's CSV while the first's summary.json still pointed at it
    raters = _raters_3d(missing=False)
    rio.write_result(tmp_path / "mem", rs.fuse(raters, method="staple"))
    before = sorted(p.name for p in (tmp_path / "mem").iterdir())
    with pytest.raises(rs.RaterSegError, match="output_dir: .*holds a result of raterseg fuse"):
        rs.fuse_chunked(raters, tmp_path / "mem", method="majority_vote")
    assert sorted(p.name for p in (tmp_path / "mem").iterdir()) == before
    rs.fuse_chunked(raters, tmp_path / "slabs", method="majority_vote")
    with pytest.raises(rs.RaterSegError, match="outdir: .*holds a chunked fusion result"):
        rio.write_result(tmp_path / "slabs", rs.fuse(raters, method="staple"))
    assert not (tmp_path / "slabs" / "summary.json").exists()

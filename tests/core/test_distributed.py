"""``raterseg train`` under ``torchrun``: two CPU processes (gloo) train one model as well as
a single process does, and only rank 0 prints progress and writes the model.

The comparison keeps the budget equal: the same epochs and the same global batch (8 in
one process, 4 per process on two), so both take the same number of optimiser steps.
Quality, not bits, is compared: the processes shard the data and draw their own flips.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import raterseg as rs
from raterseg import synth
from raterseg.cli import main
from raterseg.metrics import dice

pytest.importorskip("torch.distributed")

BUDGET = ["--method", "unet", "--set", "features=4,8,8,8,8", "--set", "epochs=6",
          "--set", "lr=0.005", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 training cases (32×32, 3 raters: good, over, under) and 8 held-out images with truth."""
    folder = tmp_path_factory.mktemp("ddp_data")
    cases = [synth.sample_case(dims=2, num_raters=3, seed=i, shape=(32, 32)) for i in range(40)]
    images = np.stack([c[0] for c in cases]).astype(np.float32)
    raters = np.stack([c[1] for c in cases])
    truth = np.stack([c[2] for c in cases])
    np.savez(folder / "train.npz", images=images[:32], raters=raters[:32])
    return folder / "train.npz", images[32:], truth[32:]


def _mean_dice(model_path, images, truth) -> float:
    pred = rs.load(model_path).predict(images).truth
    return float(np.mean([dice(p, t) for p, t in zip(pred, truth)]))


def _torchrun(argv, log_dir, timeout=300):
    """``python -m torch.distributed.run --nproc_per_node=2 -m raterseg ...``; each rank's
    stdout and stderr go to files under ``log_dir``. Returns the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(log_dir), "--redirects", "3", "-m", "raterseg", *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _rank_logs(log_dir) -> dict[tuple[int, str], str]:
    """{(local rank, 'stdout'|'stderr'): text} from torchrun's log folder."""
    logs = {}
    for path in log_dir.rglob("*.log"):
        if path.parent.name.isdigit():
            logs[(int(path.parent.name), path.stem)] = path.read_text()
    return logs


def test_torchrun_two_cpu_processes_match_single_process_and_only_rank0_writes(data, tmp_path):
    train, images, truth = data
    # one process, global batch 8 (the CLI in this process)
    single = tmp_path / "single" / "model.safetensors"
    assert main(["train", str(train), *BUDGET, "--set", "batch_size=8", "-q",
                 "-o", str(single)]) == 0
    # the same network, not trained (lr 0): what "learnt nothing" scores
    blank = tmp_path / "blank" / "model.safetensors"
    assert main(["train", str(train), *BUDGET, "--set", "batch_size=8", "--set", "lr=0",
                 "--set", "epochs=1", "-q", "-o", str(blank)]) == 0

    # two processes under torchrun, 4 per process: the same global batch and steps
    out_dir = tmp_path / "ddp"
    logs_dir = tmp_path / "logs"
    proc = _torchrun(["train", train, *BUDGET, "--set", "batch_size=4",
                      "-o", out_dir / "model.safetensors"], logs_dir)
    logs = _rank_logs(logs_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)

    # only rank 0 wrote: one file in the output folder (no temporary leftovers), rank 0
    # reported it, rank 1 printed nothing at all (no progress, no summary)
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.safetensors"]
    assert "wrote" in logs[(0, "stdout")]
    assert "2 processes" in logs[(0, "stderr")]  # the two ranks trained as one (DDP)
    assert "epoch 6/6" in logs[(0, "stderr")]
    assert logs[(1, "stdout")] == "" and logs[(1, "stderr")] == "", logs

    # the model loads (state dict of the plain network: no 'module.' prefixes), it trained
    # for the whole budget, and it segments held-out images as well as the single process
    model = rs.load(out_dir / "model.safetensors")
    assert len(model.history_) == 6
    d_single = _mean_dice(single, images, truth)
    d_ddp = _mean_dice(out_dir / "model.safetensors", images, truth)
    d_blank = _mean_dice(blank, images, truth)
    assert d_single > 0.8, d_single  # measured 0.91 at this budget
    assert abs(d_ddp - d_single) < 0.05, (d_ddp, d_single)  # measured 0.92 vs 0.91
    assert d_ddp > d_blank + 0.4, (d_ddp, d_blank)


@pytest.mark.parametrize("n, world", [(29, 2), (5, 4), (3, 8)])
def test_shards_cover_every_sample_with_equal_steps_per_process(n, world):
    """Every process takes the same number of steps of the same sizes (or DDP waits forever),
    the shards together hold every training sample, and each epoch is a new permutation."""
    import torch
    from raterseg.train import _sharded_batches

    indices = torch.arange(100, 100 + n)
    epochs = []
    for epoch in (0, 1):
        shards = [[b.tolist() for b in _sharded_batches(indices, 4, 7, epoch, r, world)]
                  for r in range(world)]
        assert len({tuple(len(b) for b in s) for s in shards}) == 1, shards
        flat = [i for s in shards for b in s for i in b]
        assert set(flat) == set(indices.tolist())
        assert len(flat) == world * -(-n // world)  # padded to a multiple of the world size
        epochs.append(shards)
    if n > 3:
        assert epochs[0] != epochs[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cm", "tgce", "mrprism", "avap", "softseg"])
def test_every_learned_method_trains_under_torchrun(method, data, tmp_path):
    """Each learned method's network and loss work with DDP: no parameter left without a
    gradient (DDP would stop at the second step), avap's frozen second step included; the
    model written by rank 0 loads and predicts. (The fast test above covers ``unet``.)"""
    train, images, _ = data
    out = tmp_path / "model.safetensors"
    argv = ["train", train, "--method", method, "--set", "features=4,8,8,8,8", "--set",
            "epochs=2", "--set", "batch_size=4", "--device", "cpu", "-o", out]
    proc = _torchrun(argv, tmp_path / "logs")
    assert proc.returncode == 0, (proc.stdout, proc.stderr, _rank_logs(tmp_path / "logs"))
    model = rs.load(out)
    assert len(model.history_) == 2
    assert model.predict(images[:2]).probabilities.shape == (2, 2, 32, 32)


def test_unusable_output_refused_before_training(data, tmp_path, capsys):
    """Every process checks ``-o`` before training: a bad path costs no training and gives one
    clear line (a file where a folder should be was a FileExistsError from rank 0 after
    training, and a dropped connection on the other ranks)."""
    train, _, _ = data
    (tmp_path / "afile").write_text("x")
    code = main(["train", str(train), *BUDGET, "-o", str(tmp_path / "afile" / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--output" in err and "afile" in err and "epoch" not in err, err


def test_incomplete_launcher_environment_is_one_clear_line(data, tmp_path, monkeypatch, capsys):
    """WORLD_SIZE set without the rest of torchrun's environment (MASTER_ADDR...): exit 2 and
    a line saying what is missing (was a ValueError traceback from torch.distributed)."""
    train, _, _ = data
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    code = main(["train", str(train), *BUDGET, "-o", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "MASTER_ADDR" in err and "torchrun" in err, err
    assert len(err.strip().splitlines()) == 1, err


_FUSE_PER_RANK = """
import sys
import numpy as np
import torch.distributed as dist
import raterseg as rs
from raterseg import synth

dist.init_process_group("gloo")
rank = dist.get_rank()
image, raters, _ = synth.sample_case(dims=3, num_raters=3, seed=rank, shape=(8, 24, 24))
res = rs.fuse(raters, image=image, method="cm", device="cpu", seed=0, epochs=2,
              features=(4, 8, 8, 8, 8), batch_size=2)
np.save(sys.argv[1] + f"/prob{rank}.npy", res.probabilities)
dist.barrier()
dist.destroy_process_group()
"""


def test_fuse_under_a_process_group_trains_each_case_alone(tmp_path):
    """A user's script under torchrun whose processes fuse different cases: each result is
    the single-process result of its own case (not a data-parallel model of both)."""
    script = tmp_path / "fuse_per_rank.py"
    script.write_text(_FUSE_PER_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
        check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        image, raters, _ = synth.sample_case(dims=3, num_raters=3, seed=rank, shape=(8, 24, 24))
        alone = rs.fuse(raters, image=image, method="cm", device="cpu", seed=0, epochs=2,
                        features=(4, 8, 8, 8, 8), batch_size=2)
        np.testing.assert_allclose(np.load(tmp_path / f"prob{rank}.npy"), alone.probabilities,
                                   atol=1e-5)

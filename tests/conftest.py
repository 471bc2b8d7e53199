"""Shared fixtures: the optional ../shared data folder and a seeded random generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: ../shared beside the repository (tests/ -> repo root -> its parent); absent on CI.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared data folder; the test is skipped (with the reason) when it is absent."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"shared data folder {SHARED / 'data'} is absent (only on the dev machine)")
    return SHARED


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh generator with a fixed seed, so every test is repeatable."""
    return np.random.default_rng(1234)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One torch thread for the whole suite (override with RATERSEG_TEST_THREADS).

    The test models are tiny: a second thread buys little on them, and on a busy
    2-core machine torch's thread pool can make small operations 20x slower.
    """
    import os

    try:
        import torch
    except ImportError:  # the core's numpy-only parts are testable without torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("RATERSEG_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_split():
    """32 small 2D phantoms with 3 raters (good, over, under; ``synth.sample_case``):
    ``(images, raters, truth)`` of 24 training cases and of 8 held-out ones. Needs no
    ../shared data, so the learned methods' quality checks also run on CI."""
    from raterseg import synth

    cases = [synth.sample_case(dims=2, num_raters=3, seed=i, shape=(32, 32)) for i in range(32)]
    images = np.stack([c[0] for c in cases]).astype(np.float32)
    raters = np.stack([c[1] for c in cases])
    truth = np.stack([c[2] for c in cases])
    return (images[:24], raters[:24], truth[:24]), (images[24:], raters[24:], truth[24:])


@pytest.fixture(scope="session")
def held_out_dice(phantom_split):
    """``held_out_dice(method)``: mean Dice against the truth on the held-out phantoms of
    ``method`` (unfitted) trained on the training ones, predicting from the images alone."""
    from raterseg import metrics

    (x, y, _), (xt, _, tt) = phantom_split

    def score(method) -> float:
        res = method.fit(x, y).predict(xt)
        return float(np.mean([metrics.dice(p, t) for p, t in zip(res.truth, tt)]))

    return score

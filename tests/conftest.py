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

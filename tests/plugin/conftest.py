"""Fixtures for the plugin tests (napari's ``make_napari_viewer`` comes from napari's
pytest plugin; pytest-xvfb provides the X server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LIDC_SLICES = SHARED / "data" / "lidc" / "LIDC-IDRI-slices"


@pytest.fixture
def lidc_slices() -> Path:
    """The LIDC-IDRI-slices folder of ../shared (skips where it is absent)."""
    if not LIDC_SLICES.is_dir():
        pytest.skip(f"shared test data not found at {LIDC_SLICES}")
    return LIDC_SLICES


@pytest.fixture
def notifications():
    """Collect napari notifications (errors shown to the user) during a test."""
    from napari.utils.notifications import notification_manager

    seen: list = []

    def collect(notification):
        seen.append(notification)

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)


@pytest.fixture(scope="session")
def sample_3d_layers():
    """The plugin's 3D sample data (image + 4 rater layers), made once per session."""
    from napari_raterseg._sample_data import make_sample_3d

    return make_sample_3d()


@pytest.fixture
def sample_3d_viewer(make_napari_viewer, sample_3d_layers):
    """A viewer holding copies of the 3D multi-rater phantom's layers."""
    viewer = make_napari_viewer()
    for data, kwargs, ltype in sample_3d_layers:
        getattr(viewer, f"add_{ltype}")(np.array(data, copy=True), **kwargs)
    return viewer


def snapshot(viewer) -> dict[str, np.ndarray]:
    """Copies of every layer's data, to check later that nothing changed it."""
    return {lyr.name: np.array(lyr.data, copy=True) for lyr in viewer.layers}


@pytest.fixture
def layer_snapshot():
    return snapshot

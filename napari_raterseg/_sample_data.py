"""Sample data: synthetic multi-rater phantoms (2D and 3D) from :mod:`raterseg.synth`.

Each sample is an image layer plus one Labels layer per simulated rater, named
after the rater's behaviour (good, over- and under-segmenting, "wrong" with
fractures, label noise), so that fusion methods have something to tell apart.
Only numpy/scipy run here: opening sample data never imports torch.
"""

from __future__ import annotations

from typing import Any

NUM_RATERS = 4
#: One colour per behaviour, so the raters' outlines can be told apart.
KIND_COLORS = {"good": "lime", "over": "magenta", "under": "cyan", "wrong": "yellow",
               "flip": "orange"}


def _sample(dims: int, seed: int = 0) -> list[tuple[Any, dict, str]]:
    from raterseg.synth import SAMPLE_KINDS, sample_case

    image, raters, _truth = sample_case(dims=dims, num_raters=NUM_RATERS, seed=seed)
    name = f"phantom {dims}d"
    layers: list[tuple[Any, dict, str]] = [(image, {"name": name, "colormap": "gray"}, "image")]
    for r in range(raters.shape[0]):
        kind = SAMPLE_KINDS[r % len(SAMPLE_KINDS)]
        colormap = {0: "transparent", None: KIND_COLORS[kind]}
        layers.append((raters[r], {"name": f"rater {r + 1} ({kind})", "opacity": 0.7,
                                   "colormap": colormap, "visible": r == 0,
                                   "metadata": {"rater": kind}}, "labels"))
    return layers


def make_sample_2d() -> list[tuple[Any, dict, str]]:
    """A 128×128 phantom with 4 simulated raters (good, over, under, wrong)."""
    return _sample(2)


def make_sample_3d() -> list[tuple[Any, dict, str]]:
    """A 64×128×128 (D, H, W) phantom with 4 simulated raters (good, over, under, wrong)."""
    return _sample(3)

"""napari-raterseg: napari plugin over the raterseg core.

Kept light on purpose: napari discovers the plugin through napari.yaml, and each
contribution module imports Qt, magicgui, raterseg or torch only when used.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``napari_raterseg.api`` after a plain ``import napari_raterseg`` (the console example in
    DESIGN.md and README), imported on first use so that discovering the plugin stays light."""
    if name == "api":
        import importlib

        return importlib.import_module(f"{__name__}.api")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

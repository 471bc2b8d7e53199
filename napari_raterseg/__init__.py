"""napari-raterseg: napari plugin over the raterseg core.

Kept light on purpose: napari discovers the plugin through napari.yaml, and each
contribution module imports Qt, magicgui, raterseg or torch only when used.
"""

__version__ = "0.1.0"

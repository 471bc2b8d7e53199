"""napari-raterseg: napari plugin over the raterseg core."""

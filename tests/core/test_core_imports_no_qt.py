"""The core never imports napari, magicgui or Qt — not even indirectly (DESIGN.md).

Runs in a fresh interpreter: imports ``raterseg`` and every submodule (and loads every
registered method), then inspects ``sys.modules``.
"""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("napari", "napari_raterseg", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide2",
             "PySide6", "superqt", "vispy")

CODE = f"""
import importlib, pkgutil, sys
import raterseg
names = ["raterseg"]
for info in pkgutil.walk_packages(raterseg.__path__, "raterseg."):
    if info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
    names.append(info.name)
raterseg.available_methods()  # imports every method module
bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(len(names), "modules")
print("FORBIDDEN:", bad)
sys.exit(1 if bad else 0)
"""


def test_core_never_imports_gui_packages():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[0]) >= 10  # the walk really imported the package tree


NUMPY_ONLY = ("raterseg.types", "raterseg.synth", "raterseg.metrics", "raterseg.io")


def test_numpy_only_modules_do_not_import_torch():
    code = ("import sys, importlib\n"
            f"for m in {NUMPY_ONLY!r}: importlib.import_module(m)\n"
            "print('torch' in sys.modules); sys.exit('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=600)
    assert proc.returncode == 0, "importing types/synth/metrics/io pulled in torch: " + \
        proc.stdout + proc.stderr

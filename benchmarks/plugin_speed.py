"""Plugin speed: fusing the 3D sample (64×128×128, 4 raters) with STAPLE in napari.

Times, side by side in one run (median of ``--repeats`` after one warm-up):

- ``core``: ``raterseg.fuse(raters, method="staple")`` alone;
- ``console``: ``napari_raterseg.api.fuse_layers`` — copying the layers, fusing,
  adding (or replacing) the result layers;
- ``widget``: the "Fuse raters" widget from pressing Run to the result layers and
  tables being in place (thread worker, signals, layer updates, table filling);
- ``ui stall``: the longest gap between ticks of a 10 ms Qt timer on the UI thread
  while the widget's job runs — how long the viewer stops answering the user.

Writes its table into docs/BENCHMARKS.md between the ``plugin_speed`` markers. Runs
headless: it starts Xvfb when there is no display.

    python benchmarks/plugin_speed.py [--repeats 7] [--no-docs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
from _common import cpu_model, replace_section

TARGET_S = 2.0


def _ensure_display() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY") or not shutil.which("Xvfb"):
        if not os.environ.get("DISPLAY"):
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
        return None
    display = ":97"
    proc = subprocess.Popen(["Xvfb", display, "-screen", "0", "1600x1200x24", "-nolisten",
                             "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["DISPLAY"] = display
    time.sleep(1.0)
    return proc


def run(repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    import napari
    import raterseg as rs
    from qtpy.QtCore import QElapsedTimer, QEventLoop, QTimer

    from napari_raterseg._sample_data import make_sample_3d
    from napari_raterseg._widget import FuseRatersWidget
    from napari_raterseg.api import fuse_layers

    layers = make_sample_3d()
    viewer = napari.Viewer(show=False)
    for data, kwargs, ltype in layers:
        getattr(viewer, f"add_{ltype}")(data, **kwargs)
    image_name = layers[0][1]["name"]
    rater_names = [kw["name"] for _, kw, t in layers if t == "labels"]
    raters = np.stack([viewer.layers[n].data for n in rater_names])
    widget = FuseRatersWidget(viewer)
    widget.method.value = "staple"

    def core():
        rs.fuse(raters, method="staple")

    def console():
        fuse_layers(viewer, image_name, rater_names, "staple")

    stalls: list[float] = []

    def via_widget():
        loop = QEventLoop()
        ticks = QElapsedTimer()
        gaps: list[float] = []
        timer = QTimer()
        timer.setInterval(10)

        def tick():
            gaps.append(ticks.restart() / 1000)

        timer.timeout.connect(tick)
        widget.controls.done.connect(loop.quit)
        ticks.start()
        timer.start()
        widget.controls.run_button.click()
        loop.exec_()
        timer.stop()
        widget.controls.done.disconnect(loop.quit)
        assert widget.last_result is not None, widget.controls.status.text()
        stalls.append(max(gaps) if gaps else float("nan"))

    cases = {"core": core, "console": console, "widget": via_widget}
    times: dict[str, list[float]] = {k: [] for k in cases}
    load0 = os.getloadavg()[0]
    for fn in cases.values():  # warm-up: imports, first allocation
        fn()
    stalls.clear()
    for _ in range(repeats):
        for name, fn in cases.items():  # interleaved, so all see the same load
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    load1 = os.getloadavg()[0]
    viewer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median": med, "all": times, "stall": statistics.median(stalls),
            "stall_max": max(stalls), "load": (load0, load1), "repeats": repeats,
            "shape": tuple(raters.shape[1:]), "num_raters": raters.shape[0],
            "torch": torch.__version__, "napari": napari.__version__}


def table(res: dict) -> str:
    med = res["median"]
    shape = "×".join(map(str, res["shape"]))
    met = "met" if med["widget"] < TARGET_S else "NOT met"
    lines = [
        "## Plugin",
        "",
        (f"Fusing the 3D sample ({shape}, {res['num_raters']} raters) with `staple` in napari "
         f"{res['napari']}, headless (Xvfb); median of {res['repeats']} runs after a warm-up, "
         f"the three ways interleaved; torch {res['torch']} with 2 threads; CPU: {cpu_model()} "
         f"({os.cpu_count()} cores), shared with other jobs (1-min load average "
         f"{res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end)."),
        "",
        "| path | median (s) | runs (s) |",
        "|---|---|---|",
    ]
    what = {"core": "`rs.fuse(raters, method=\"staple\")` (core only)",
            "console": "`fuse_layers(viewer, ...)` (layers → fuse → layers)",
            "widget": "Fuse raters widget: Run → layers and tables in place"}
    for k in ("core", "console", "widget"):
        runs = ", ".join(f"{t:.2f}" for t in res["all"][k])
        lines.append(f"| {what[k]} | {med[k]:.3f} | {runs} |")
    lines += [
        "",
        (f"Widget round trip under {TARGET_S:.0f} s: **{met}** ({med['widget']:.2f} s). "
         f"While the job ran, the UI thread's longest pause between 10 ms timer ticks was "
         f"{res['stall'] * 1000:.0f} ms (median over runs; worst {res['stall_max'] * 1000:.0f} ms): "
         "the fusion runs in a thread worker and the UI thread only copies layers in and "
         "adds result layers at the end."),
        "",
        "Reproduce: `python benchmarks/plugin_speed.py`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = ap.parse_args(argv)
    xvfb = _ensure_display()
    try:
        res = run(args.repeats)
    finally:
        if xvfb is not None:
            xvfb.terminate()
    text = table(res)
    print(text)
    if not args.no_docs:
        replace_section("plugin_speed", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the U-Net's up-sampling cause the stripes in the uncertainty maps? (LIDC, CPU-sized)

Every learned method shares MONAI's ``BasicUNet`` trunk with transposed-convolution
up-sampling (``upsample="deconv"``, kernel = stride = 2), which can leave a checkerboard in
an undertrained network's probabilities (docs/BENCHMARKS.md, accuracy section). This
ablation trains ``unet`` (target STAPLE, as in ``benchmarks/accuracy.py``'s LIDC run, same
data, sizes and budget) with each of MONAI's up-sampling modes, patching the trunk for this
process only:

- ``deconv``: the default;
- ``nontrainable``: bilinear interpolation followed by the block's convolutions;
- ``pixelshuffle``: sub-pixel convolution with ICNR initialisation (Aitken et al. 2017),
  designed to start free of checkerboard artefacts.

Reported per seed and mode: Dice (%) against STAPLE of the 4 raters, soft Dice (%) against
the raters' mean, and the *roughness* of the foreground probability: the mean absolute
second difference along rows and columns, over pixels where any rater marked the nodule
(a checkerboard of amplitude a adds about 2a).

    python benchmarks/upsample_lidc.py --seeds 0 1 2 --json docs/upsample_lidc_cpu.json

Needs ../shared/data/lidc/lidc_dev.npz.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

MODES = ("deconv", "nontrainable", "pixelshuffle")


def roughness(prob: np.ndarray, where: np.ndarray) -> float:
    """Mean |second difference| of ``prob`` (N, H, W) along H and W, over ``where``."""
    d_h = np.abs(prob[:, 2:, :] - 2 * prob[:, 1:-1, :] + prob[:, :-2, :])[where[:, 1:-1, :]]
    d_w = np.abs(prob[:, :, 2:] - 2 * prob[:, :, 1:-1] + prob[:, :, :-2])[where[:, :, 1:-1]]
    return float(np.concatenate([d_h, d_w]).mean())


def patch_upsample(mode: str) -> None:
    """Make the trunk of every network built from now on (in this process) use ``mode``."""
    import functools

    import raterseg.nn.backbones as B

    original = getattr(B.unet_trunk, "func", B.unet_trunk)  # unwrap an earlier patch
    B.unet_trunk = functools.partial(original, upsample=mode)


def run(seed: int, mode: str, args) -> dict:
    import raterseg as rs
    from raterseg import metrics

    (xtr, ytr), (xte, yte) = C.load_lidc(C.LIDC, args.crop, args.n_train, args.n_test, seed)
    ref = np.stack([rs.fuse(y, method="staple", num_classes=2, device="cpu").truth for y in yte])
    mean = (yte == 1).mean(1)
    patch_upsample(mode)
    model = rs.create("unet", num_classes=2, device=args.device, seed=seed, target="staple",
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      features=tuple(args.features), patience=0)
    t0 = time.perf_counter()
    model.fit(xtr, ytr)
    sec = time.perf_counter() - t0
    res = model.predict(xte)
    fg = res.probabilities[:, 1]
    marked = (yte == 1).any(1)
    out = {"seed": seed, "mode": mode, "fit_seconds": sec,
           "dice": 100 * C.mean_dice(res.truth, ref),
           "soft_dice": 100 * float(np.mean([metrics.soft_dice(p, m) for p, m in zip(fg, mean)])),
           "roughness": roughness(fg, marked),
           "mean_fg_prob_marked": float(fg[marked].mean())}
    print(f"[seed {seed}] {mode}: Dice {out['dice']:.2f}, soft Dice {out['soft_dice']:.2f}, "
          f"roughness {out['roughness']:.4f}, mean p(fg) where marked "
          f"{out['mean_fg_prob_marked']:.3f} ({sec:.0f} s)", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--features", type=int, nargs=5, default=[8, 16, 32, 64, 128])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [run(seed, mode, args) for seed in args.seeds for mode in args.modes]
    report = {"benchmark": "upsample_lidc", "args": {**vars(args), "json": str(args.json)},
              "machine": {"cpu": C.cpu_model(), "platform": platform.platform(),
                          "torch": torch.__version__, "threads": args.threads},
              "wall_seconds": time.perf_counter() - t0, "runs": runs}
    print("| seed | mode | Dice vs STAPLE | soft Dice | roughness | mean p(fg) where marked |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['seed']} | {r['mode']} | {r['dice']:.2f} | {r['soft_dice']:.2f} | "
              f"{r['roughness']:.4f} | {r['mean_fg_prob_marked']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Seconds of the refine stage's unseen-space test (`geometry.visibility.unseen`) per grid resolution.

A box 0.8 wide with a shallow dent in its base, on the refine grids of the presets (48 quick, 64 fast, 128
standard, 192 high), for parallel rays and for rays to the default cameras' places (elevations -10 to 90
degrees, distance 3.2). The refine stage runs the test twice (at its start and end), on the CPU.

    python -m bench.visibility_speed [--grids 48 128 192] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from geometry.visibility import CameraBand, unseen

BOX = 1.1  # half size of the grid's box, world units (the object's box plus its margin)


def dented_box(n: int) -> np.ndarray:  # [n+1]^3 bool
    axis = np.linspace(-BOX, BOX, n + 1)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    inside = (np.maximum(np.abs(x), np.abs(y)) < 0.4) & (np.abs(z) < 0.4)
    return inside & ~((x**2 + y**2 < 0.04) & (z < -0.35))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[48, 64, 128, 192])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'grid':>5}{'rays':>10}{'seconds':>9}{'unseen vertices':>17}")
    for n in args.grids:
        inside = dented_box(n)
        cell, origin = np.full(3, 2 * BOX / n), np.full(3, -BOX)
        for name, band in (("parallel", CameraBand((-10.0, 90.0))), ("cameras", CameraBand((-10.0, 90.0), distance=3.2))):
            start = time.perf_counter()
            hidden = unseen(inside, cell, band, origin)
            print(f"{n:>5}{name:>10}{time.perf_counter() - start:>9.2f}{int(hidden.sum()):>17}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

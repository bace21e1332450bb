"""Seconds of the export's short-edge collapse (`geometry.short_edges`) on a hard case: a wavy ball marched
on each preset's refine grid with half the grid vertices near its surface a hair's breadth off it, so
thousands of vertices pile up (a refined surface has a few hundred such edges; the benchmark's take 0.2-0.3 s).

    python -m bench.short_edges_speed [--grids 48 64 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

from geometry.short_edges import collapse_short_edges
from geometry.tets import make_tet_grid, marching_tets


def crowded_ball(resolution: int, seed: int = 0):
    """(vertices, faces) of the hard case at `resolution` grid cells per axis, as numpy arrays."""
    verts, tets = make_tet_grid(resolution, (-0.6,) * 3, (0.6,) * 3, dtype=torch.float64)
    sdf = verts.norm(dim=1) - 0.45 + 0.02 * torch.sin(9 * verts[:, 0]) * torch.cos(7 * verts[:, 1])
    pick = torch.rand(sdf.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) < 0.5
    sdf = torch.where((sdf.abs() < 0.004) & pick, torch.full_like(sdf, 1e-6), sdf)
    v, f = marching_tets(verts, tets, sdf)
    return v.numpy(), f.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[48, 64, 128])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'grid':>5}{'faces':>9}{'after':>9}{'left':>6}{'seconds':>9}")
    for resolution in args.grids:
        v, f = crowded_ball(resolution)
        start = time.perf_counter()
        _, faces, left = collapse_short_edges(v, f)
        print(f"{resolution:>5}{len(f):>9}{len(faces):>9}{left:>6}{time.perf_counter() - start:>9.2f}")


if __name__ == "__main__":
    main()

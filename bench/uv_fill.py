"""Texture fill and unwrap time of geometry.uv.unwrap on the `quick` export's meshes.

Marching-tetrahedra meshes (clean sphere / cube / torus / capsule / cone on the 48-cell grid,
and "lumpy" sphere / cube / torus: SDF + 0.015 + 0.008 sin-noise on a 64-cell grid), cleaned
and decimated to 20k faces as the quick export does, unwrapped at 512 px. Prints fill,
overlapping texels, flipped UV triangles and unwrap seconds per mesh.

    OMP_NUM_THREADS=1 python -m bench.uv_fill [--shapes sphere torus] [--cache /tmp/uvmeshes]
    OMP_NUM_THREADS=1 python -m bench.uv_fill --runs bench/out/quality    # finished runs' refined meshes instead
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bench.export_checks import shape_sdf
from geometry.mesh_ops import clean_mesh, decimate
from geometry.tets import make_tet_grid, marching_tets
from geometry.uv import overlapping_texels, texture_fill, unwrap
from geometry.uv_charts import components, edge_pairs
from stages.config import preset

SHAPES = ("sphere", "cube", "torus", "capsule", "cone", "lumpy sphere", "lumpy cube", "lumpy torus")


def sdf(name: str, points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N], < 0 inside
    x, y, z = points.unbind(-1)
    if name.startswith("lumpy "):
        noise = torch.sin(23 * x) * torch.sin(19 * y + 1) * torch.sin(29 * z + 2)
        return shape_sdf(name[6:], points) + 0.015 + 0.008 * noise
    if name == "capsule":  # segment z in [-0.25, 0.25], radius 0.3
        return torch.sqrt(x**2 + y**2 + (z - z.clamp(-0.25, 0.25)) ** 2) - 0.3
    if name == "cone":  # base radius 0.45 at z = -0.45, apex at z = +0.45 (bounded, exact enough for its zero set)
        r = torch.sqrt(x**2 + y**2)
        side = (r - 0.45 * (0.45 - z) / 0.9) * (0.9 / np.hypot(0.9, 0.45))
        return torch.maximum(side, torch.maximum(-0.45 - z, z - 0.45))
    return shape_sdf(name, points)


def mesh(name: str, cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    path = cache / f"{name.replace(' ', '_')}.npz" if cache else None
    if path and path.exists():
        data = np.load(path)
        return data["v"], data["f"]
    grid = 64 if name.startswith("lumpy") else 48
    points, tets = make_tet_grid(grid, (-0.7,) * 3, (0.7,) * 3)
    verts, faces = marching_tets(points, tets, sdf(name, points))
    v, f = as_exported(verts, faces, preset("quick").export)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, v=v, f=f)
    return v, f


def as_exported(verts: torch.Tensor, faces: torch.Tensor, config) -> tuple[np.ndarray, np.ndarray]:
    """The mesh the export stage unwraps: cleaned, decimated to config.target_faces, cleaned again."""
    v, f = clean_mesh(verts.double().numpy(), faces.long().numpy(), config.min_component_ratio, config.merge_distance)
    v, f = decimate(v, f, config.target_faces)
    return clean_mesh(v, f, config.min_component_ratio, config.merge_distance)


def run_meshes(folders: list[Path]) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
    """The refined meshes of finished runs (each folder a run, or a folder of runs), as their export
    unwraps them: (name, vertices, faces, texture size)."""
    from bench.refine_gain import run_folders
    from stages.runs import load_refine_checkpoint, load_run_config

    out = []
    for run in run_folders(folders):
        (verts, faces), _ = load_refine_checkpoint(run / "refine.pt", torch.device("cpu"))
        config = load_run_config(run)[1].export
        out.append((run.name, *as_exported(verts, faces, config), config.texture_size))
    return out


def check(v: np.ndarray, f: np.ndarray, size: int = 512) -> dict:
    t0 = time.perf_counter()
    vmap, uv_faces, uv = unwrap(v, f, size)
    seconds = time.perf_counter() - t0
    assert np.array_equal(vmap[uv_faces], f)
    e1, e2 = uv[uv_faces[:, 1]] - uv[uv_faces[:, 0]], uv[uv_faces[:, 2]] - uv[uv_faces[:, 0]]
    sign = np.sign(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    a, b = edge_pairs(uv_faces)  # UV charts: faces sharing UV vertices; xatlas may mirror a whole chart
    chart = components(len(uv_faces), a, b, np.ones(len(a), bool))
    majority = np.sign(np.bincount(chart, sign))[chart]
    flips = int(((sign != 0) & (sign != majority)).sum())  # triangles wound against their chart
    return {"faces": len(f), "fill": texture_fill(uv, uv_faces, size), "overlap": overlapping_texels(uv, uv_faces, size),
            "flips": flips, "in_unit": bool(uv.min() >= 0 and uv.max() <= 1), "unwrap_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--cache", default="/tmp/uv_fill_meshes", help="folder for the decimated meshes ('' = none)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", nargs="+", type=Path, help="instead: finished runs' refined meshes (run folders or folders of runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(args.cache) if args.cache else None
    if args.runs:
        meshes = run_meshes(args.runs)
    else:
        meshes = [(name, *mesh(name, cache), args.size) for name in args.shapes]
    fills = []
    print(f"{'mesh':22s} faces  fill   overlap flips in_unit unwrap_s")
    for name, v, f, size in meshes:
        row = check(v, f, size)
        fills.append(row["fill"])
        print(f"{name:22s} {row['faces']:5d}  {row['fill']:.3f}  {row['overlap']:5d}  {row['flips']:5d}  {row['in_unit']!s:5s}  {row['unwrap_s']:.2f}")
    print(f"mean fill {np.mean(fills):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

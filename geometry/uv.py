"""UV atlases: xatlas unwrapping packed into one square texture, and how much of it is used.

Packing settings, measured on marching-tetrahedra meshes of a sphere, a cube and a torus
(48-cell grid, decimated to 20k faces as the `quick` export does) at 512 px
(bench/export_checks.py; fill = fraction of texel centres covered by a triangle): the
packing before (block-aligned greedy placement, bilinear borders, 2 texels of padding)
filled 0.49 / 0.87 / 0.33; brute-force placement without block alignment or bilinear
borders and 1 texel of padding fills 0.57 / 0.94 / 0.44, for ~2 s more per export.
The issue's target, 0.7, is not reached for curved shapes: the gaps between xatlas's
irregular chart outlines, not the padding, are most of the loss. Larger charts did not help: a higher chart-area cap made xatlas
split the noisy surfaces into more charts, not fewer, and took 2-10x longer; nor did
packing at twice the texel density with twice the padding. One texel of padding suffices
because the bake dilates every chart into the empty texels around it, and each chart's
bitmap is conservative (it owns every texel it touches).
"""
from __future__ import annotations

import math

import numpy as np
import torch

ATLAS_FILL_GUESS = 0.7  # expected xatlas utilisation, sizes the atlas near the texture size
RASTER_CHUNK = 8192  # triangles per visibility pass of the torch rasterizer


def face_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:  # [V, 3], [F, 3] -> [F]
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


def unwrap(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    texture_size: int,  # texels per side of the texture the atlas is meant for
    faces_per_chart: int = 250,  # caps a chart's area at about this many faces' worth; 0 = no cap
    padding: int = 1,  # empty texels between charts
    max_iterations: int = 0,  # xatlas chart-optimisation iterations
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # vmapping [V'], faces [F, 3] into V', uv [V', 2] in [0, 1]
    """xatlas parametrization packed into one atlas. Chart area is capped because xatlas' time
    grows faster than linearly with the faces of a chart. Vertices are split along chart seams:
    `vmapping` gives the input vertex of each output vertex."""
    import xatlas

    area = float(face_areas(vertices, faces).sum())
    atlas = xatlas.Atlas()
    atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32))
    charts = xatlas.ChartOptions()
    charts.max_iterations = max_iterations
    if faces_per_chart > 0:
        charts.max_chart_area = area * faces_per_chart / len(faces)
    pack = xatlas.PackOptions()
    pack.padding = padding
    pack.bruteForce = True  # tries every position for each chart: +10-25 % fill over the greedy search
    pack.blockAlign = False  # 4x4-aligned placement leaves gaps between small charts
    pack.bilinear = False  # its extra border ring duplicates what `padding` and the bake's dilation do
    pack.rotate_charts = True
    # resolution 0 keeps a single atlas; texels_per_unit sizes it near texture_size.
    pack.resolution = 0
    pack.texels_per_unit = texture_size * math.sqrt(ATLAS_FILL_GUESS / max(area, 1e-20))
    atlas.generate(charts, pack)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases, expected 1")
    vmapping, indices, uv = atlas.get_mesh(0)
    return vmapping.astype(np.int64), indices.astype(np.int64).reshape(-1, 3), uv.astype(np.float32)


def uv_coverage(
    uv: torch.Tensor,  # [V', 2] in [0, 1]
    faces: torch.Tensor,  # [F, 3] long, into uv
    size: int,  # texels per side
) -> tuple[torch.Tensor, torch.Tensor]:  # rast [1, T, T, 4] (see renderers.raster), covered [T, T] bool
    """Rasterize a mesh in UV space: which texel centres a triangle covers, and which one."""
    from renderers.raster import rasterize

    pos_clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], 1)[None]
    rast = rasterize(pos_clip, faces, (size, size), chunk_size=RASTER_CHUNK)
    return rast, rast[0, ..., 3] > 0


def texture_fill(uv: np.ndarray, faces: np.ndarray, size: int) -> float:
    """Fraction of a size x size texture's texel centres that some triangle covers."""
    _, covered = uv_coverage(torch.as_tensor(uv, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long), size)
    return float(covered.float().mean())

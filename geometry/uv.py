"""UV atlases: axis-projected charts packed by xatlas into one square texture, and how much of it is used.

Charts: each face is projected along one of the six axis directions (+x, -x, ... like a cube
map), the one nearest its normal, after its borders have been straightened and small pieces
given to a neighbouring direction; a face never takes a direction more than 60 degrees from
its normal (MIN_FACING), so no projected triangle flips. Connected faces of one direction form
a chart, optionally cut on a square grid in its plane (CHART_CELLS); each cut is straightened
along the mesh's edges (a long thin triangle whose longer edges lie on the other side joins
that side), pieces under MERGE_BELOW of a cell join the cell they share most border with, and
pieces under SPLIT_BELOW of their cell (the charts' rims) are cut into quarters, down to
cell / 8: square cells plus small pieces that fill the packer's gaps. xatlas only packs them
(`use_input_mesh_uvs`). Each cut size is packed, and packed again at a density scaled by
texture size / the atlas's larger side when that leaves over 2 % of room (DENSITY_ROOM); the
atlas with the most UV area whose triangles overlap on at most MAX_OVERLAP of the texels
(overhanging lumps can fold a projection) is kept; if all overlap more, xatlas charts the mesh
itself. An atlas larger than the texture is repacked at a lower density until it fits, so its
padding stays at least one texel.

Projected charts fill more of the texture than xatlas's own (its packer places irregular charts by
their bitmaps, and every chart's border ring costs texels); the price is texel density, since an
orthographic projection shrinks a face by the cosine of its tilt. The measurements, and the chart and
packing options tried: bench/HISTORY.md ("Texture fill of the unwrap"; `python -m bench.uv_fill`).
One texel of padding suffices because the bake dilates every chart into the empty
texels around it, and each chart's bitmap is conservative (it owns every texel it touches).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from geometry.mesh_ops import face_areas
from geometry.uv_charts import axis_labels, components, cut_charts, edge_pairs, neighbours

if TYPE_CHECKING:
    from renderers.rasterizer import Rasterizer

ATLAS_FILL_GUESS = 0.6  # expected fill of the atlas, sizes it just under the texture size
RASTER_CHUNK = 8192  # triangles per visibility pass of the torch rasterizer
CHART_CELLS = (0, 64, 96, 128)  # chart cut sizes tried, texels (0 = uncut); the best fill without overlap is kept
DENSITY_ROOM = 1.02  # an atlas whose larger side is this much under the texture size is packed again, larger
MAX_OVERLAP = 1e-4  # fraction of the texels that two triangles may share (overhanging lumps); more rejects an atlas


def _projected_atlas(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    label: np.ndarray,  # [F] axis of each face (axis_labels)
    texels_per_unit: float,
    texture_size: int,
    cell: int,  # cut charts on a square grid of this many texels in their plane; 0 = no cut
    padding: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Charts = connected faces with one axis (and one grid cell); each chart is its faces'
    orthographic projection along its axis, packed by xatlas."""
    import xatlas  # for its ChartOptions

    axis, sign = label // 2, np.where(label % 2 == 0, 1.0, -1.0)

    def project(points: np.ndarray, ax: np.ndarray, sg: np.ndarray) -> np.ndarray:  # [N, 3] -> [N, 2], same winding
        idx = np.arange(len(points))
        return np.stack([points[idx, (ax + 1) % 3], sg * points[idx, (ax + 2) % 3]], 1)

    a, b = edge_pairs(faces)
    if cell > 0:
        corners = project(vertices[faces].reshape(-1, 3), np.repeat(axis, 3), np.repeat(sign, 3)).reshape(-1, 3, 2)
        chart = cut_charts(corners * texels_per_unit, label, neighbours(vertices, faces), a, b, cell)
    else:
        chart = components(len(faces), a, b, label[a] == label[b])
    # Split the vertices along chart borders: one output vertex per (input vertex, chart).
    num_charts = int(chart.max()) + 1
    corner_key = faces.astype(np.int64) * num_charts + chart[:, None]
    unique, split_faces = np.unique(corner_key.reshape(-1), return_inverse=True)
    split_faces = split_faces.reshape(-1, 3)
    vert, vert_chart = unique // num_charts, unique % num_charts
    chart_label = np.zeros(num_charts, np.int64)
    chart_label[chart] = label
    vert_label = chart_label[vert_chart]
    uv = project(vertices[vert], vert_label // 2, np.where(vert_label % 2 == 0, 1.0, -1.0))
    # Charts share no UV: xatlas would otherwise join two cells along their common border.
    step = 1.1 * float((uv.max(0) - uv.min(0)).max()) + 1e-9
    cols = math.ceil(math.sqrt(num_charts))
    uv = uv - uv.min(0) + np.stack([vert_chart % cols, vert_chart // cols], 1) * step
    charts = xatlas.ChartOptions()
    charts.use_input_mesh_uvs = True
    charts.max_iterations = 0
    vmapping, indices, uv, room = _pack(vertices[vert], split_faces, uv, charts, texels_per_unit, texture_size, padding)
    return vert[vmapping], indices, uv, room


def _xatlas_atlas(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    texels_per_unit: float,
    texture_size: int,
    faces_per_chart: int,
    padding: int,
    max_iterations: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas's own charts and parametrization. Chart area is capped because xatlas' time grows
    faster than linearly with the faces of a chart."""
    import xatlas

    charts = xatlas.ChartOptions()
    charts.max_iterations = max_iterations
    if faces_per_chart > 0:
        charts.max_chart_area = float(face_areas(vertices, faces).sum()) * faces_per_chart / len(faces)
    return _pack(vertices, faces, None, charts, texels_per_unit, texture_size, padding)[:3]


def _pack(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    uv: np.ndarray | None,  # [V, 2] charts' parametrization (charts.use_input_mesh_uvs), or None
    charts,  # xatlas.ChartOptions
    texels_per_unit: float,
    texture_size: int,
    padding: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # vmapping [V'], faces [F, 3] into V', uv [V', 2] in [0, 1]
    """One xatlas atlas, packed again at a lower texel density while it comes out wider or
    taller than the texture: scaled down into the texture, its padding would be less than a texel."""
    import xatlas

    for _ in range(4):
        atlas = xatlas.Atlas()
        uv_in = None if uv is None else uv.astype(np.float32)
        atlas.add_mesh(vertices.astype(np.float32), faces.astype(np.uint32), None, uv_in)
        atlas.generate(charts, _pack_options(texels_per_unit, padding))
        if atlas.atlas_count != 1:
            raise RuntimeError(f"xatlas produced {atlas.atlas_count} atlases, expected 1")
        largest = max(atlas.width, atlas.height)
        if largest <= texture_size:
            break
        texels_per_unit *= 0.995 * texture_size / largest
    vmapping, indices, out_uv = atlas.get_mesh(0)
    room = texture_size / largest  # how much larger the atlas could be
    return vmapping.astype(np.int64), indices.astype(np.int64).reshape(-1, 3), out_uv.astype(np.float32), room


def _pack_options(texels_per_unit: float, padding: int):
    import xatlas

    pack = xatlas.PackOptions()
    pack.padding = padding
    pack.bruteForce = True  # tries every position for each chart: a fuller atlas than the greedy search
    pack.blockAlign = False  # 4x4-aligned placement leaves gaps between small charts
    pack.bilinear = False  # its extra border ring duplicates what `padding` and the bake's dilation do
    pack.rotate_charts = True
    pack.resolution = 0  # one atlas, about texels_per_unit * sqrt(area / fill) texels wide
    pack.texels_per_unit = texels_per_unit
    return pack


def unwrap(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    texture_size: int,  # texels per side of the texture the atlas is meant for
    faces_per_chart: int = 250,  # fallback only: caps an xatlas chart's area at this many faces' worth; 0 = no cap
    padding: int = 1,  # empty texels between charts
    max_iterations: int = 0,  # fallback only: xatlas chart-optimisation iterations
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # vmapping [V'], faces [F, 3] into V', uv [V', 2] in [0, 1]
    """Axis-projected charts (see the module docstring) cut at each size of CHART_CELLS and
    packed by xatlas; the atlas with the best fill whose triangles overlap on at most
    MAX_OVERLAP of the texels is kept. If every one overlaps more, xatlas charts the mesh itself.
    Vertices are split along chart seams: `vmapping` gives the input vertex of each output vertex."""
    area = float(face_areas(vertices, faces).sum())
    texels_per_unit = texture_size * math.sqrt(ATLAS_FILL_GUESS / max(area, 1e-20))
    label = axis_labels(vertices, faces)
    atlases = []
    for cell in CHART_CELLS:
        *atlas, room = _projected_atlas(vertices, faces, label, texels_per_unit, texture_size, cell, padding)
        atlases.append(atlas)
        if room > DENSITY_ROOM:  # the atlas came out clearly smaller than the texture: pack it again, larger
            scaled = texels_per_unit * room * 0.995
            atlases.append(_projected_atlas(vertices, faces, label, scaled, texture_size, cell, padding)[:3])
    atlases.sort(key=lambda atlas: uv_area(atlas[2], atlas[1]), reverse=True)  # ~ the fill, without overlaps
    for vmapping, uv_faces, uv in atlases:  # fullest first; the overlap check costs two rasterizations
        if overlapping_texels(uv, uv_faces, texture_size) <= MAX_OVERLAP * texture_size**2:
            return vmapping, uv_faces, uv
    return _xatlas_atlas(vertices, faces, texels_per_unit, texture_size, faces_per_chart, padding, max_iterations)


def uv_area(uv: np.ndarray, faces: np.ndarray) -> float:  # [V', 2], [F, 3] -> summed triangle area
    e1, e2 = uv[faces[:, 1]] - uv[faces[:, 0]], uv[faces[:, 2]] - uv[faces[:, 0]]
    return float(0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum())


def uv_coverage(
    uv: torch.Tensor,  # [V', 2] in [0, 1]
    faces: torch.Tensor,  # [F, 3] long, into uv
    size: int,  # texels per side
    rasterizer: Rasterizer,  # for uv's device
) -> tuple[torch.Tensor, torch.Tensor]:  # rast [1, T, T, 4] (see renderers.raster), covered [T, T] bool
    """Rasterize a mesh in UV space: which texel centres a triangle covers, and which one."""
    pos_clip = torch.cat([uv * 2 - 1, torch.zeros_like(uv[:, :1]), torch.ones_like(uv[:, :1])], 1)[None]
    rast = rasterizer.rasterize(pos_clip, faces, (size, size), RASTER_CHUNK)
    return rast, rast[0, ..., 3] > 0


def texture_fill(uv: np.ndarray, faces: np.ndarray, size: int) -> float:
    """Fraction of a size x size texture's texel centres that some triangle covers."""
    from renderers.rasterizer import Rasterizer

    uv_t, faces_t = torch.as_tensor(uv, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.long)
    _, covered = uv_coverage(uv_t, faces_t, size, Rasterizer.make("torch"))
    return float(covered.float().mean())


def overlapping_texels(uv: np.ndarray, faces: np.ndarray, size: int) -> int:
    """Texel centres covered by two triangles that share no vertex (folded or overlapping
    charts). Each triangle gets its own depth; a texel is covered twice when the nearest
    triangle changes as the depth order is reversed."""
    from renderers.raster import rasterize

    faces_t = torch.as_tensor(faces, dtype=torch.long)
    corners = torch.as_tensor(uv, dtype=torch.float32)[faces_t.reshape(-1)] * 2 - 1  # [3F, 2]
    depth = (torch.arange(len(faces), dtype=torch.float32) / len(faces) - 0.5).repeat_interleave(3)[:, None]
    triangles = torch.arange(3 * len(faces)).reshape(-1, 3)
    winners = []
    for z in (depth, -depth):
        pos_clip = torch.cat([corners, z, torch.ones_like(z)], 1)[None]
        rast = rasterize(pos_clip, triangles, (size, size), chunk_size=RASTER_CHUNK)
        winners.append(rast[0, ..., 3].long() - 1)
    both = (winners[0] != winners[1]) & (winners[0] >= 0)
    first, second = faces_t[winners[0][both]], faces_t[winners[1][both]]  # [N, 3] each
    shares_vertex = (first[:, :, None] == second[:, None, :]).flatten(1).any(1)
    return int((~shares_vertex).sum())

"""Triangle-mesh work: measures (area, volume, watertightness), cleaning and decimation for the export,
unit normals for the files, and the differentiable regularisers of refinement.

Meshes are `verts` [V, 3] float and `faces` [F, 3] long, counter-clockwise seen from outside, as
`geometry.tets.marching_tets` emits them: torch tensors for what refinement differentiates (the
regularisers recompute connectivity from `faces` on each call, since marching tetrahedra changes it
every step: one sort of the 3F half-edges), numpy arrays for the export's cleaning. Vertex normals are
computed by `renderers.mesh.vertex_normals`, which the mesh renderer shades with.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from renderers.mesh import face_normals, vertex_normals

__all__ = [
    "albedo_tilt_loss", "clean_mesh", "decimate", "drop_degenerate", "face_adjacency", "face_areas", "file_normals",
    "is_watertight", "laplacian_loss", "mesh_area", "mesh_edges", "mesh_volume", "normal_consistency_loss",
]


# --------------------------------------------------------------------------- measures
def mesh_volume(verts: Tensor, faces: Tensor) -> Tensor:  # verts [M, 3], faces [F, 3] -> scalar
    """Signed volume by the divergence theorem: positive for a closed outward-facing mesh."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return (v0 * torch.linalg.cross(v1, v2, dim=-1)).sum() / 6.0


def mesh_area(verts: Tensor, faces: Tensor) -> Tensor:  # verts [M, 3], faces [F, 3] -> scalar
    """Total surface area."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return torch.linalg.cross(v1 - v0, v2 - v0, dim=-1).norm(dim=-1).sum() / 2.0


def is_watertight(faces: Tensor) -> bool:  # faces [F, 3] long
    """True when every edge is used by exactly two faces, once in each direction.

    That makes the mesh closed and consistently wound. An empty mesh is not watertight.
    """
    if faces.numel() == 0:
        return False
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)  # [3F, 2] (from, to)
    n = int(faces.max()) + 1
    forward = directed[:, 0] * n + directed[:, 1]
    backward = directed[:, 1] * n + directed[:, 0]
    forward_sorted = torch.sort(forward).values
    if bool((forward_sorted[1:] == forward_sorted[:-1]).any()):
        return False  # a directed edge used twice: non-manifold or flipped neighbour
    return bool(torch.equal(forward_sorted, torch.sort(backward).values))


def face_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:  # [V, 3], [F, 3] -> [F]
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


# --------------------------------------------------------------------------- cleaning (numpy, for the export)
def drop_degenerate(v: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove faces with a repeated vertex, repeated faces (one copy stays), both faces of a
    two-sided fin (one triangle twice, wound both ways) and unused vertices. Zero-area faces
    with three distinct vertices stay: deleting one would open a hole in a closed surface
    (a weld of near-coincident marching-tets vertices makes such slivers)."""
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    start = np.argmin(f, axis=1)[:, None]  # rotate the smallest index first, keeping the winding
    canonical = np.take_along_axis(f, (start + np.arange(3)) % 3, axis=1)
    _, first = np.unique(canonical, axis=0, return_index=True)
    f = f[np.sort(first)]
    _, same, count = np.unique(np.sort(f, axis=1), axis=0, return_inverse=True, return_counts=True)
    f = f[count[same.reshape(-1)] == 1]
    used, f = np.unique(f, return_inverse=True)
    return v[used], f.reshape(-1, 3)


def clean_mesh(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    min_component_ratio: float,
    merge_distance: float,
) -> tuple[np.ndarray, np.ndarray]:  # ([V', 3] float64, [F', 3] int64)
    """Merge duplicate vertices, drop degenerate faces and tiny disconnected pieces."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # 1. Weld vertices on a grid of merge_distance (pairs straddling a grid line stay apart).
    key = np.round(vertices / merge_distance).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    v, f = vertices[first].astype(np.float64), inverse.reshape(-1)[faces].astype(np.int64)
    v, f = drop_degenerate(v, f)
    if len(f) == 0 or min_component_ratio == 0:
        return v, f
    # 2. Connected pieces through shared vertices; keep a piece when its faces or its area reach the ratio.
    edges = np.concatenate([f[:, :2], f[:, 1:]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(v), len(v)))
    _, labels = connected_components(graph, directed=False)
    face_label = labels[f[:, 0]]
    counts = np.bincount(face_label)
    areas = np.bincount(face_label, weights=face_areas(v, f))
    keep = (counts >= min_component_ratio * counts.max()) | (areas >= min_component_ratio * areas.max())
    return drop_degenerate(v, f[keep[face_label]])


# Quadric collapses ignore topology: one can pinch two sheets of a thin part into an edge of four faces. A result
# that is not watertight is redone with another aggressiveness (fast-simplification's default first), then with a
# larger face budget; where none is watertight the mesh is kept undecimated.
DECIMATE_AGGRESSIVENESS = (7.0, 5.0, 3.0, 9.0)
DECIMATE_BUDGETS = (1.0, 1.25, 1.5, 2.0)  # times target_faces


def decimate(vertices: np.ndarray, faces: np.ndarray, target_faces: int, simplify=None) -> tuple[np.ndarray, np.ndarray]:
    """Quadric edge-collapse decimation to about `target_faces` (package fast-simplification; `simplify` stands in
    for its function in tests). A watertight mesh stays watertight, at the cost of more faces where it must."""
    if target_faces == 0 or len(faces) <= target_faces:
        return vertices, faces
    if simplify is None:
        try:
            from fast_simplification import simplify
        except ImportError as err:
            raise ImportError("decimation needs `pip install fast-simplification` (or set target_faces=0)") from err
    closed = is_watertight(torch.as_tensor(np.asarray(faces, np.int64)))
    for budget in DECIMATE_BUDGETS:
        count = int(target_faces * budget)
        if count >= len(faces):
            return vertices, faces
        for agg in DECIMATE_AGGRESSIVENESS:
            v, f = simplify(vertices.astype(np.float64), faces.astype(np.int64), target_count=count, agg=agg)
            # Collapses can leave two vertices at one position (seen along a cube's edges): weld them,
            # or the mesh has open edges and exports as non-watertight.
            v, inverse = np.unique(np.asarray(v, np.float64), axis=0, return_inverse=True)
            v, f = drop_degenerate(v, inverse.reshape(-1)[np.asarray(f, np.int64)])
            if not closed or is_watertight(torch.as_tensor(f)):
                return v, f
    return vertices, faces


def file_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:  # [V, 3] float64, [F, 3] -> [V, 3] float64
    """Area-weighted unit vertex normals for the exported files; a vertex whose face normals cancel
    (a pinch) gets +z, since glTF requires unit normals."""
    n = vertex_normals(torch.from_numpy(np.asarray(v, np.float64)), torch.from_numpy(np.asarray(f, np.int64)))
    unit = n.norm(dim=1, keepdim=True) > 0.5  # vertex_normals leaves a zero where the normals cancel
    return torch.where(unit, n, n.new_tensor((0.0, 0.0, 1.0))).numpy()


# --------------------------------------------------------------------------- regularisers (torch, differentiable)
def face_adjacency(faces: Tensor) -> Tensor:  # faces [F, 3] long -> [E, 2] long
    """Pairs of faces that share an edge (edges used by exactly two faces; others are skipped)."""
    if faces.shape[0] == 0:
        return faces.new_zeros(0, 2)
    num_verts = int(faces.max()) + 1
    ends = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1)  # [F, 3, 2] half-edges
    key = (ends.amin(-1) * num_verts + ends.amax(-1)).reshape(-1)  # undirected edge id per half-edge
    face_of = torch.arange(faces.shape[0], device=faces.device).repeat_interleave(3)
    key, order = key.sort()
    face_of = face_of[order]
    same = key[1:] == key[:-1]  # [3F - 1] consecutive half-edges of one edge
    # Keep runs of exactly two: the pair (p, p + 1) with no equal neighbour on either side.
    pad = torch.zeros(1, dtype=torch.bool, device=faces.device)
    before, after = torch.cat([pad, same[:-1]]), torch.cat([same[1:], pad])
    pair = same & ~before & ~after
    first = pair.nonzero().squeeze(1)
    return torch.stack([face_of[first], face_of[first + 1]], dim=1)


def normal_consistency_loss(
    verts: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] long
) -> Tensor:  # [] mean over shared edges of 1 - cos(angle between the two faces' normals)
    """0 for a flat mesh, up to 2 for a fold; penalises creases and the stair-steps of a grid surface."""
    pairs = face_adjacency(faces)
    if pairs.shape[0] == 0:
        return verts.sum() * 0.0
    n = face_normals(verts, faces)
    return (1.0 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(-1)).mean()


def mesh_edges(faces: Tensor) -> Tensor:  # faces [F, 3] long -> [E, 2] long, unique, a < b
    pairs = torch.stack([faces, faces.roll(-1, dims=1)], dim=-1).reshape(-1, 2)
    n = int(faces.max()) + 1 if faces.numel() else 1
    key = torch.unique(pairs.amin(1) * n + pairs.amax(1))  # 1-D unique: much faster than unique(dim=0)
    return torch.stack([key // n, key % n], dim=1)


def laplacian_loss(
    verts: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] long
) -> Tensor:  # [] mean over vertices of |v - mean of its neighbours| (world units)
    """Uniform (umbrella) Laplacian smoothing: each vertex pulled toward the centroid of its neighbours.

    The norm, not its square, as PyTorch3D's mesh_laplacian_smoothing does: the loss stays
    in world units and its gradient does not vanish as the mesh gets finer.
    """
    if faces.shape[0] == 0:
        return verts.sum() * 0.0
    edges = mesh_edges(faces)  # [E, 2]
    a, b = edges[:, 0], edges[:, 1]
    total = torch.zeros_like(verts).index_add(0, a, verts[b]).index_add(0, b, verts[a])
    degree = torch.zeros(verts.shape[0], dtype=verts.dtype, device=verts.device)
    degree = degree.index_add(0, a, torch.ones_like(a, dtype=verts.dtype)).index_add(0, b, torch.ones_like(b, dtype=verts.dtype))
    used = degree > 0
    delta = verts[used] - total[used] / degree[used, None]
    return delta.norm(dim=-1).mean()


def albedo_tilt_loss(
    verts: Tensor,  # [V, 3] (treated as constant: this loss trains the colour only)
    faces: Tensor,  # [F, 3] long
    albedo,  # points [N, 3] -> colours [N, 3]
    samples: int = 8192,  # faces sampled per call (0 = all)
    generator: torch.Generator | None = None,
) -> Tensor:  # scalar
    """Squared slope of albedo brightness against the normal's z over the surface (area-weighted).

    Light from above baked into the albedo makes upward faces brighter than downward ones;
    a uniformly coloured object has slope 0. Rarely seen faces (a cone's base, seen only from
    low elevations at grazing angles) get almost no colour gradient from SDS and keep what the
    coarse field's shading left there; this pulls them toward the rest.
    """
    with torch.no_grad():
        n = face_normals(verts.detach(), faces, normalize=False)  # [F, 3], length = 2 * area
        area = n.norm(dim=-1)
        pick = torch.arange(len(faces), device=faces.device)
        if 0 < samples < len(faces):
            pick = torch.multinomial(area.cpu(), samples, replacement=True, generator=generator).to(faces.device)
            weight = torch.ones(samples, device=verts.device, dtype=verts.dtype)
        else:
            weight = area
        z = n[pick, 2] / area[pick].clamp_min(1e-20)  # [S] normal z
        centroid = verts.detach()[faces[pick]].mean(1)  # [S, 3]
        weight = weight / weight.sum()
        z_centred = z - (weight * z).sum()
        variance = (weight * z_centred**2).sum().clamp_min(1e-6)
    brightness = albedo(centroid).mean(-1)  # [S]
    slope = (weight * z_centred * brightness).sum() / variance
    return slope**2

"""Differentiable triangle-mesh helpers for refinement: regularisers (the vertex normals live in `renderers.mesh`).

All three take the mesh of the current step (`verts` [V, 3] float, `faces` [F, 3] long,
counter-clockwise seen from outside, as `geometry.tets.marching_tets` emits it) and are
differentiable with respect to `verts`. Connectivity is recomputed from `faces` on each
call (marching tetrahedra changes it every step); that costs one sort of the 3F half-edges.
"""
from __future__ import annotations

import torch
from torch import Tensor

from renderers.mesh import face_normals, vertex_normals  # noqa: F401 (they live with the mesh renderer; kept importable here)


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

"""Tetrahedral grids and differentiable marching tetrahedra, in plain PyTorch.

`make_tet_grid` fills a box with a regular cube grid whose cells are each split
into the 6 tetrahedra of the Kuhn (Freudenthal) triangulation: every tet runs
from a cell's corner (0,0,0) to its opposite corner (1,1,1) along one of the 6
monotone paths over the cube's edges. All cells use the same split, so the
diagonals on shared square faces agree and neighbouring tets share whole faces.
Vertex (i, j, k) has index (i * (R+1) + j) * (R+1) + k and sits at
bbox_min + (i, j, k) / R * (bbox_max - bbox_min).

`marching_tets` extracts the zero level set of a per-vertex SDF (sdf < 0 is
inside). One output vertex per grid edge whose endpoints differ in sign, at the
linear zero crossing, so the mesh is welded, watertight for a closed surface,
and differentiable with respect to both the SDF and the grid vertex positions.
Triangles face outward (counter-clockwise seen from outside).

Most of its time is the occupancy gather over every tet; the work on the few tets
that straddle the surface is small (timings: bench/HISTORY.md).
"""

from dataclasses import dataclass
from itertools import permutations

import torch
from torch import Tensor

# The 6 edges of a tet as pairs of local vertex indices (0..3).
_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def make_tet_grid(
    resolution: int,
    bbox_min=(-1.0, -1.0, -1.0),
    bbox_max=(1.0, 1.0, 1.0),
    device=None,
    dtype=torch.float32,
) -> tuple[Tensor, Tensor]:
    """A box filled with `resolution`^3 cubes of 6 positively oriented tets each.

    Returns (verts [(R+1)^3, 3] in `dtype`, tets [6 R^3, 4] long). Sizes 32 to 256
    are the intended range; anything >= 2 works (R = 256 needs ~3 GB for the tets).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
    lo = torch.as_tensor(bbox_min, dtype=torch.float64).reshape(-1)
    hi = torch.as_tensor(bbox_max, dtype=torch.float64).reshape(-1)
    if lo.numel() != 3 or hi.numel() != 3:
        raise ValueError(f"bbox_min and bbox_max must have 3 values, got {tuple(bbox_min)} and {tuple(bbox_max)}")
    if not bool((hi > lo).all()):
        raise ValueError(f"bbox_max must exceed bbox_min on every axis, got {tuple(bbox_min)} and {tuple(bbox_max)}")

    r = resolution
    n = r + 1
    axes = [torch.linspace(float(lo[a]), float(hi[a]), n, device=device, dtype=dtype) for a in range(3)]
    verts = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    # Index offsets of the 4 corners of each Kuhn tet, relative to the cell's corner (0,0,0).
    stride = (n * n, n, 1)
    offsets = []
    for perm in permutations(range(3)):
        corner = [0]
        for axis in perm:
            corner.append(corner[-1] + stride[axis])
        # The tet's orientation equals the permutation's sign; swap two corners of odd ones.
        inversions = sum(perm[i] > perm[j] for i in range(3) for j in range(i + 1, 3))
        if inversions % 2 == 1:
            corner[2], corner[3] = corner[3], corner[2]
        offsets.append(corner)
    offsets = torch.tensor(offsets, dtype=torch.long, device=device)  # [6, 4]

    cell = torch.arange(r, device=device, dtype=torch.long)
    base = (cell[:, None, None] * stride[0] + cell[None, :, None] * stride[1] + cell[None, None, :]).reshape(-1)
    tets = (base[:, None, None] + offsets[None]).reshape(-1, 4)
    return verts, tets


def _build_triangle_table() -> tuple[Tensor, Tensor]:
    """Triangles (as local edge indices) for each of the 16 inside/outside codes.

    Code bit i is set when tet vertex i is inside (sdf < 0). Orientation is
    settled once here by a geometric check on a reference positive tet: the
    triangle's normal must point from the inside vertices to the outside ones.
    For any positively oriented tet and any crossing positions along the edges
    that orientation stays the same (the sign of the triangle's volume with an
    inside vertex only scales by positive edge fractions), so the table is exact
    and, unlike a per-triangle check on the deformed mesh, never flips a sliver.
    """
    ref = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    mid = torch.stack([(ref[a] + ref[b]) / 2 for a, b in _EDGES])  # [6, 3]
    edge_id = {pair: e for e, pair in enumerate(_EDGES)}

    def edge(a: int, b: int) -> int:
        return edge_id[(min(a, b), max(a, b))]

    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    counts = torch.zeros(16, dtype=torch.long)
    for code in range(1, 15):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        if len(inside) == 1 or len(outside) == 1:
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[edge(lone, o) for o in others]]
        else:  # 2 in, 2 out: a quad ac -> ad -> bd -> bc, split along ac-bd
            (a, b), (c, d) = inside, outside
            tris = [[edge(a, c), edge(a, d), edge(b, d)], [edge(a, c), edge(b, d), edge(b, c)]]
        direction = ref[outside].mean(0) - ref[inside].mean(0)
        for k, tri in enumerate(tris):
            p = mid[tri]
            normal = torch.linalg.cross(p[1] - p[0], p[2] - p[0])
            if float(normal @ direction) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, k] = torch.tensor(tri)
        counts[code] = len(tris)
    return table, counts


_TRI_TABLE, _TRI_COUNT = _build_triangle_table()  # [16, 2, 3] local edges (-1 = none), [16]


@dataclass
class MarchingResult:
    verts: Tensor  # [M, 3] surface vertices, differentiable w.r.t. sdf and grid verts
    faces: Tensor  # [F, 3] long, indices into verts, counter-clockwise seen from outside
    edges: Tensor  # [M, 2] long, grid vertex indices of the crossing edge behind each vertex (a < b)
    face_tets: Tensor  # [F] long, index of the tet that emitted each face


def _check_inputs(verts: Tensor, tets: Tensor, sdf: Tensor) -> None:
    if verts.dim() != 2 or verts.shape[1] != 3:
        raise ValueError(f"verts must have shape [V, 3], got {tuple(verts.shape)}")
    if tets.dim() != 2 or tets.shape[1] != 4:
        raise ValueError(f"tets must have shape [T, 4], got {tuple(tets.shape)}")
    if tets.dtype != torch.long:
        raise ValueError(f"tets must be torch.long, got {tets.dtype}")
    if sdf.shape != verts.shape[:1]:
        raise ValueError(f"sdf must have shape [{verts.shape[0]}] (one value per vertex), got {tuple(sdf.shape)}")


def marching_tets_full(
    verts: Tensor,  # [V, 3] grid vertex positions (grid + deformation offsets)
    tets: Tensor,  # [T, 4] long, positively oriented tets
    sdf: Tensor,  # [V] signed distance, < 0 inside
) -> MarchingResult:
    """Marching tetrahedra with the extras (crossing edges, source tets) kept."""
    _check_inputs(verts, tets, sdf)
    device = verts.device
    num_verts = verts.shape[0]

    # 1. Topology, no gradient: which tets straddle the surface, which edges cross.
    with torch.no_grad():
        inside = sdf < 0  # [V]
        bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=device)
        code = (inside[tets].to(torch.uint8) * bits).sum(-1, dtype=torch.uint8)  # [T]
        tet_ids = torch.nonzero((code > 0) & (code < 15)).squeeze(1)  # [Tc]
        cut_tets = tets[tet_ids]  # [Tc, 4]
        code = code[tet_ids].long()
        end_a = cut_tets[:, [a for a, _ in _EDGES]]  # [Tc, 6]
        end_b = cut_tets[:, [b for _, b in _EDGES]]  # [Tc, 6]
        crossing = inside[end_a] != inside[end_b]  # [Tc, 6]
        key = torch.minimum(end_a, end_b) * num_verts + torch.maximum(end_a, end_b)
        unique_keys, vert_of_edge = torch.unique(key[crossing], return_inverse=True)
        local_to_vert = torch.full_like(end_a, -1)
        local_to_vert[crossing] = vert_of_edge  # [Tc, 6] output vertex per tet edge
        edges = torch.stack([unique_keys // num_verts, unique_keys % num_verts], dim=1)  # [M, 2]

        tri_local = _TRI_TABLE.to(device)[code]  # [Tc, 2, 3]
        has_tri = tri_local[:, :, 0] >= 0  # [Tc, 2]
        faces = torch.gather(local_to_vert, 1, tri_local.clamp(min=0).reshape(-1, 6))
        faces = faces.reshape(-1, 2, 3)[has_tri]  # [F, 3]
        face_tets = tet_ids[:, None].expand(-1, 2)[has_tri]  # [F]

    # 2. Geometry, differentiable: the linear zero crossing on each edge. The
    # endpoints differ in sign, so s_b - s_a never vanishes.
    s_a = sdf[edges[:, 0]].unsqueeze(1)  # [M, 1]
    s_b = sdf[edges[:, 1]].unsqueeze(1)
    p_a = verts[edges[:, 0]]  # [M, 3]
    p_b = verts[edges[:, 1]]
    mesh_verts = (p_a * s_b - p_b * s_a) / (s_b - s_a)
    # Every crossing edge belongs to a triangle of each tet around it, so no vertex is unused.
    return MarchingResult(verts=mesh_verts, faces=faces, edges=edges, face_tets=face_tets)


def marching_tets(
    verts: Tensor,  # [V, 3] grid vertex positions (grid + deformation offsets)
    tets: Tensor,  # [T, 4] long, positively oriented tets
    sdf: Tensor,  # [V] signed distance, < 0 inside
) -> tuple[Tensor, Tensor]:
    """The zero level set of `sdf` as a welded, outward-facing triangle mesh.

    Returns (mesh_verts [M, 3], faces [F, 3] long); both are empty ([0, 3]) when
    the SDF does not change sign over any tet.
    """
    result = marching_tets_full(verts, tets, sdf)
    return result.verts, result.faces


def tet_edges(tets: Tensor) -> Tensor:  # tets [T, 4] long -> [E, 2] long, unique, a < b
    """The unique undirected edges of a tet mesh (e.g. for SDF sign regularisers)."""
    pairs = tets[:, torch.tensor(_EDGES, device=tets.device)].reshape(-1, 2)  # [6T, 2]
    pairs = torch.sort(pairs, dim=1).values
    return torch.unique(pairs, dim=0)

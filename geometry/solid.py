"""Solid shapes: the inside of a tet grid's SDF with its enclosed empty space filled, and a mesh
with the closed shells that lie inside other shells dropped.

SDS shapes only what cameras see, so a coarse field's interior is free to be empty and its level
set then has inner surfaces: cavities (an inward-facing shell inside the object) and, where a
cavity touches the outer wall, tunnels. On the DMTet grid this is exact to find: two grid
vertices of the same sign that share a tet edge lie in the same region of the extracted surface
(the SDF is linear along the edge), and the Kuhn split joins vertex (i, j, k) to the 14 vertices
at offsets +-(a, b, c) with a, b, c in {0, 1} (`KUHN_STRUCTURE`). An outside region that the
box's faces cannot reach through outside vertices is a closed cavity: filling it removes that
inner shell and nothing else. With `tunnel > 0`, regions reached only through passages at most
about 2 * tunnel + 1 vertices wide are filled as well (the cavities that leak to the outside
through small tunnels, seen on the underside of tori). With `cameras` (where the training cameras
are), outside vertices that no such direction sees are filled too (`unseen`): SDS
gives no evidence that space is empty where no camera ray reaches, such as the bottom of a pit in
a base that cameras see only at grazing angles, or the inside of a tube.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from geometry.visibility import CameraBand, unseen

MIN_COMPONENT = 0.05  # inside parts smaller than this fraction of the largest one are floaters
FILL_TUNNEL = 2  # cavities joined to the outside only through passages about 2 * this + 1 vertices wide count as inside
ISOLATED_SAME = 1  # a vertex with at most this many of its 14 tet-edge neighbours on its side is flipped (a spike's tip)

# Offsets joined by a tet edge of `geometry.tets.make_tet_grid`: every nonzero 0/1 vector and its negative.
KUHN_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
for _a in (0, 1):
    for _b in (0, 1):
        for _c in (0, 1):
            KUHN_STRUCTURE[1 + _a, 1 + _b, 1 + _c] = KUHN_STRUCTURE[1 - _a, 1 - _b, 1 - _c] = True


def _touching_box(labels: np.ndarray) -> np.ndarray:  # [X, Y, Z] int labels -> [X, Y, Z] bool
    """Voxels whose label (> 0) has a voxel on a face of the box."""
    faces = np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])
    reached = np.unique(faces)
    return np.isin(labels, reached[reached > 0])


def exterior(
    outside: np.ndarray,  # [X, Y, Z] bool, grid vertices outside the surface
    tunnel: int = 0,  # passages this many vertices from the inside (on each side) or narrower do not count
) -> np.ndarray:  # [X, Y, Z] bool
    """The outside vertices that the box's faces reach through outside vertices (Kuhn connectivity).

    With `tunnel` t > 0 the reach goes only through vertices more than t steps from the inside,
    then grows back t steps into the outside: regions joined to the exterior only by narrower
    passages are left out, and so are those passages.
    """
    if outside.ndim != 3:
        raise ValueError(f"outside must be a [X, Y, Z] grid, got shape {outside.shape}")
    if tunnel < 0:
        raise ValueError(f"tunnel must be >= 0, got {tunnel}")
    core = outside
    if tunnel:
        core = ndimage.binary_erosion(outside, KUHN_STRUCTURE, iterations=tunnel, border_value=1)
    labels, _ = ndimage.label(core, structure=KUHN_STRUCTURE)
    reached = _touching_box(labels)
    if tunnel:
        reached = ndimage.binary_dilation(reached, KUHN_STRUCTURE, iterations=tunnel, mask=outside)
    return reached


def enclosed(
    inside: np.ndarray,  # [X, Y, Z] bool, grid vertices inside the surface
    tunnel: int = 0,  # see `exterior`
) -> np.ndarray:  # [X, Y, Z] bool, outside vertices to fill
    """Outside vertices that belong to the solid: the complement of `exterior` within the outside."""
    outside = ~inside
    return outside & ~exterior(outside, tunnel)


def floaters(
    inside: np.ndarray,  # [X, Y, Z] bool
    min_component: float,  # inside parts smaller than this fraction of the largest one are floaters
) -> np.ndarray:  # [X, Y, Z] bool, inside vertices to drop
    """Inside vertices of the small separate parts (Kuhn connectivity: exactly the mesh's parts)."""
    labels, count = ndimage.label(inside, structure=KUHN_STRUCTURE)
    if count <= 1:
        return np.zeros_like(inside)
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.flatnonzero(sizes >= min_component * sizes.max()) + 1
    return inside & ~np.isin(labels, kept)


def isolated(
    inside: np.ndarray,  # [X, Y, Z] bool
    max_same: int = 1,  # a vertex with at most this many of its 14 neighbours on its own side is isolated
) -> np.ndarray:  # [X, Y, Z] bool
    """Vertices whose side of the surface (in or out) almost none of their tet-edge neighbours share:
    the tip of a one-vertex spike or pit, or a one-vertex bubble. Beyond the box counts as outside."""
    weights = KUHN_STRUCTURE.astype(np.int16)
    weights[1, 1, 1] = 0
    inside_around = ndimage.convolve(inside.astype(np.int16), weights, mode="constant", cval=0)
    same = np.where(inside, inside_around, int(weights.sum()) - inside_around)
    return same <= max_same


def clean_sdf(
    sdf: Tensor,  # [X, Y, Z], < 0 inside
    min_component: float | None = MIN_COMPONENT,  # inside parts smaller than this fraction of the largest are dropped; None = keep all
    tunnel: int = FILL_TUNNEL,  # cavities joined to the outside only through passages this narrow are filled too (grid cells)
    keep_open: Tensor | None = None,  # [X, Y, Z] bool, outside vertices the tunnel rule never fills (carved holes, open space)
    cameras: CameraBand | None = None,  # where the training cameras are: what none sees is filled (`unseen`)
    cell: Tensor | None = None,  # [3] grid spacing per axis, world units (needed with cameras)
    origin: Tensor | None = None,  # [3] world position of vertex (0, 0, 0) (needed with cameras at a distance)
) -> Tensor:  # [X, Y, Z]
    """Drop small floating parts (set to +1), fill the space the outside cannot reach (set to minus half
    their distance, `enclosed`), and with `cameras` the space no camera sees (`unseen`) with the narrow
    gaps beside it, and flip the sign of isolated vertices (`isolated`: one-vertex spikes, pits and
    bubbles, set to -sdf / 2).

    Components use the tets' own connectivity (`KUHN_STRUCTURE`), so what is
    dropped or filled is exactly a part or a cavity of the extracted surface.
    """
    inside = (sdf < 0).cpu().numpy()
    drop = floaters(inside, min_component) if min_component is not None else np.zeros_like(inside)
    inside = inside & ~drop
    fill = enclosed(inside)
    narrow = enclosed(inside, tunnel) if tunnel else np.zeros_like(inside)
    hidden = np.zeros_like(inside)
    if cameras is not None:
        if cell is None:
            raise ValueError("clean_sdf needs the grid's cell size with cameras")
        where = None if origin is None else np.asarray(torch.as_tensor(origin).cpu(), dtype=np.float64)
        hidden = unseen(inside, np.asarray(torch.as_tensor(cell).cpu(), dtype=np.float64), cameras, where)
    if keep_open is not None:
        open_space = keep_open.cpu().numpy()
        narrow = narrow & ~open_space
    fill |= narrow | hidden
    inside = inside | fill
    if tunnel and hidden.any():
        # What no camera sees can lie just past a thin gap that one does see (a flat channel under a filled
        # lip, seen end-on from a low camera): filled alone it leaves a handle, so such gaps beside it go too.
        beside = ndimage.binary_dilation(hidden, KUHN_STRUCTURE, iterations=tunnel)
        gaps = enclosed(inside, tunnel) & beside
        fill |= gaps
        inside |= gaps
    flip = isolated(inside, ISOLATED_SAME)
    drop, fill, flip = (torch.from_numpy(mask).to(sdf.device) for mask in (drop, fill, flip))
    sdf = torch.where(drop, torch.ones_like(sdf), sdf)
    # Filled vertices cross to just inside (their distance mirrored and halved, as a flip): a hard -1 pushed
    # the surface a cell out around each filled dent, which left the faces of a cube pitted and bumpy.
    sdf = torch.where(fill, -(0.5 * sdf.abs()).clamp(min=1e-3), sdf)
    return torch.where(flip, -0.5 * sdf, sdf)


# --------------------------------------------------------------------------- meshes
def winding_numbers(
    points: np.ndarray,  # [P, 3]
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3], counter-clockwise seen from outside
    chunk: int = 4096,  # faces per step
) -> np.ndarray:  # [P]: about 1 inside a closed outward mesh, 0 outside (-1 inside an inward one)
    """Generalised winding number: the summed signed solid angles of the triangles over 4 pi."""
    total = np.zeros(len(points))
    for start in range(0, len(faces), chunk):
        tri = vertices[faces[start:start + chunk]]  # [C, 3, 3]
        a, b, c = (tri[None, :, k] - points[:, None] for k in range(3))  # [P, C, 3] each
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("pci,pci->pc", a, np.cross(b, c))
        div = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
        total += 2.0 * np.arctan2(det, div).sum(1)
    return total / (4.0 * np.pi)


def shells(faces: np.ndarray, num_vertices: int) -> np.ndarray:  # [F] shell label per face
    """Connected pieces of a mesh through shared vertices."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, :2], faces[:, 1:]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(num_vertices, num_vertices))
    _, labels = connected_components(graph, directed=False)
    return labels[faces[:, 0]]


def drop_enclosed_shells(
    vertices: np.ndarray,  # [V, 3], welded
    faces: np.ndarray,  # [F, 3]
) -> tuple[np.ndarray, np.ndarray, int, int]:  # (vertices [V', 3], faces [F', 3], shells dropped, faces dropped)
    """Drop every shell that lies inside another one (a cavity's inward wall, a part inside it).

    A shell is inside another when one of its vertices has a winding number above 1/2 in
    magnitude with respect to that other shell; shells do not cross, so one vertex decides.
    """
    if len(faces) == 0:
        return vertices, faces, 0, 0
    label = shells(faces, len(vertices))
    ids = np.unique(label)
    if len(ids) == 1:
        return vertices, faces, 0, 0
    probe = np.array([vertices[faces[label == i][0, 0]] for i in ids])  # [S, 3] one vertex per shell
    inner = np.zeros(len(ids), dtype=bool)
    for k, i in enumerate(ids):
        others = np.flatnonzero(ids != i)
        w = winding_numbers(probe[others], vertices, faces[label == i])
        inner[others[np.abs(w) > 0.5]] = True
    keep = ~inner[np.searchsorted(ids, label)]
    kept = faces[keep]
    used, remap = np.unique(kept, return_inverse=True)
    return vertices[used], remap.reshape(-1, 3), int(inner.sum()), int((~keep).sum())


# --------------------------------------------------------------------------- relaxing the surface
def relax_surface(
    dmtet,  # geometry.dmtet.DMTet: its deformation is trained, its SDF kept
    steps: int,  # Adam steps (0 = none)
    lambda_normal_consistency: float,
    lambda_laplacian: float,
    lr: float,  # Adam learning rate of the (pre-tanh) deformation
) -> int:  # the steps taken
    """Move the surface's vertices within their cells under the mesh regularisers alone.

    SDS gradients are noisy, so the last step's surface carries that step's bumps, and a fill of the
    enclosed or unseen space leaves steps where it moved the sign of vertices; neither is shaped by
    a camera. The SDF (where the surface is) is kept, the deformation is bounded to its cell, so the
    shape and its topology stay while the folds flatten.
    """
    from geometry.mesh_ops import laplacian_loss, normal_consistency_loss

    if steps <= 0 or lambda_normal_consistency + lambda_laplacian <= 0:
        return 0
    optimizer = torch.optim.Adam([dmtet.deform], lr=lr, betas=(0.9, 0.99), eps=1e-15)
    sdf = dmtet.sdf.requires_grad
    dmtet.sdf.requires_grad_(False)
    try:
        for _ in range(steps):
            verts, faces = dmtet.extract()
            if faces.shape[0] == 0:
                break
            loss = lambda_normal_consistency * normal_consistency_loss(verts, faces)
            loss = loss + lambda_laplacian * laplacian_loss(verts, faces)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(dmtet.deform.grad).all():
                break
            optimizer.step()
    finally:
        dmtet.sdf.requires_grad_(sdf)
    return steps

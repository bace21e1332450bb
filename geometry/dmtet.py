"""A deformable tetrahedral grid (DMTet, Shen et al. 2021; Magic3D) started from a coarse density field.

The grid, its initial SDF and the surface level come from `geometry.level_set` (the field's level
set on a grid fitted to its object); the DMTet adds a learnable SDF change and a bounded learnable
deformation per vertex, so SDS can move the surface.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from geometry.level_set import LevelSetSettings, initial_sdf, smooth_grid
from geometry.solid import FILL_TUNNEL, clean_sdf
from geometry.tets import MarchingResult, marching_tets_full

__all__ = ["MAX_SAFE_DEFORM", "DMTet", "dmtet_from_field"]

# A Kuhn tet's smallest height is 1 / sqrt(2) cells, along (1, -1, 0) / sqrt(2): two vertices moving s cells per
# axis close it by up to 2 sqrt(2) s, so s = 1/8 keeps every tet at half its height or more (larger ones fold the surface).
MAX_SAFE_DEFORM = 0.125


class DMTet(nn.Module):
    """A tet grid with a learnable SDF and a bounded learnable deformation per vertex.

    SDF = initial SDF + smooth_grid(delta, smoothing), with `delta` the learned per-vertex
    parameter: the blur spreads each noisy SDS gradient over its neighbours, so every vertex
    near the surface moves with them instead of alone (Adam would otherwise turn sparse, noisy
    gradients into full-size steps of single vertices: spikes). Vertex positions are
    grid + tanh(deform) * deform_scale * cell (per axis), so no vertex moves further than
    `deform_scale` cells. Boundary vertices are pinned outside (SDF = 1) and undeformed,
    which keeps every extracted surface closed.
    """

    def __init__(
        self,
        resolution: int,  # grid cells per axis: (R + 1)^3 vertices
        grid_verts: Tensor,  # [V, 3] undeformed grid positions, vertex (i, j, k) at (i * (R+1) + j) * (R+1) + k
        tets: Tensor,  # [T, 4] long
        sdf: Tensor,  # [V] initial SDF, < 0 inside
        cell_size: Tensor,  # [3] grid spacing per axis, world units
        deform_scale: float = MAX_SAFE_DEFORM,  # largest displacement per axis, fraction of a cell
        smoothing: float = 2.0,  # Gaussian sigma applied to the learned SDF change, cells (0 = per-vertex)
    ) -> None:
        super().__init__()
        if not 0.0 <= deform_scale <= 0.5:
            raise ValueError(f"deform_scale must be in [0, 0.5] (fraction of a cell), got {deform_scale}")
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        n = resolution + 1
        if grid_verts.shape != (n**3, 3) or sdf.shape != (n**3,):
            raise ValueError(f"grid_verts and sdf must hold {n}^3 vertices, got {tuple(grid_verts.shape)}, {tuple(sdf.shape)}")
        self.resolution, self.deform_scale, self.smoothing = resolution, float(deform_scale), float(smoothing)
        index = torch.arange(n, device=grid_verts.device)
        edge = (index == 0) | (index == n - 1)
        boundary = (edge[:, None, None] | edge[None, :, None] | edge[None, None, :]).reshape(-1)
        self.register_buffer("grid_verts", grid_verts)
        self.register_buffer("tets", tets)
        self.register_buffer("cell_size", cell_size)
        self.register_buffer("boundary", boundary)  # [V] bool, vertices on the faces of the box
        self.register_buffer("sdf_init", sdf.clone())
        self.register_buffer("open_space", sdf > 0)  # [V] bool, outside at the start: `solidify` fills no tunnel there
        self.cameras = None  # geometry.visibility.CameraBand of the training cameras: `solidify` fills what none sees
        self.sdf = nn.Parameter(torch.zeros_like(sdf))  # [V] learned SDF change, before smoothing
        self.deform = nn.Parameter(torch.zeros_like(grid_verts))  # [V, 3], pre-tanh

    def vertices(self) -> Tensor:  # -> [V, 3] deformed grid positions
        offset = torch.tanh(self.deform) * (self.deform_scale * self.cell_size)
        return self.grid_verts + torch.where(self.boundary[:, None], torch.zeros_like(offset), offset)

    def signed_distance(self) -> Tensor:  # -> [V], boundary pinned to +1
        n = self.resolution + 1
        sdf = self.sdf_init + smooth_grid(self.sdf.view(n, n, n), self.smoothing).reshape(-1)
        return torch.where(self.boundary, torch.ones_like(sdf), sdf)

    @torch.no_grad()
    def solidify(self, tunnel: int = FILL_TUNNEL) -> int:
        """Fill the space the outside cannot reach and undo isolated sign flips in the current SDF
        (`clean_sdf`, floaters kept: the export drops them), by moving `sdf_init`; the number of
        vertices changed. Refinement moves the surface where cameras look and leaves the rest free
        to open cavities, so the stage calls this every so often."""
        n = self.resolution + 1
        current = self.signed_distance().view(n, n, n)
        cleaned = clean_sdf(current, min_component=None, tunnel=tunnel, keep_open=self.open_space.view(n, n, n),
                            cameras=self.cameras, cell=self.cell_size, origin=self.grid_verts[0])
        changed = (cleaned < 0) != (current < 0)
        self.sdf_init.add_((cleaned - current).reshape(-1))
        return int(changed.sum())

    def extract_full(self) -> MarchingResult:
        """The current surface with marching tetrahedra's extras; differentiable w.r.t. sdf and deform."""
        return marching_tets_full(self.vertices(), self.tets, self.signed_distance())

    def extract(self) -> tuple[Tensor, Tensor]:  # -> (verts [M, 3], faces [F, 3] long)
        result = self.extract_full()
        return result.verts, result.faces


def dmtet_from_field(
    field,  # anything `geometry.level_set` meshes: `query` and `albedo`, such as `geometry.nerf.NeRFField`
    settings: LevelSetSettings = LevelSetSettings(),  # the initial surface's level set
    deform_scale: float = MAX_SAFE_DEFORM,  # largest vertex displacement per axis, fraction of a cell
    update_smoothing: float = 2.0,  # Gaussian sigma applied to the learned SDF change, grid cells
    device=None,  # None = the field's device
) -> tuple[DMTet, float]:
    """A DMTet whose initial surface is `extract_mesh(field, settings)`, and the level used; its `solidify`
    fills what `settings.cameras` do not see as well."""
    verts, tets, sdf, cell, level = initial_sdf(field, settings, device)
    dmtet = DMTet(settings.grid_resolution, verts, tets, sdf, cell, deform_scale, update_smoothing)
    dmtet.cameras = settings.cameras
    return dmtet, level

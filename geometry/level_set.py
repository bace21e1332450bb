"""A field's density level set on a tet grid fitted to its object: the level, the SDF, the mesh.

A field is anything with `query(x [N, 3], chunk_size) -> (sigma [N], albedo [N, 3])` (no
gradients, chunked) and `albedo(x [N, 3]) -> [N, 3]`, such as `geometry.nerf.NeRFField`.
`LevelSetSettings` holds every choice below; `initial_sdf` gives the grid and its SDF (the DMTet's
start, `geometry.dmtet.dmtet_from_field`), `extract_mesh` the surface by marching tetrahedra.

1. The level. The surface is a level set of the density, chosen automatically unless given
   (`auto_threshold`): the level whose silhouettes best match the field's opaque silhouettes,
   measured along the three axes on a 64^3 probe grid. A fixed density rule fails one way or
   another on coarse NeRFs: a short CPU run leaves a soft field (opaque only through its whole
   thickness), a long GPU run a sharp one. Nor does one opacity suit every field (`opacity_level`):
   coarse fields carry pale fog around the object that grazing rays see as half opaque, so a
   low opacity makes objects too large and a high one loses the faint ones (white objects,
   trained on a dark background, are never fully opaque). The opacity that separates object
   from fog is read off each field's own opacity histogram (Otsu's threshold).
2. The grid is fitted to the box of the probes above the level, padded by `margin` (the whole
   [-bound, bound]^3 when there is no surface).
3. SDF = (threshold - density) scaled by the median density gradient at the surface so that it
   reaches +-1 about SDF_BAND cells away, clamped to [-1, 1]: negative inside, zero exactly
   where the density crosses the level, and with a similar slope for soft and sharp fields
   (so a learning rate moves every surface at a similar speed). It is smoothed by a Gaussian of
   `smoothing` cells (sub-cell noise of the hash grid would become bumps), floaters are removed,
   the space the outside cannot reach is filled (SDS leaves a field's interior free to be empty:
   cavities, and cavities that leak out through narrow tunnels), isolated sign flips are
   undone, and the box's faces are pinned outside, so every surface is closed and solid.
4. Openings: rays along an axis through a hole of the field's own silhouette (the opening of
   a torus seen from above) are carved outside before smoothing (`silhouette_holes`), so fog
   or a thin film the coarse field leaves in an opening does not close it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from geometry.silhouettes import axis_opacity, axis_walls, silhouette_holes
from geometry.solid import FILL_TUNNEL, clean_sdf
from geometry.tets import make_tet_grid, marching_tets_full
from geometry.visibility import CameraBand

__all__ = [
    "LevelSetSettings", "auto_threshold", "density_to_sdf", "extract_mesh", "initial_sdf", "occupied_box",
    "opacity_level", "opacity_maps", "probe_density", "smooth_grid",
]

PROBE_RESOLUTION = 64  # cells per axis of the probe grid that finds the occupied box and the level
NUM_LEVELS = 49  # candidate levels of auto_threshold, log-spaced ...
LEVEL_RANGE = 1e-3  # ... from this fraction of the peak density up to the peak
TIE_TOLERANCE = 0.01  # silhouette IoUs this close to the best count as ties
OPACITY_FLOOR = 0.05  # rays below this opacity miss the field: left out of the opacity histogram
OPACITY_RANGE = (0.25, 0.9)  # the opacity that outlines the object is clamped to this range
SDF_BAND = 2.0  # grid cells from the surface to where the initial SDF saturates at +-1


@dataclass(frozen=True)
class LevelSetSettings:
    """How a field's level set is found and meshed (`initial_sdf`, `extract_mesh`, the DMTet's start)."""

    grid_resolution: int = 64  # tet grid cells per axis of the fitted box
    threshold: float | None = None  # surface level of the density; None = automatic (`auto_threshold`)
    margin: float = 0.1  # world units around the occupied region
    smoothing: float = 1.0  # Gaussian sigma applied to the SDF, grid cells (0 = none)
    opacity: float | None = None  # with threshold None: the opacity that outlines the object; None = `opacity_level`
    tunnel: int = FILL_TUNNEL  # `clean_sdf`: cavities behind passages this narrow are filled (grid cells)
    chunk_size: int = 65536  # points per field query
    cameras: CameraBand | None = None  # `clean_sdf`: where the training cameras are, what none sees is filled; None = no such fill

    def check(self) -> None:
        g = self.grid_resolution
        if isinstance(g, bool) or not isinstance(g, int) or g < 2:
            raise ValueError(f"grid_resolution must be an int >= 2, got {g!r}")
        if self.smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}")


def opacity_maps(density: Tensor, cell: float) -> list[Tensor]:
    """Accumulated opacity 1 - exp(-sum sigma * cell) of straight rays along each axis: 3 maps
    (negative densities count as 0)."""
    density = density.float().clamp_min(0.0)
    return [1.0 - torch.exp(-density.sum(axis) * cell) for axis in range(3)]


def opacity_level(maps: list[Tensor], bins: int = 100) -> float:
    """The opacity that outlines the object in a field's opacity maps: Otsu's threshold (the split
    of the histogram into two classes with the largest between-class variance) over the rays
    that see the field at all, clamped to OPACITY_RANGE.

    Rays through fog and rays through the object form two humps: a sharp field's at ~0 and ~1
    (the split falls near 0.5), a soft field's closer together. "A green cube" at the quick
    preset splits at 0.6, "a white capsule" (opaque to ~0.8 at most) at 0.4.
    """
    values = torch.cat([m.flatten() for m in maps]).float()
    values = values[values > OPACITY_FLOOR]
    low, high = OPACITY_RANGE
    if values.numel() == 0:
        return high
    hist = torch.histc(values, bins, 0.0, 1.0).double().cpu()  # 100 numbers: the split is cheaper on the CPU
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    mass = hist * centres
    w0, s0 = hist.cumsum(0)[:-1], mass.cumsum(0)[:-1]  # rays below each split point, and their summed opacity
    w1 = hist.sum() - w0
    m0, m1 = s0 / w0.clamp_min(1), (mass.sum() - s0) / w1.clamp_min(1)
    between = w0 * w1 * (m0 - m1) ** 2
    split = (int(between.argmax()) + 1) / bins if float(between.max()) > 0 else 0.5  # one hump: alpha > 0.5
    return min(max(split, low), high)


def auto_threshold(
    density: Tensor,  # [X, Y, Z] densities on a regular grid of points (1 / world unit)
    cell: float,  # spacing of those points, world units
    opacity: float | None = None,  # a ray is "on the object" above this opacity; None = `opacity_level`
) -> float:
    """The density level whose silhouettes best match the field's opaque silhouettes.

    Along each axis, the field's silhouette is where a ray accumulates more than `opacity`
    (1 - exp(-sum sigma * cell)); a level's silhouette is where a ray meets a density above
    it. Candidate levels are log-spaced below the peak; the one with the best summed IoU over
    the three axes wins, and among near-ties (within TIE_TOLERANCE) the geometric middle, so a
    sharp field, whose silhouettes are the same for a wide range of levels, gets a level in
    the middle of its transition. 0 when no ray becomes that opaque (no surface).
    """
    if density.dim() != 3:
        raise ValueError(f"density must be a [X, Y, Z] grid, got shape {tuple(density.shape)}")
    if opacity is not None and not 0.0 < opacity < 1.0:
        raise ValueError(f"opacity must be in (0, 1), got {opacity}")
    if not cell > 0:
        raise ValueError(f"cell must be > 0, got {cell}")
    density = density.float().clamp_min(0.0)
    maps = opacity_maps(density, cell)
    if opacity is None:
        opacity = opacity_level(maps)
    target = [m > opacity for m in maps]
    peak = float(density.max())
    if peak <= 0 or not any(bool(t.any()) for t in target):
        return 0.0
    levels = torch.logspace(math.log10(peak * LEVEL_RANGE), math.log10(peak), NUM_LEVELS).tolist()[:-1]
    scores = []
    for level in levels:
        inside = density > level
        inter = union = 0
        for axis in range(3):
            hit = inside.any(axis)
            inter += int((hit & target[axis]).sum())
            union += int((hit | target[axis]).sum())
        scores.append(inter / max(union, 1))
    best = max(scores)
    near = [i for i, score in enumerate(scores) if score >= best - TIE_TOLERANCE]
    return float(math.sqrt(levels[near[0]] * levels[near[-1]]))


def density_to_sdf(
    density: Tensor,  # [X, Y, Z] densities on the grid vertices (1 / world unit)
    threshold: float,  # the surface level, > 0
    band: float = SDF_BAND,  # grid cells over which the SDF goes from 0 to +-1 (on average)
) -> Tensor:  # [X, Y, Z] in [-1, 1], < 0 inside
    """(threshold - density) / (g * band), clamped to [-1, 1], with g the median density gradient
    (per cell) at the vertices next to the surface.

    A linear map of the density, so the zero crossings on grid edges are exactly the level's
    linear crossings; the scale g makes the SDF about 1 / band per cell at the surface for a
    soft coarse field as for a sharp one, so a learning rate moves every surface at a
    similar speed.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if density.dim() != 3:
        raise ValueError(f"density must be a [X, Y, Z] grid, got shape {tuple(density.shape)}")
    if not band > 0:
        raise ValueError(f"band must be > 0, got {band}")
    inside = density > threshold
    near = torch.zeros_like(inside)
    for axis in range(3):  # vertices whose neighbour along an axis is on the other side
        flip = inside.narrow(axis, 0, inside.shape[axis] - 1) != inside.narrow(axis, 1, inside.shape[axis] - 1)
        near.narrow(axis, 0, inside.shape[axis] - 1).logical_or_(flip)
        near.narrow(axis, 1, inside.shape[axis] - 1).logical_or_(flip)
    scale = threshold
    if bool(near.any()) and min(density.shape) > 1:
        gradient = torch.stack(torch.gradient(density.float()), dim=0).norm(dim=0)  # per cell
        scale = max(float(gradient[near].median()), threshold * 1e-3)
    # Saturate both sides at the same level: a side that cannot reach 1 (the outside of a sharp
    # field with a low level) would otherwise shift the surface when the SDF is smoothed.
    reach = min(1.0, (threshold - float(density.min())) / (scale * band), (float(density.max()) - threshold) / (scale * band))
    reach = max(reach, 1e-3)
    return ((threshold - density) / (scale * band)).clamp(-reach, reach) / reach


def _field_bound(field) -> float:
    config = getattr(field, "config", None)
    return float(getattr(config, "bound", 1.0))


def _query_density(field, points: Tensor, chunk_size: int) -> Tensor:  # points [N, 3] -> [N]
    with torch.no_grad():
        return field.query(points, chunk_size=chunk_size)[0].to(points.dtype)


def _field_device(field, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    params = getattr(field, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def probe_density(field, chunk_size: int = 65536, device=None) -> tuple[Tensor, Tensor, float]:
    """The field's density at the centres of a PROBE_RESOLUTION^3 grid over its bounding cube:
    (density [r, r, r], points [r, r, r, 3], cell size)."""
    bound = _field_bound(field)
    device = _field_device(field, device)
    r = PROBE_RESOLUTION
    cell = 2.0 * bound / r
    centres = (torch.arange(r, device=device, dtype=torch.float32) + 0.5) * cell - bound
    points = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), dim=-1)
    return _query_density(field, points.reshape(-1, 3), chunk_size).view(r, r, r), points, cell


def occupied_box(
    field,  # see the module docstring
    threshold: float | None = None,  # surface level; None = auto_threshold over the probe grid
    margin: float = 0.1,  # world units added on every side of the occupied region
    chunk_size: int = 65536,  # points per field query
    device=None,  # where to probe; None = the field's device
    opacity: float | None = None,  # with threshold None: the opacity that outlines the object; None = `opacity_level`
) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    """(bbox_min, bbox_max, threshold): the box around every probe point denser than the level, padded
    by one probe cell plus `margin`, within the field's bound; the whole [-bound, bound]^3 when
    no probe exceeds the level."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be > 0 or None, got {threshold}")
    bound = _field_bound(field)
    density, probes, cell = probe_density(field, chunk_size, device)
    level = auto_threshold(density, cell, opacity) if threshold is None else float(threshold)
    occupied = probes.reshape(-1, 3)[density.reshape(-1) > level] if level > 0 else probes.reshape(-1, 3)[:0]
    if occupied.shape[0] == 0:
        return (-bound,) * 3, (bound,) * 3, level
    pad = cell + margin  # a probe inside is within one cell of the surface
    lo = (occupied.amin(0) - pad).clamp(min=-bound).tolist()
    hi = (occupied.amax(0) + pad).clamp(max=bound).tolist()
    return tuple(lo), tuple(hi), level


def smooth_grid(
    volume: Tensor,  # [X, Y, Z] values on the grid vertices
    sigma: float,  # Gaussian standard deviation, grid cells; 0 = unchanged
) -> Tensor:  # [X, Y, Z]
    """Separable Gaussian blur (edges replicated); differentiable, so it also smooths gradients."""
    if sigma <= 0:
        return volume
    radius = max(1, int(math.ceil(2.0 * sigma)))
    x = torch.arange(-radius, radius + 1, device=volume.device, dtype=volume.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = volume[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last dimension first
        out = F.conv3d(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out[0, 0]


def initial_sdf(
    field,  # see the module docstring
    settings: LevelSetSettings = LevelSetSettings(),
    device=None,  # None = the field's device
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """The grid fitted to the field's object and its SDF there: (grid verts [V, 3], tets [T, 4],
    sdf [V], cell size [3], threshold). The SDF is smoothed (sub-cell noise of the coarse field
    would otherwise become bumps), cleaned of floaters and cavities, and 1 on the box's faces."""
    settings.check()
    grid_resolution, opacity, chunk_size = settings.grid_resolution, settings.opacity, settings.chunk_size
    device = _field_device(field, device)
    lo, hi, level = occupied_box(field, settings.threshold, settings.margin, chunk_size, device, opacity)
    verts, tets = make_tet_grid(grid_resolution, lo, hi, device=device)
    n = grid_resolution + 1
    cell = (torch.tensor(hi, device=device) - torch.tensor(lo, device=device)) / grid_resolution
    if level > 0:
        density = _query_density(field, verts, chunk_size).view(n, n, n)
        sdf = density_to_sdf(density, level)
        maps = axis_opacity(density, [(high - low) / grid_resolution for low, high in zip(lo, hi)])
        holes = silhouette_holes(maps, opacity if opacity is not None else opacity_level(maps),
                                 axis_walls(density, level))
        sdf = torch.where(holes, torch.ones_like(sdf), sdf)
        sdf = clean_sdf(smooth_grid(sdf, settings.smoothing), tunnel=settings.tunnel, keep_open=holes,
                        cameras=settings.cameras, cell=cell, origin=verts[0])
    else:  # no ray through the field becomes opaque: nothing to extract
        sdf = torch.ones(n, n, n, device=device, dtype=verts.dtype)
    sdf[[0, -1]], sdf[:, [0, -1]], sdf[:, :, [0, -1]] = 1.0, 1.0, 1.0
    return verts, tets, sdf.reshape(-1), cell.to(verts.dtype), level


def extract_mesh(
    field,  # see the module docstring
    settings: LevelSetSettings = LevelSetSettings(),
    device=None,  # None = the field's device
) -> tuple[Tensor, Tensor]:  # (verts [M, 3], faces [F, 3] long), both empty when the field has no surface
    """The field's density level set by marching tetrahedra, without training: the mesh of a run
    stopped after the coarse stage, and the "before refinement" baseline."""
    verts, tets, sdf, _, _ = initial_sdf(field, settings, device)
    result = marching_tets_full(verts, tets, sdf)
    return result.verts.detach(), result.faces

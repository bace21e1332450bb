"""Silhouettes of a density grid along the three axes, and the holes in them.

A hole is a region of a silhouette (rays above the object's opacity) that the outside cannot
reach within that 2D map: the opening of a torus seen from above. A coarse field often leaves
fog or a thin film in such an opening, dense enough to exceed the surface level there while
rays still pass through it mostly unblocked; a level set then closes the hole (genus 0) and
refinement rarely reopens it. `geometry.level_set.initial_sdf` carves the rays through holes.

A soft field can fill the opening with a film that stays above the surface opacity (a torus
whose ring reaches 0.85 and whose opening still holds 0.55-0.65): no clear ray is enclosed,
but the opening is a basin of the opacity map, a dip that the ring around it walls in. Rays
at least BASIN_DEPTH below the map with its basins filled (greyscale hole filling) are
carved too: solid shapes' coarse fields dip far less than BASIN_DEPTH, tori's openings far
more (bench/HISTORY.md).

A hollow coarse field (a shell whose inside SDS never filled) dips too: rays through its middle cross
two walls and the empty inside between them, those along its rim more wall. Carved, that basin would
be a tunnel through both walls, and the hollow it opens could never be filled. An opening has no wall
across it (a film at most), so a hole most of whose rays meet two or more separate walls of the level
set (`axis_walls`; HOLLOW_SHARE) is a hollow seen through a shell, and is not carved.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

MIN_HOLE_RAYS = 9  # silhouette holes of fewer rays (about 3 x 3 cells) are noise, not openings
BASIN_DEPTH = 0.15  # rays this much less opaque than the ring walling them in go through an opening
HOLLOW_SHARE = 0.5  # a hole this share of whose rays cross two walls or more is a hollow (tori's openings: under 0.05)
_FOUR = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # 4-connected: diagonal gaps do not leak


def axis_opacity(
    density: Tensor,  # [X, Y, Z] densities on a regular grid of points (1 / world unit)
    cell: list[float],  # spacing of those points along x, y and z, world units
) -> list[Tensor]:  # [Y, Z], [X, Z], [X, Y]
    """Accumulated opacity 1 - exp(-sum sigma * cell) of straight rays along each axis
    (negative densities count as 0)."""
    density = density.float().clamp_min(0.0)
    return [1.0 - torch.exp(-density.sum(axis) * cell[axis]) for axis in range(3)]


def axis_walls(
    density: Tensor,  # [X, Y, Z] densities on a regular grid of points
    level: float,  # the surface's density level
) -> list[Tensor]:  # [Y, Z], [X, Z], [X, Y]: separate runs of points at or above the level along each ray
    """How many walls of the level set each straight ray along an axis crosses."""
    dense = density >= level
    walls = []
    for axis in range(3):
        before = torch.zeros_like(dense)
        before.narrow(axis, 1, dense.shape[axis] - 1).copy_(dense.narrow(axis, 0, dense.shape[axis] - 1))
        walls.append((dense & ~before).sum(axis))
    return walls


def silhouette_holes(
    maps: list[Tensor],  # the three opacity maps of `axis_opacity`
    opacity: float,  # a ray is on the object above this opacity
    walls: list[Tensor] | None = None,  # the three maps of `axis_walls`: holes that are hollows stay (None: none are)
) -> Tensor:  # [X, Y, Z] bool: on a ray through a hole of a silhouette
    """The grid points that rays along an axis reach through a hole of at least MIN_HOLE_RAYS rays:
    clear rays the border cannot reach, and rays at the bottom of a basin (see the module docstring),
    less the holes that are hollows.

    The object's outer outline is never moved: only rays enclosed by the object count (a hole's
    rim follows its silhouette, so a level set that bulges into the opening loses that bulge).
    """
    shape = (maps[1].shape[0], maps[0].shape[0], maps[0].shape[1])
    carve = torch.zeros(shape, dtype=torch.bool)
    for axis, opaque in enumerate(maps):
        opaque = opaque.double().cpu().numpy()
        clear = _enclosed(opaque <= opacity) | _basin_floors(opaque)
        if walls is not None:
            clear &= ~_hollows(clear, walls[axis].cpu().numpy())
        carve |= torch.from_numpy(clear).unsqueeze(axis).expand(shape)
    return carve.to(maps[0].device)


def _hollows(holes: np.ndarray, walls: np.ndarray) -> np.ndarray:
    """The 4-connected regions of a 2D hole mask more than HOLLOW_SHARE of whose rays cross two walls or more."""
    labels, count = ndimage.label(holes, structure=_FOUR)
    if count == 0:
        return np.zeros_like(holes)
    share = ndimage.mean(walls >= 2, labels, index=np.arange(1, count + 1))
    return np.isin(labels, 1 + np.flatnonzero(share > HOLLOW_SHARE))


def _large(mask: np.ndarray) -> np.ndarray:
    """The 4-connected regions of a 2D mask with at least MIN_HOLE_RAYS rays."""
    labels, _ = ndimage.label(mask, structure=_FOUR)
    big = np.flatnonzero(np.bincount(labels.ravel()) >= MIN_HOLE_RAYS)
    return np.isin(labels, big[big > 0])


def _basin_floors(opaque: np.ndarray) -> np.ndarray:
    """The lower half of every large basin of a 2D opacity map at least BASIN_DEPTH deep: rays
    closer to the basin's floor than to its rim (the rim's own slope is the object's edge)."""
    rim = filled_basins(opaque)
    labels, _ = ndimage.label(_large(rim - opaque >= BASIN_DEPTH), structure=_FOUR)
    floors = np.zeros_like(opaque, dtype=bool)
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[region] == index
        floor, top = opaque[region][inside].min(), rim[region][inside].max()
        floors[region] |= inside & (opaque[region] <= 0.5 * (floor + top))
    return floors


def _enclosed(mask: np.ndarray) -> np.ndarray:
    """The large regions of a 2D mask that do not touch the map's border."""
    labels, _ = ndimage.label(mask, structure=_FOUR)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
    sizes = np.bincount(labels.ravel())
    enclosed = np.flatnonzero(sizes >= MIN_HOLE_RAYS)
    return np.isin(labels, enclosed[(enclosed > 0) & ~np.isin(enclosed, border)])


def filled_basins(
    values: np.ndarray,  # [H, W] a 2D map
) -> np.ndarray:  # [H, W] >= values
    """Greyscale hole filling: every basin that the border cannot drain is raised to its rim, the
    lowest wall the border must cross to reach it (morphological reconstruction by erosion)."""
    level = np.full_like(values, values.max())
    level[[0, -1]], level[:, [0, -1]] = values[[0, -1]], values[:, [0, -1]]
    while True:  # lowers the water level from the border inwards; converges within the map's size in practice
        lowered = np.maximum(values, ndimage.grey_erosion(level, footprint=_FOUR))
        if np.array_equal(lowered, level):
            return level
        level = lowered

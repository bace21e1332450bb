"""Silhouettes of a density grid along the three axes, and the holes in them.

A hole is a region of a silhouette (rays above the object's opacity) that the outside cannot
reach within that 2D map: the opening of a torus seen from above. A coarse field often leaves
fog or a thin film in such an opening, dense enough to exceed the surface level there while
rays still pass through it mostly unblocked; a level set then closes the hole (genus 0) and
refinement rarely reopens it. `geometry.dmtet.initial_sdf` carves the rays through holes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

MIN_HOLE_RAYS = 9  # silhouette holes of fewer rays (about 3 x 3 cells) are noise, not openings


def axis_opacity(
    density: Tensor,  # [X, Y, Z] densities on a regular grid of points (1 / world unit)
    cell: list[float],  # spacing of those points along x, y and z, world units
) -> list[Tensor]:  # [Y, Z], [X, Z], [X, Y]
    """Accumulated opacity 1 - exp(-sum sigma * cell) of straight rays along each axis
    (negative densities count as 0)."""
    density = density.float().clamp_min(0.0)
    return [1.0 - torch.exp(-density.sum(axis) * cell[axis]) for axis in range(3)]


def silhouette_holes(
    maps: list[Tensor],  # the three opacity maps of `axis_opacity`
    opacity: float,  # a ray is on the object above this opacity
) -> Tensor:  # [X, Y, Z] bool: on a ray through a hole of a silhouette
    """The grid points that rays along an axis reach through a hole of at least MIN_HOLE_RAYS rays.

    The object's outer outline is never moved: only rays enclosed by the object count (a hole's
    rim follows its silhouette, so a level set that bulges into the opening loses that bulge).
    """
    shape = (maps[1].shape[0], maps[0].shape[0], maps[0].shape[1])
    structure = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # 4-connected: diagonal gaps do not leak
    carve = torch.zeros(shape, dtype=torch.bool)
    for axis, opaque in enumerate(maps):
        clear = (opaque <= opacity).cpu().numpy()
        labels, _ = ndimage.label(clear, structure=structure)
        border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))
        sizes = np.bincount(labels.ravel())
        enclosed = np.flatnonzero(sizes >= MIN_HOLE_RAYS)
        enclosed = enclosed[(enclosed > 0) & ~np.isin(enclosed, border)]
        holes = torch.from_numpy(np.isin(labels, enclosed))  # [2D] clear rays the border cannot reach
        carve |= holes.unsqueeze(axis).expand(shape)
    return carve.to(maps[0].device)

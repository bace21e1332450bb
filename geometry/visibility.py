"""Which space the training cameras can see: the grid vertices outside a surface that a ray toward some
camera reaches without meeting the inside (`unseen` is the rest). SDS gives no evidence that space is
empty where no camera ray reaches, so `geometry.solid.clean_sdf` fills it.

Rays are swept one direction at a time as digital lines through the grid (`shadow`), so a direction costs
one pass over the grid; once few vertices are left hidden, only their own lines are marched (`shadow_at`,
the same lines), and the directions come farthest-first so that few are left soon. Cameras infinitely far
send parallel rays along `view_directions`; cameras at a distance are handled by the same sweeps, a
direction counting for a vertex when its ray from there reaches the cameras' band (`CameraBand`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VIEW_ELEVATION_STEP = 15.0  # degrees between the elevation rows of `view_directions` (the range's ends always included)
VIEW_AZIMUTHS = 24  # directions per elevation row of `view_directions` over a full turn
PERSPECTIVE_STEP = 5.0  # degrees between the elevation rows of the rays toward cameras at a distance
MARCH_BLOCK = 8  # slices `shadow_at` marches at once


def view_directions(
    elevation_range: tuple[float, float],  # degrees above the xy plane, as the training cameras'
    azimuth_range: tuple[float, float] = (-180.0, 180.0),  # degrees
    elevation_step: float = VIEW_ELEVATION_STEP,
    azimuths: int = VIEW_AZIMUTHS,
) -> np.ndarray:  # [D, 3] unit vectors from the object toward the cameras
    """Directions spread over the training cameras' range of elevations and azimuths (`unseen`'s views)."""
    lo, hi = (float(e) for e in elevation_range)
    rows = np.linspace(lo, hi, max(int(np.ceil((hi - lo) / elevation_step)), 0) + 1)
    a_lo, a_hi = (float(a) for a in azimuth_range)
    full_turn = a_hi - a_lo >= 360.0
    out = []
    for e in rows:
        count = 1 if abs(e) >= 90.0 - 1e-6 else azimuths
        a = np.linspace(a_lo, a_hi, count, endpoint=not full_turn) if count > 1 else np.array([a_lo])
        e_rad, a_rad = np.radians(e), np.radians(a)
        out.append(np.stack([np.cos(e_rad) * np.cos(a_rad), np.cos(e_rad) * np.sin(a_rad),
                             np.full_like(a_rad, np.sin(e_rad))], 1))
    return np.concatenate(out)


def _shifted(a: np.ndarray, dy: int, dz: int) -> np.ndarray:  # [Y, Z] -> [Y, Z], out[y, z] = a[y + dy, z + dz] or False
    out = np.zeros_like(a)
    ny, nz = a.shape
    out[max(-dy, 0):ny - max(dy, 0), max(-dz, 0):nz - max(dz, 0)] = a[max(dy, 0):ny + min(dy, 0), max(dz, 0):nz + min(dz, 0)]
    return out


def shadow(
    inside: np.ndarray,  # [X, Y, Z] bool
    step: np.ndarray,  # [3] direction toward the camera in grid-index units (the world direction / cell)
) -> np.ndarray:  # [X, Y, Z] bool: a ray from the vertex toward the camera meets the inside
    """Parallel rays as digital lines: swept one slice at a time along the direction's dominant axis,
    each slice looks up the one before it (toward the camera) shifted by the ray's whole-vertex step."""
    axis = int(np.argmax(np.abs(step)))
    grid = np.moveaxis(inside, axis, 0)
    forward = step[axis] > 0
    if not forward:
        grid = grid[::-1]
    slope = np.delete(step, axis) / abs(step[axis])  # the other two axes' change per slice toward the camera
    n = grid.shape[0]
    position = np.floor(np.arange(n)[:, None] * slope[None] + 0.5).astype(int)  # [n, 2] the ray's offset at each slice
    out = np.zeros_like(grid)
    ahead = np.zeros_like(grid[0])  # inside at or beyond slice k + 1 along the ray
    for k in range(n - 2, -1, -1):
        ahead = _shifted(ahead | grid[k + 1], *(position[k + 1] - position[k]))
        out[k] = ahead
    if not forward:
        out = out[::-1]
    return np.moveaxis(out, 0, axis)


@dataclass(frozen=True)
class CameraBand:
    """Where the training cameras are: elevations and azimuths (degrees) around the look-at point (the world
    origin), at `distance` (world units; the farthest camera, which sees lowest past the object), or
    infinitely far (None: parallel rays along `view_directions`)."""

    elevation_range: tuple[float, float]
    azimuth_range: tuple[float, float] = (-180.0, 180.0)
    distance: float | None = None


def _reaches(points: np.ndarray, d: np.ndarray, cameras: CameraBand) -> np.ndarray:  # [..., 3], [3] -> [...] bool
    """Whether the ray from each point along d meets the sphere of the cameras within their band."""
    along = points @ d
    t = -along + np.sqrt(np.maximum(along**2 - ((points**2).sum(-1) - cameras.distance**2), 0.0))
    q = points + t[..., None] * d
    elevation = np.degrees(np.arcsin(np.clip(q[..., 2] / cameras.distance, -1.0, 1.0)))
    ok = (elevation >= cameras.elevation_range[0] - 1e-6) & (elevation <= cameras.elevation_range[1] + 1e-6)
    a_lo, a_hi = cameras.azimuth_range
    if a_hi - a_lo < 360.0:
        azimuth = np.degrees(np.arctan2(q[..., 1], q[..., 0]))
        ok &= ((azimuth - a_lo) % 360.0) <= (a_hi - a_lo)
    return ok


def camera_band(
    camera,  # renderers.cameras.CameraConfig
    at_distance: bool = False,  # rays to the cameras' places at their farthest distance, not parallel ones
) -> CameraBand:
    """The band of a training camera distribution."""
    filled = camera.filled()
    distance = float(max(filled.distance_range)) if at_distance else None
    return CameraBand(tuple(filled.elevation_range), tuple(filled.azimuth_range), distance)


def shadow_at(
    inside: np.ndarray,  # [X, Y, Z] bool
    step: np.ndarray,  # [3] as `shadow`'s
    where: np.ndarray,  # [P] flat indices of the vertices to look from
) -> np.ndarray:  # [P] bool, `shadow(inside, step).reshape(-1)[where]`
    """`shadow` for a few vertices: each one's digital line marched slice by slice (the same lines as the
    sweep's), so the cost follows the vertices asked about rather than the whole grid."""
    axis = int(np.argmax(np.abs(step)))
    grid = np.moveaxis(inside, axis, 0)
    forward = step[axis] > 0
    if not forward:
        grid = grid[::-1]
    n, ny, nz = grid.shape
    slope = np.delete(step, axis) / abs(step[axis])
    position = np.floor(np.arange(n)[:, None] * slope[None] + 0.5).astype(int)  # [n, 2], as in `shadow`
    index = np.stack(np.unravel_index(where, inside.shape))  # [3, P]
    k = index[axis] if forward else n - 1 - index[axis]
    y, z = np.delete(index, axis, 0)
    hit = np.zeros(len(where), dtype=bool)
    active = np.arange(len(where))
    for first in range(1, n, MARCH_BLOCK):  # a block of slices at a time, dropping the lines that ended
        ahead = np.arange(first, min(first + MARCH_BLOCK, n))  # [T]
        kk = k[active, None]
        j = kk + ahead  # [A, T]
        within = j < n
        j = np.minimum(j, n - 1)
        yy = y[active, None] + position[j, 0] - position[kk, 0]
        zz = z[active, None] + position[j, 1] - position[kk, 1]
        within &= (yy >= 0) & (yy < ny) & (zz >= 0) & (zz < nz)  # lines run monotonically: once out, always out
        blocked = (grid[j, np.clip(yy, 0, ny - 1), np.clip(zz, 0, nz - 1)] & within).any(1)
        hit[active[blocked]] = True
        active = active[~blocked & within[:, -1]]
        if not len(active):
            break
    return hit


def _spread_order(directions: np.ndarray) -> np.ndarray:  # [D, 3] -> [D] indices
    """Farthest-first order: the first few directions already look from all around, so the hidden
    set (what the later ones are asked about) shrinks fast; the result does not depend on the order."""
    order = [0]
    closeness = directions @ directions[0]  # cosine to the nearest direction taken so far
    for _ in range(len(directions) - 1):
        closeness[order[-1]] = np.inf
        order.append(int(np.argmin(closeness)))
        closeness = np.maximum(closeness, directions @ directions[order[-1]])
    return np.asarray(order)


def _still_hidden(inside: np.ndarray, step: np.ndarray, where: np.ndarray) -> np.ndarray:  # [P] bool
    """`shadow` at the flat indices `where`: one sweep over the grid, or one march per vertex when the
    marches (up to a line's length each) cost less than the sweep."""
    if len(where) * max(inside.shape) < inside.size:
        return shadow_at(inside, step, where)
    return shadow(inside, step).reshape(-1)[where]


def unseen(
    inside: np.ndarray,  # [X, Y, Z] bool, grid vertices inside the surface
    cell: np.ndarray,  # [3] grid spacing per axis, world units
    cameras: CameraBand,
    origin: np.ndarray | None = None,  # [3] world position of vertex (0, 0, 0) (needed with a camera distance)
) -> np.ndarray:  # [X, Y, Z] bool, outside vertices that no camera sees
    """Outside vertices from which every ray toward a camera meets the inside before leaving the box.

    With parallel rays the directions are `view_directions` of the band. With cameras at a distance each
    vertex's rays to them are straight lines too, so the same sweeps serve: a direction counts for a vertex
    when its ray from there reaches the band (rays from low on the object to the lowest cameras run
    flatter than those cameras' own elevation, which is what leaves the middle of a base barely seen).
    """
    cell = np.asarray(cell, dtype=np.float64)
    where = np.flatnonzero(~inside)  # the vertices still hidden, as flat indices
    if cameras.distance is None:
        directions = view_directions(cameras.elevation_range, cameras.azimuth_range)
        for d in directions[_spread_order(directions)]:
            if not len(where):
                break
            where = where[_still_hidden(inside, d / cell, where)]
        return _mask(where, inside.shape)
    if origin is None:
        raise ValueError("unseen needs the grid's origin with cameras at a distance")
    ends = np.array(np.meshgrid(*([0, n - 1] for n in inside.shape))).reshape(3, -1).T  # [8, 3] the box's corners
    corners = np.asarray(origin, dtype=np.float64) + ends * cell
    spread = float(np.degrees(np.arcsin(min(np.sqrt((corners**2).sum(-1).max()) / cameras.distance, 1.0))))
    lo, hi = cameras.elevation_range
    rows = (max(lo - spread, -90.0), min(hi + spread, 90.0))
    directions = view_directions(rows, elevation_step=PERSPECTIVE_STEP)
    points = np.asarray(origin, dtype=np.float64) + np.stack(np.unravel_index(where, inside.shape), 1) * cell  # [P, 3]
    for d in directions[_spread_order(directions)]:
        if not len(where):
            break
        asked = np.flatnonzero(_reaches(points, d, cameras))
        if len(asked):
            keep = np.ones(len(where), dtype=bool)
            keep[asked] = _still_hidden(inside, d / cell, where[asked])
            where, points = where[keep], points[keep]
    return _mask(where, inside.shape)


def _mask(where: np.ndarray, shape: tuple) -> np.ndarray:  # flat indices -> [X, Y, Z] bool
    out = np.zeros(int(np.prod(shape)), dtype=bool)
    out[where] = True
    return out.reshape(shape)

"""Collapsing the edges an importer would weld, without folding the surface.

Where a surface passes through a grid vertex, marching tetrahedra puts several vertices within a
micrometre of it, joined by slivers of no area. A file keeps six decimals, and Blender's "merge by
distance" welds vertices within 1e-4: each weld is an edge collapse done blindly, and around a sliver
it folds faces over their neighbours (self-intersections) or pinches the surface (non-manifold edges).
`collapse_short_edges` does those collapses first, one at a time where they are safe: the two ends
share exactly the neighbours of the faces on the edge (the link condition, so the surface stays a
manifold), and they meet where no face around them turns by more than MAX_TURN (their midpoint, else
either end; a sliver of less than `min_length`^2 / 2 in area before and after may: it is a line either
way). Not turning over is too weak a bound: two small neighbours turning 89 degrees each, opposite
ways, fold onto each other. Where every edge left is stuck, a tent beside one (a vertex on three
faces, almost on the plane of its three neighbours: a common neighbour of both ends that fails the
link condition) becomes one triangle; an edge stuck even so is stretched to `min_length`, its ends
pushed apart along it (a move of under `min_length` / 2 that turns no face by more than MAX_TURN).
"""
from __future__ import annotations

import numpy as np

from geometry.mesh_ops import drop_degenerate

MIN_EDGE = 2e-4  # world units: twice Blender's default merge distance; the object spans about 1
MAX_TURN = 45.0  # degrees a face around a collapse or stretch may turn (two neighbours fold by at most twice this)


def collapse_short_edges(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    min_length: float = MIN_EDGE,
    rounds: int = 100,  # at most; each collapses the edges no other collapse of the round touches
) -> tuple[np.ndarray, np.ndarray, int]:  # ([V', 3], [F', 3], edges left shorter than min_length)
    """Collapse edges shorter than `min_length` to their midpoints where safe (module docstring);
    the third value counts those left (each unsafe to collapse)."""
    v, f = np.asarray(vertices, np.float64).copy(), np.asarray(faces, np.int64)
    short = _short_edges(v, f, min_length)
    for _ in range(rounds):
        if len(short) == 0:
            break
        f, done = _collapse_round(v, f, short, min_length)
        short = _short_edges(v, f, min_length)
        if done == 0:  # every edge left is stuck: flatten the tents that block some, or stop
            f, done = _flatten_tents(v, f, short, min_length)
            short = _short_edges(v, f, min_length)
        if done == 0:
            break
    if len(short) and _stretch_stuck(v, f, short, min_length):
        short = _short_edges(v, f, min_length)
    v, f = drop_degenerate(v, f)
    return v, f, len(short)


def _short_edges(v: np.ndarray, f: np.ndarray, min_length: float) -> np.ndarray:  # [E, 2], shortest first
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    edges = np.unique(np.sort(edges[np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1) < min_length], axis=1), axis=0)
    length = np.linalg.norm(v[edges[:, 0]] - v[edges[:, 1]], axis=1)
    return edges[np.argsort(length, kind="stable")]


def _normals(v: np.ndarray, tri: np.ndarray) -> np.ndarray:  # [N, 3] area-weighted (length = twice the area)
    return np.cross(v[tri[:, 1]] - v[tri[:, 0]], v[tri[:, 2]] - v[tri[:, 0]])


def _turns_too_far(before: np.ndarray, after: np.ndarray, min_length: float) -> bool:
    """Whether a face turns by more than MAX_TURN from normals `before` to `after` ([N, 3], `_normals`),
    slivers of less than `min_length`^2 / 2 in area before and after aside."""
    size_before, size_after = np.linalg.norm(before, axis=1), np.linalg.norm(after, axis=1)
    sliver = np.maximum(size_before, size_after) < min_length**2
    turned = (before * after).sum(1) < np.cos(np.radians(MAX_TURN)) * size_before * size_after
    return bool((turned & ~sliver).any())


def _unfolding_target(v: np.ndarray, rest: np.ndarray, a: int, b: int, min_length: float) -> np.ndarray | None:
    """Where a and b can meet (their midpoint, else either end) turning no face of `rest` (the faces
    around them but off the edge) by more than MAX_TURN; None when nowhere."""
    before = _normals(v, rest)
    corners = np.unique(rest)
    local = np.searchsorted(corners, rest)
    for target in ((v[a] + v[b]) / 2, v[a], v[b]):
        moved = v[corners].copy()
        moved[(corners == a) | (corners == b)] = target
        if not _turns_too_far(before, _normals(moved, local), min_length):
            return target
    return None


def _stretch_stuck(v: np.ndarray, f: np.ndarray, short: np.ndarray, min_length: float) -> int:
    """Push the ends of each `short` edge apart along it until it is `min_length` long (moving `v` in place)
    where no face around them turns by more than MAX_TURN; the number stretched."""
    done = 0
    for a, b in short:
        along = v[b] - v[a]
        length = float(np.linalg.norm(along))
        if length == 0.0:
            continue  # no direction to push along
        around = f[((f == a) | (f == b)).any(1)]
        corners = np.unique(around)
        local = np.searchsorted(corners, around)
        push = along / length * (min_length - length) / 2 * 1.001  # a hair over, so that it no longer counts as short
        moved = v[corners].copy()
        moved[corners == a] -= push
        moved[corners == b] += push
        if not _turns_too_far(_normals(v[corners], local), _normals(moved, local), min_length):
            v[corners] = moved
            done += 1
    return done


def _flatten_tents(v: np.ndarray, f: np.ndarray, short: np.ndarray, min_length: float) -> tuple[np.ndarray, int]:
    """Replace each tent beside a `short` edge (a vertex on exactly three faces, within `min_length` / 2 of the
    plane of its three neighbours) by the one triangle of those neighbours. A tent's vertex is a common
    neighbour of both ends of the edges under it, so those fail the link condition until it goes."""
    if len(short) == 0:
        return f, 0
    count = np.bincount(f.reshape(-1), minlength=len(v))
    beside = np.unique(f[np.isin(f, short).any(1)])
    tents = beside[count[beside] == 3]
    if len(tents) == 0:
        return f, 0
    near = np.flatnonzero(np.isin(f, tents).any(1))
    keep = np.ones(len(f), dtype=bool)
    added, used = [], np.zeros(len(v), dtype=bool)
    for apex in tents:
        around = near[(f[near] == apex).any(1)]
        if used[np.unique(f[around])].any():
            continue  # a neighbouring tent was flattened this round
        turned = np.array([np.roll(t, -int(np.flatnonzero(t == apex)[0])) for t in f[around]])  # (apex, x, y)
        follow = dict(zip(turned[:, 1], turned[:, 2]))
        first = turned[0, 1]
        base = np.array([first, follow.get(first, -1), follow.get(follow.get(first, -1), -1)])
        if (base < 0).any() or len(set(base.tolist())) != 3 or follow.get(base[2]) != first:
            continue  # the three faces do not close a fan around the apex
        normal = _normals(v, base[None])[0]
        if np.linalg.norm(normal) == 0 or (normal * _normals(v, f[around]).sum(0)).sum() <= 0:
            continue
        height = abs(float((v[apex] - v[base[0]]) @ normal)) / np.linalg.norm(normal)
        if height >= min_length / 2 or (np.sort(f, axis=1) == np.sort(base)).all(1).any():
            continue  # a real corner, or the base is a face already
        keep[around] = False
        added.append(base)
        used[np.unique(f[around])] = True
    if not added:
        return f, 0
    return np.concatenate([f[keep], np.array(added)]), len(added)


def _collapse_round(v: np.ndarray, f: np.ndarray, short: np.ndarray, min_length: float) -> tuple[np.ndarray, int]:
    """Collapse the safe ones of `short` (moving `v` in place), no two touching the same faces in one round;
    the faces afterwards, less those left with a repeated vertex, and the number collapsed."""
    near = np.flatnonzero(np.isin(f, short).any(1))  # the faces around the short edges' ends
    corner = f[near].reshape(-1)
    order = np.argsort(corner, kind="stable")
    sorted_corner = corner[order]

    def faces_of(i: int) -> np.ndarray:  # the faces around vertex i (as `f` was when the round began)
        return near[order[np.searchsorted(sorted_corner, i):np.searchsorted(sorted_corner, i, side="right")] // 3]

    touched = np.zeros(len(v), dtype=bool)
    remap = np.arange(len(v))  # b -> a for each collapse, applied to the faces once the round is over
    done = 0
    for a, b in short:
        around = np.union1d(faces_of(a), faces_of(b))
        ring = np.unique(f[around])
        if touched[ring].any():  # a neighbour moved this round: look again next round
            continue
        on_edge = around[(f[around] == a).any(1) & (f[around] == b).any(1)]
        near_a = np.setdiff1d(f[faces_of(a)], [a, b])
        near_b = np.setdiff1d(f[faces_of(b)], [a, b])
        opposite = np.setdiff1d(f[on_edge], [a, b])
        if len(on_edge) != 2 or not np.array_equal(np.intersect1d(near_a, near_b), np.sort(opposite)):
            continue  # the link condition fails: the collapse would pinch the surface
        rest = np.setdiff1d(around, on_edge)
        target = _unfolding_target(v, f[rest], a, b, min_length)
        if target is None:
            continue  # wherever the two ends meet, a face would turn over
        v[a] = target
        remap[b] = a
        touched[ring] = True
        done += 1
    f = remap[f]
    return f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])], done

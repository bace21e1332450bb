"""UV charts: which faces of a mesh share a chart, and along which axis each is projected
(`geometry.uv` packs them; the measurements and what was tried: bench/HISTORY.md).

Each face takes the axis direction nearest its normal (+x, -x, ... like a cube map); chart
borders are straightened along the mesh's edges and small pieces given to a neighbour, but a
face never takes a direction more than 60 degrees from its normal (MIN_FACING), so no
projected triangle flips. `cut_charts` cuts the axis charts on a square grid in their plane:
square cells, fragments merged into a neighbouring cell, and the charts' rims cut into
quarters that fill the packer's gaps.
"""
from __future__ import annotations

import numpy as np

MIN_FACING = 0.5  # a face joins an axis' charts only if its normal is within 60 degrees of it: no flipped triangle
MIN_CHART_FACES = 20  # smaller axis-chart pieces join a neighbouring axis' chart
MERGE_BELOW = 0.4  # a cut piece smaller than this share of a cell joins the cell it shares the longest border with
SPLIT_BELOW = 0.6  # a cut piece smaller than this share of its cell is cut again into quarters ...
SPLIT_LEVELS = 3  # ... down to cells of cell / 2**SPLIT_LEVELS texels


def edge_pairs(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [F, 3] -> ([E], [E]) faces sharing an edge
    edges = np.stack([faces, np.roll(faces, -1, axis=1)], -1).reshape(-1, 2)
    edges.sort(axis=1)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    same = key[order[1:]] == key[order[:-1]]
    return order[:-1][same] // 3, order[1:][same] // 3


def neighbours(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # [F, 3], [F, 3]
    """The face across each edge of each face and that edge's length (-1 and 0 on an open or non-manifold edge)."""
    edges = np.stack([faces, np.roll(faces, -1, axis=1)], -1).reshape(-1, 2)
    edges.sort(axis=1)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order[1:]] == key[order[:-1]])
    across = np.full(3 * len(faces), -1, np.int64)
    across[order[same]], across[order[same + 1]] = order[same + 1] // 3, order[same] // 3
    length = np.where(across >= 0, np.linalg.norm(vertices[edges[:, 0]] - vertices[edges[:, 1]], axis=1), 0.0)
    return across.reshape(-1, 3), length.reshape(-1, 3)


def straighten(key: np.ndarray, across: np.ndarray, length: np.ndarray, allowed=None, group=None, passes: int = 8):
    """Border smoothing of a [F] key (axis, cell or chart) given neighbours()' across and length: a face
    takes its neighbours' key when their shared edges are longer than those with its own key's faces
    (a spike of a long thin triangle), if allowed ([F, K] bool, keys 0..K-1) and of its group ([F])."""
    rows = np.arange(len(key))
    for _ in range(passes):
        nkey = np.where(across >= 0, key[across], -1)  # [F, 3]
        if group is not None:  # only faces of the same group (axis) count
            nkey = np.where((across >= 0) & (group[across] == group[:, None]), nkey, -1)
        score = ((nkey[:, :, None] == nkey[:, None, :]) * length[:, None, :]).sum(2)  # [F, 3] border with each key
        own = ((nkey == key[:, None]) * length).sum(1)
        score = np.where((nkey >= 0) & (nkey != key[:, None]), score, -1.0)
        if allowed is not None:
            score = np.where(allowed[rows[:, None], np.maximum(nkey, 0)], score, -1.0)
        best = np.argmax(score, 1)
        move = score[rows, best] > own
        # Neighbours moving together could swap keys: of two, only the lower-indexed one moves this pass.
        move &= ~(move[np.maximum(across, 0)] & (across >= 0) & (across < rows[:, None])).any(1)
        if not move.any():
            break
        key = np.where(move, nkey[rows, best], key)
    return key


def components(num_faces: int, a: np.ndarray, b: np.ndarray, joined: np.ndarray) -> np.ndarray:  # [F] component id
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(int(joined.sum())), (a[joined], b[joined])), shape=(num_faces, num_faces))
    return connected_components(graph, directed=False)[1]


def axis_labels(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    smoothing_passes: int = 3,  # neighbour votes that straighten the borders between axes
) -> np.ndarray:  # [F] in 0..5: +x, -x, +y, -y, +z, -z
    """Which of the six axis directions each face is projected along. A face starts at the axis
    nearest its normal; its borders are straightened (straighten), neighbour votes then smooth them and merge small pieces into a
    neighbour, but a face never takes an axis its normal is not within MIN_FACING of, so no
    projected triangle flips."""
    n = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-30
    facing = np.concatenate([n, -n], 1)[:, [0, 3, 1, 4, 2, 5]]  # [F, 6] cosine to each axis
    allowed = facing >= MIN_FACING
    a, b = edge_pairs(faces)
    label = np.argmax(facing, 1)
    across, length = neighbours(vertices, faces)
    label = straighten(label, across, length, allowed)
    rows = np.arange(len(faces))

    def neighbour_votes(among: np.ndarray) -> np.ndarray:  # [F, 6] votes of `among` neighbours, -1: not allowed
        votes = np.zeros((len(faces), 6))
        np.add.at(votes, (a[among[b]], label[b[among[b]]]), 1.0)
        np.add.at(votes, (b[among[a]], label[a[among[a]]]), 1.0)
        return np.where(allowed, votes, -1.0)

    everyone = np.ones(len(faces), bool)
    for _ in range(smoothing_passes):
        votes = neighbour_votes(everyone)
        votes[rows, label] += 1.5  # a face keeps its axis unless two of its three neighbours agree on another
        label = np.argmax(votes, 1)
    for _ in range(3):
        piece = components(len(faces), a, b, label[a] == label[b])
        small = np.bincount(piece)[piece] < MIN_CHART_FACES
        votes = neighbour_votes(~small)
        move = small & (votes.max(1) > 0)
        if not move.any():
            break
        label = np.where(move, np.argmax(votes, 1), label)
    return label


def cut_charts(
    corners: np.ndarray,  # [F, 3, 2] each face's projection along its axis, texels
    label: np.ndarray,  # [F] axis of each face
    neighbours: tuple[np.ndarray, np.ndarray],  # neighbours(): [F, 3] face across each edge, [F, 3] edge length
    a: np.ndarray,  # [E] edge_pairs()
    b: np.ndarray,
    cell: int,  # texels
) -> np.ndarray:  # [F] chart id
    """Axis charts cut on a global square grid of `cell` texels, each cut straightened along the mesh's edges;
    pieces under MERGE_BELOW of a cell join a bigger neighbour of the same axis, then pieces under SPLIT_BELOW
    of their cell (a chart's rim) are cut into quarters, SPLIT_LEVELS times: square cells plus small pieces
    that fill the packer's gaps."""
    across, length = neighbours
    grid = np.floor(corners.mean(1) / cell).astype(np.int64)
    grid -= grid.min(0)
    key = (label * (grid[:, 0].max() + 1) + grid[:, 0]) * (grid[:, 1].max() + 1) + grid[:, 1]
    key = straighten(key, across, length, group=label)
    chart = components(len(label), a, b, key[a] == key[b])
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])  # [F] texels
    for _ in range(2):  # merge small pieces into big ones (never two small ones: no chains)
        size = np.bincount(chart, area)
        other = np.where((across >= 0) & (label[across] == label[:, None]), chart[np.maximum(across, 0)], -1)
        f_idx, e_idx = np.nonzero((other >= 0) & (other != chart[:, None]))  # edges to another piece of the same axis
        if len(f_idx) == 0:  # every piece is alone on its axis
            break
        n = int(chart.max()) + 1
        pair, inverse = np.unique(chart[f_idx] * n + other[f_idx, e_idx], return_inverse=True)
        shared = np.bincount(inverse, length[f_idx, e_idx])
        src, dst = pair // n, pair % n
        order = np.lexsort((-shared, src))
        first = order[np.r_[True, src[order][1:] != src[order][:-1]]]  # each piece's longest shared border
        move = (size[src[first]] < MERGE_BELOW * cell**2) & (size[dst[first]] >= MERGE_BELOW * cell**2)
        if not move.any():
            break
        target = np.arange(n)
        target[src[first][move]] = dst[first][move]
        chart = np.unique(target[chart], return_inverse=True)[1]
    for level in range(1, SPLIT_LEVELS + 1):
        partial = (np.bincount(chart, area) < SPLIT_BELOW * (cell / 2 ** (level - 1)) ** 2)[chart]
        quarter = np.floor(corners.mean(1) / (cell / 2**level)).astype(np.int64) % 2
        key = chart.astype(np.int64) * 4 + np.where(partial, quarter[:, 0] * 2 + quarter[:, 1], 0)
        key = straighten(key, across, length, group=chart)
        chart = components(len(label), a, b, key[a] == key[b])
    return chart

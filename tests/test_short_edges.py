"""Short edges: a surface through grid vertices exports with no vertices an importer would weld,
and welding the file the way Blender's "merge by distance" does leaves it one closed manifold."""
import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from bench.short_edges_speed import crowded_ball
from bench.solid_metrics import self_intersections
from geometry.short_edges import MAX_TURN, MIN_EDGE, _turns_too_far, collapse_short_edges
from geometry.tets import make_tet_grid, marching_tets
from stages.export import ExportConfig, export

BLENDER_MERGE = 1e-4  # Blender's default merge distance


def _through_grid_vertices(resolution: int = 24, tilt: float = 0.37, off: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """A ball whose surface passes a hair's breadth off many grid vertices: every vertex of the grid
    within a thin shell gets SDF +`off`, so marching puts several crossings next to it (1e-7: within a
    micrometre, which the export's weld merges; 2e-5: some 1e-5 apart, which it keeps and Blender merges)."""
    verts, tets = make_tet_grid(resolution, (-0.6,) * 3, (0.6,) * 3, dtype=torch.float64)
    radius = verts.norm(dim=1)
    sdf = radius - 0.45 + tilt * 0.02 * torch.sin(7 * verts[:, 0]) * torch.cos(5 * verts[:, 1])
    sdf = torch.where(sdf.abs() < 0.012, torch.full_like(sdf, off), sdf)
    v, f = marching_tets(verts, tets, sdf)
    return v.numpy(), f.numpy()


def _close_pairs(v: np.ndarray, distance: float) -> int:
    return len(cKDTree(np.unique(v, axis=0)).query_pairs(distance))


def _merged(v: np.ndarray, f: np.ndarray, distance: float) -> trimesh.Trimesh:
    """Weld every pair closer than `distance` (clusters joined through such pairs), as an importer does."""
    parent = np.arange(len(v))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in cKDTree(v).query_pairs(distance):
        parent[root(a)] = root(b)
    labels = np.array([root(i) for i in range(len(v))])
    f = labels[f]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return trimesh.Trimesh(v, f, process=False)


def test_the_ball_has_what_importers_weld_and_the_collapse_removes_it():
    v, f = _through_grid_vertices()
    assert _close_pairs(v, BLENDER_MERGE) > 20  # the case is real: marching leaves vertices piled up
    cv, cf, left = collapse_short_edges(v, f)
    assert left == 0
    assert _close_pairs(cv, MIN_EDGE / 2) == 0
    mesh = trimesh.Trimesh(cv, cf, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.euler_number == 2
    assert self_intersections(mesh) == 0
    assert abs(mesh.volume - trimesh.Trimesh(v, f, process=False).volume) < 1e-4  # the shape is kept


@pytest.mark.parametrize("tilt, off", [(0.37, 1e-7), (1.3, 1e-7), (0.37, 2e-5), (1.3, 2e-5)])
def test_an_export_welded_like_blender_stays_one_closed_manifold(tmp_path, tilt, off):
    v, f = _through_grid_vertices(tilt=tilt, off=off)
    config = ExportConfig(texture_size=64, turntable=False, target_faces=0)
    result = export(torch.as_tensor(v), torch.as_tensor(f), lambda p: torch.full_like(p, 0.5), tmp_path, config)
    assert result.short_edges == 0
    obj = trimesh.load(result.paths["obj"], force="mesh", process=False)
    positions, inverse = np.unique(np.asarray(obj.vertices), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[np.asarray(obj.faces)]
    assert _close_pairs(positions, BLENDER_MERGE) == 0
    welded = _merged(positions, faces, BLENDER_MERGE)
    assert len(welded.faces) == len(faces)  # nothing collapsed: the importer finds nothing to weld
    assert welded.is_watertight and welded.euler_number == 2 and self_intersections(welded) == 0


def test_a_crowd_of_piled_up_vertices_is_collapsed_to_the_last_edge():
    # Half the grid vertices near a wavy ball's surface a hair's breadth off it: thousands of short edges,
    # some blocked by tents (a vertex on three nearly flat faces) until those are flattened.
    v, f, left = collapse_short_edges(*crowded_ball(48))
    assert left == 0
    mesh = trimesh.Trimesh(v, f, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.euler_number == 2
    assert self_intersections(mesh) == 0 and _close_pairs(v, MIN_EDGE / 2) == 0


def test_a_collapse_that_would_pinch_is_refused():
    # Two tetrahedra glued at a face share the edge (0, 1) with a third neighbour, 4: the ends' common
    # neighbours {2, 3, 4} are more than the edge's two opposite vertices, so the collapse would pinch.
    # Stuck, the edge is stretched to MIN_EDGE instead, so that no importer welds its ends either.
    v = np.array([[0, 0, 0], [1e-5, 0, 0], [0, 1, 0], [0, 0, 1], [0.3, 0.3, 0.3], [-1, -1, -1.0]])
    f = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 4], [1, 4, 3], [0, 4, 2], [0, 3, 4], [0, 5, 2], [0, 3, 5], [2, 5, 3]])
    cv, cf, left = collapse_short_edges(v, f)
    assert len(cf) == len(f) and (np.sort(cf, axis=1) == np.sort(f, axis=1)).all()  # no collapse
    assert left == 0 and MIN_EDGE <= np.linalg.norm(cv[1] - cv[0]) < 1.01 * MIN_EDGE
    assert np.abs(cv - v).max() < MIN_EDGE / 2 and np.abs(cv[2:] - v[2:]).max() == 0  # only the ends moved, along it


def test_a_collapse_may_not_turn_a_face_far_enough_to_fold_it_onto_a_neighbour():
    # Two neighbours turning 89 degrees each, opposite ways, meet at 178: each face's turn is bounded.
    corner = np.array([[0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    before = np.cross(corner[1] - corner[0], corner[2] - corner[0])[None]

    def turned(degrees: float, scale: float = 1.0) -> np.ndarray:
        angle = np.radians(degrees)
        return scale * np.linalg.norm(before) * np.array([[0.0, np.sin(angle), np.cos(angle)]])

    assert _turns_too_far(before, turned(MAX_TURN + 5), MIN_EDGE)
    assert _turns_too_far(before, turned(89), MIN_EDGE)  # not turned over, but far enough to fold
    assert not _turns_too_far(before, turned(MAX_TURN - 5), MIN_EDGE)
    tiny = before * 1e-6  # a sliver before and after: a line either way, free to turn
    assert not _turns_too_far(tiny, turned(120, 1e-6), MIN_EDGE)

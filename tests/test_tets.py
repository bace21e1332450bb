import math

import pytest
import torch
import trimesh

from geometry.mesh_ops import is_watertight, mesh_area, mesh_volume
from geometry.tets import make_tet_grid, marching_tets, marching_tets_full, tet_edges

RADIUS = 0.6


def sphere_sdf(points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N]
    return points.norm(dim=-1) - RADIUS


def box_sdf(points: torch.Tensor, half: float) -> torch.Tensor:  # [N, 3] -> [N]
    q = points.abs() - half
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def torus_sdf(points: torch.Tensor, major: float = 0.5, minor: float = 0.2) -> torch.Tensor:
    ring = points[:, :2].norm(dim=-1) - major
    return torch.stack([ring, points[:, 2]], dim=-1).norm(dim=-1) - minor


def tet_signed_volumes(verts, tets):
    p = verts[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6.0


def to_trimesh(verts, faces):
    # process=False: no merging by position, so the welding checked is marching_tets' own.
    return trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)


# --- grid -------------------------------------------------------------------------------


def test_grid_counts_orientation_and_volume():
    r = 16
    lo, hi = (-1.0, -0.5, 0.0), (1.0, 1.5, 0.5)
    verts, tets = make_tet_grid(r, lo, hi, dtype=torch.float64)
    assert verts.shape == ((r + 1) ** 3, 3) and verts.dtype == torch.float64
    assert tets.shape == (6 * r**3, 4) and tets.dtype == torch.long
    assert int(tets.min()) == 0 and int(tets.max()) == (r + 1) ** 3 - 1
    torch.testing.assert_close(verts.min(0).values, torch.tensor(lo, dtype=torch.float64))
    torch.testing.assert_close(verts.max(0).values, torch.tensor(hi, dtype=torch.float64))
    vol = tet_signed_volumes(verts, tets)
    cell_volume = 2.0 * 2.0 * 0.5 / r**3
    assert bool((vol > 0).all())
    torch.testing.assert_close(vol, torch.full_like(vol, cell_volume / 6))  # Kuhn tets: equal volumes
    assert math.isclose(float(vol.sum()), 2.0 * 2.0 * 0.5, rel_tol=1e-9)


def test_grid_faces_are_shared_consistently():
    r = 16
    verts, tets = make_tet_grid(r, dtype=torch.float64)
    faces = tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3)
    faces, counts = torch.unique(torch.sort(faces, dim=1).values, dim=0, return_counts=True)
    assert set(counts.tolist()) == {1, 2}
    # A face used once must lie on the box: all three corners share a boundary coordinate.
    lone = verts[faces[counts == 1]]  # [B, 3 corners, 3]
    on_wall = ((lone.abs() == 1.0).all(dim=1)).any(dim=1)
    assert bool(on_wall.all())
    # Each of the 6 walls has r^2 squares of 2 triangles; an inconsistent diagonal would add more.
    assert int((counts == 1).sum()) == 6 * r * r * 2


def test_grid_edges_and_validation():
    verts, tets = make_tet_grid(2)
    edges = tet_edges(tets)
    # Kuhn grid edges: 3 axis + 3 face-diagonal + 1 body-diagonal directions.
    n = 3
    expected = 3 * n * n * (n - 1) + 3 * n * (n - 1) ** 2 + (n - 1) ** 3
    assert edges.shape == (expected, 2) and bool((edges[:, 0] < edges[:, 1]).all())
    with pytest.raises(ValueError, match="resolution must be an int >= 2, got 1"):
        make_tet_grid(1)
    with pytest.raises(ValueError, match="resolution"):
        make_tet_grid(8.0)
    with pytest.raises(ValueError, match="bbox_max must exceed bbox_min"):
        make_tet_grid(4, (0, 0, 0), (1, 0, 1))


# --- marching tetrahedra ---------------------------------------------------------------


def sphere_errors(r: int):
    verts, tets = make_tet_grid(r, dtype=torch.float64)
    mv, faces = marching_tets(verts, tets, sphere_sdf(verts))
    vol_err = abs(float(mesh_volume(mv, faces)) / (4 / 3 * math.pi * RADIUS**3) - 1)
    area_err = abs(float(mesh_area(mv, faces)) / (4 * math.pi * RADIUS**2) - 1)
    return vol_err, area_err


def test_sphere_is_closed_outward_and_accurate():
    r = 32
    verts, tets = make_tet_grid(r, dtype=torch.float64)
    mv, faces = marching_tets(verts, tets, sphere_sdf(verts))
    assert mv.shape[1] == 3 and faces.shape[1] == 3 and faces.dtype == torch.long
    assert faces.shape[0] > 1000
    assert is_watertight(faces)
    mesh = to_trimesh(mv, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2
    # No unused vertices, and every vertex lies close to the sphere (h = 1/16 here).
    assert torch.equal(torch.unique(faces), torch.arange(mv.shape[0]))
    assert float((mv.norm(dim=-1) - RADIUS).abs().max()) < 0.01
    # Outward: positive volume, and every face normal points away from the centre.
    volume = float(mesh_volume(mv, faces))
    assert volume > 0
    tri = mv[faces]
    normals = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    assert bool(((normals * tri.mean(1)).sum(-1) > 0).all())
    # Linear interpolation on a h = 0.0625 grid: measured errors are ~0.5 % (volume), ~0.3 % (area).
    assert abs(volume / (4 / 3 * math.pi * RADIUS**3) - 1) < 0.015
    assert abs(float(mesh_area(mv, faces)) / (4 * math.pi * RADIUS**2) - 1) < 0.01
    assert abs(float(mesh.volume) - volume) < 1e-9


def test_sphere_error_shrinks_with_resolution():
    vol16, area16 = sphere_errors(16)
    vol32, area32 = sphere_errors(32)
    # Second-order convergence: halving h should cut the error by ~4; ask for 2.5.
    assert vol32 < vol16 / 2.5 and area32 < area16 / 2.5


def test_cube_and_torus_are_watertight():
    verts, tets = make_tet_grid(24, dtype=torch.float64)
    half = 0.45
    mv, faces = marching_tets(verts, tets, box_sdf(verts, half))
    mesh = to_trimesh(mv, faces)
    assert is_watertight(faces) and mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 2
    # Linear interpolation rounds the box's edges off by about a cell width; a loose bar.
    assert abs(float(mesh_volume(mv, faces)) / (2 * half) ** 3 - 1) < 0.03

    mv, faces = marching_tets(verts, tets, torus_sdf(verts))
    mesh = to_trimesh(mv, faces)
    assert is_watertight(faces) and mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 0  # genus 1
    exact = 2 * math.pi**2 * 0.5 * 0.2**2
    assert abs(float(mesh_volume(mv, faces)) / exact - 1) < 0.05


def test_exact_zeros_and_random_signs_stay_watertight():
    # Cube faces on grid planes: sdf == 0 exactly at many vertices (degenerate triangles).
    verts, tets = make_tet_grid(16, dtype=torch.float64)
    mv, faces = marching_tets(verts, tets, box_sdf(verts, 0.5))
    assert is_watertight(faces) and to_trimesh(mv, faces).is_winding_consistent
    # All vertices lie in the unit cube (convex), so the volume cannot exceed 1; the Kuhn
    # diagonals chamfer some of the cube's edges by one cell (h = 1/8): measured 0.957.
    assert 0.93 < float(mesh_volume(mv, faces)) <= 1.0 + 1e-12

    # Random signs inside the box, positive on its walls: many small closed components.
    gen = torch.Generator().manual_seed(0)
    sdf = torch.rand(verts.shape[0], generator=gen, dtype=torch.float64) - 0.5
    sdf[(verts.abs() == 1.0).any(dim=1)] = 1.0
    mv, faces = marching_tets(verts, tets, sdf)
    assert faces.shape[0] > 10000
    assert is_watertight(faces) and to_trimesh(mv, faces).is_winding_consistent
    assert float(mesh_volume(mv, faces)) > 0


def test_deformed_grid_keeps_orientation():
    r = 20
    verts, tets = make_tet_grid(r, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    offset = (torch.rand(verts.shape, generator=gen, dtype=torch.float64) - 0.5) * (0.4 / r)
    moved = verts + offset
    assert bool((tet_signed_volumes(moved, tets) > 0).all())
    mv, faces = marching_tets(moved, tets, sphere_sdf(moved))
    assert is_watertight(faces)
    assert abs(float(mesh_volume(mv, faces)) / (4 / 3 * math.pi * RADIUS**3) - 1) < 0.03


def test_no_surface_gives_empty_mesh():
    verts, tets = make_tet_grid(8)
    for sdf in (torch.ones(verts.shape[0]), -torch.ones(verts.shape[0])):
        mv, faces = marching_tets(verts, tets, sdf)
        assert mv.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.long
        assert float(mesh_volume(mv, faces)) == 0.0
        assert not is_watertight(faces)
    with pytest.raises(ValueError, match=r"sdf must have shape \[729\]"):
        marching_tets(verts, tets, torch.ones(10))


def test_is_watertight_detects_flips_and_holes():
    verts, tets = make_tet_grid(16, dtype=torch.float64)
    _, faces = marching_tets(verts, tets, sphere_sdf(verts))
    flipped = faces.clone()
    flipped[0] = flipped[0, [0, 2, 1]]
    assert not is_watertight(flipped)
    assert not is_watertight(faces[1:])


def test_marching_extras_point_at_crossing_edges():
    verts, tets = make_tet_grid(16, dtype=torch.float64)
    sdf = sphere_sdf(verts)
    res = marching_tets_full(verts, tets, sdf)
    assert res.edges.shape == (res.verts.shape[0], 2) and res.face_tets.shape == (res.faces.shape[0],)
    assert bool(((sdf[res.edges[:, 0]] < 0) != (sdf[res.edges[:, 1]] < 0)).all())
    # Each face's vertices come from edges of the tet that emitted it.
    tet_verts = tets[res.face_tets]  # [F, 4]
    face_edge_ends = res.edges[res.faces]  # [F, 3, 2]
    assert bool((face_edge_ends[..., None] == tet_verts[:, None, None, :]).any(-1).all())


# --- gradients -------------------------------------------------------------------------


def test_gradients_reach_sdf_and_offsets():
    verts, tets = make_tet_grid(16)
    sdf = sphere_sdf(verts).clone().requires_grad_(True)
    offset = torch.zeros_like(verts, requires_grad=True)
    res = marching_tets_full(verts + offset, tets, sdf)
    loss = (res.verts**2).sum() + mesh_volume(res.verts, res.faces)
    loss.backward()
    for grad in (sdf.grad, offset.grad):
        assert grad is not None and bool(torch.isfinite(grad).all())
    # Exactly the endpoints of crossing edges receive gradient.
    touched = torch.zeros(verts.shape[0], dtype=torch.bool)
    touched[res.edges.reshape(-1)] = True
    assert bool((sdf.grad[touched] != 0).all()) and bool((sdf.grad[~touched] == 0).all())
    assert bool((offset.grad[touched].abs().sum(-1) > 0).all())
    assert bool((offset.grad[~touched] == 0).all())


def test_volume_gradient_matches_finite_difference():
    verts, tets = make_tet_grid(16, dtype=torch.float64)
    sdf = sphere_sdf(verts)
    res = marching_tets_full(verts, tets, sdf)
    # A crossing-edge endpoint well away from zero, so +-eps keeps the topology.
    ends = res.edges.reshape(-1)
    i = int(ends[sdf[ends].abs() > 0.01][0])
    offset = torch.zeros_like(verts, requires_grad=True)
    s = sdf.clone().requires_grad_(True)
    mv, faces = marching_tets(verts + offset, tets, s)
    mesh_volume(mv, faces).backward()

    eps = 1e-6

    def volume(sdf_delta=0.0, vert_delta=0.0):
        s2, v2 = sdf.clone(), verts.clone()
        s2[i] += sdf_delta
        v2[i, 0] += vert_delta
        m, f = marching_tets(v2, tets, s2)
        assert torch.equal(f, faces)
        return float(mesh_volume(m, f))

    fd_sdf = (volume(sdf_delta=eps) - volume(sdf_delta=-eps)) / (2 * eps)
    fd_vert = (volume(vert_delta=eps) - volume(vert_delta=-eps)) / (2 * eps)
    assert abs(fd_sdf) > 1e-6
    assert math.isclose(float(s.grad[i]), fd_sdf, rel_tol=1e-5, abs_tol=1e-10)
    assert math.isclose(float(offset.grad[i, 0]), fd_vert, rel_tol=1e-5, abs_tol=1e-10)

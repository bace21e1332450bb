"""Solid by construction: coarse fields whose level set has inner surfaces (an empty pocket,
a hollow tube that leaks out through small tunnels, a film across an opening) extract and export as one
solid with the shape's Euler number; refinement's cavities are filled again; the export drops shells
that lie inside another."""
import numpy as np
import pytest
import torch
import trimesh

from geometry import solid, visibility
from geometry.dmtet import dmtet_from_field
from geometry.level_set import LevelSetSettings, density_to_sdf, extract_mesh, initial_sdf
from geometry.solid import clean_sdf
from geometry.tets import marching_tets
from stages.export import ExportConfig, export

GRID = 48  # the quick preset's refine grid
PEAK = 8.0  # a soft coarse field's peak density


def soft(distance_inside: torch.Tensor) -> torch.Tensor:
    """Density of a soft solid: PEAK inside (distance_inside > 0), 0 outside, a sigmoid across."""
    return PEAK * torch.sigmoid(distance_inside / 0.02)


class Field:
    """A coarse field from a density function of the points."""

    def __init__(self, density):
        self.density = density

    def query(self, x, chunk_size=0):
        return self.density(x), self.albedo(x)

    def albedo(self, x):
        return torch.full_like(x, 0.5)


def pocket_ball(x):  # a ball of radius 0.45 with an empty ball of radius 0.2 inside
    r = x.norm(dim=-1)
    return soft(0.45 - r) * (1 - torch.sigmoid((0.2 - r) / 0.02))


def hollow_torus(x, film=0.0):  # a torus (0.4, 0.15) whose tube is empty inside 0.08, open below through 4 small tunnels
    ring = torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2)
    tube = torch.sqrt((ring - 0.4) ** 2 + x[:, 2] ** 2)
    sigma = soft(0.15 - tube) * (1 - torch.sigmoid((0.08 - tube) / 0.02))
    for angle in (0.3, 1.9, 3.5, 5.1):
        axis = torch.tensor([0.4 * np.cos(angle), 0.4 * np.sin(angle)], dtype=x.dtype)
        tunnel = (torch.sqrt(((x[:, :2] - axis) ** 2).sum(-1)) < 0.04) & (x[:, 2] < 0)
        sigma = torch.where(tunnel, torch.zeros_like(sigma), sigma)
    if film:
        disk = (x[:, 2].abs() < 0.03) & (ring < 0.4)
        sigma = torch.maximum(sigma, film * PEAK * disk.to(sigma.dtype))
    return sigma


def level_set(field, grid=GRID):
    """The field's plain level set (no cleaning) at the level and on the grid that extract_mesh uses."""
    verts, tets, _, _, level = initial_sdf(field, LevelSetSettings(grid))
    density = field.query(verts)[0].view(grid + 1, grid + 1, grid + 1)
    return marching_tets(verts, tets, density_to_sdf(density, level).reshape(-1))


def topology(verts, faces) -> tuple[int, int, bool]:  # (shells, Euler number, closed)
    mesh = trimesh.Trimesh(np.asarray(verts.detach() if torch.is_tensor(verts) else verts),
                           np.asarray(faces), process=True)
    return len(mesh.split(only_watertight=False)), int(mesh.euler_number), bool(mesh.is_watertight)


def test_kuhn_structure_is_the_tet_grids_edges():
    from geometry.tets import make_tet_grid, tet_edges

    n = 4
    _, tets = make_tet_grid(n - 1)
    ijk = np.stack(np.unravel_index(tet_edges(tets).numpy(), (n, n, n)), -1)  # [E, 2, 3]
    offsets = {tuple(o) for o in (ijk[:, 1] - ijk[:, 0]).tolist()} | {tuple(o) for o in (ijk[:, 0] - ijk[:, 1]).tolist()}
    assert offsets == {tuple(o) for o in (np.argwhere(solid.KUHN_STRUCTURE) - 1).tolist()} - {(0, 0, 0)}


def test_a_ball_with_an_empty_pocket_extracts_as_one_solid():
    field = Field(pocket_ball)
    assert topology(*level_set(field))[:2] == (2, 4)  # the plain level set: the ball and the pocket's inner wall
    shells, euler, closed = topology(*extract_mesh(field, LevelSetSettings(GRID)))
    assert (shells, euler, closed) == (1, 2, True)


def test_a_hollow_torus_that_leaks_through_tunnels_extracts_as_one_solid_torus():
    field = Field(hollow_torus)
    shells, euler, _ = topology(*level_set(field))
    assert shells == 1 and euler < 0  # one surface, with a handle for each tunnel into the hollow tube
    # filling closed cavities alone is not enough
    assert topology(*extract_mesh(field, LevelSetSettings(GRID, tunnel=0)))[1] < 0
    assert topology(*extract_mesh(field, LevelSetSettings(GRID))) == (1, 0, True)


def test_a_film_across_the_opening_of_a_hollow_torus_gives_one_solid_torus():
    field = Field(lambda x: hollow_torus(x, film=0.8))
    # the opening stays open, the tube is filled
    assert topology(*extract_mesh(field, LevelSetSettings(GRID))) == (1, 0, True)


def test_refinement_cavities_are_filled_without_touching_the_outer_surface():
    dmtet, _ = dmtet_from_field(Field(lambda x: soft(0.45 - x.norm(dim=-1))), LevelSetSettings(GRID))
    with torch.no_grad():
        outer_verts, outer_faces = dmtet.extract()
        centre = dmtet.grid_verts.norm(dim=-1) < 0.15
        dmtet.sdf_init[centre] = 0.5  # what a run's free interior can do: a pocket opens inside
        assert topology(*dmtet.extract())[:2] == (2, 4)
        learned = dmtet.sdf.detach().clone()
        assert dmtet.solidify() == int(centre.sum())
        verts, faces = dmtet.extract()
    assert topology(verts, faces) == (1, 2, True)
    torch.testing.assert_close(verts, outer_verts)
    assert torch.equal(faces, outer_faces) and torch.equal(dmtet.sdf, learned)


def test_isolated_sign_flips_are_undone():
    inside = np.zeros((9, 9, 9), dtype=bool)
    inside[2:7, 2:7, 2:5] = True  # a slab, top layer z = 4
    needle = inside.copy()
    needle[4, 4, 5] = needle[4, 4, 6] = True  # a needle one vertex thick on top of it
    needle[1, 7, 7] = True  # and a one-vertex floater
    assert np.argwhere(solid.isolated(needle)).tolist() == [[1, 7, 7], [4, 4, 6]]  # the tip and the floater
    bump = inside.copy()
    bump[4, 4, 5] = True  # one vertex on the top: four of its neighbours are inside, a bump
    dent = inside.copy()
    dent[4, 4, 4] = False  # one vertex of the top layer outside: it shares its side with the air above
    assert not solid.isolated(inside).any() and not solid.isolated(bump).any() and not solid.isolated(dent).any()
    sdf = torch.where(torch.from_numpy(needle), -0.3, 0.3)
    cleaned = clean_sdf(sdf, min_component=None, tunnel=0)
    assert float(cleaned[4, 4, 6]) == pytest.approx(0.15) and float(cleaned[1, 7, 7]) == pytest.approx(0.15)  # -sdf / 2
    expected = needle.copy()
    expected[4, 4, 6] = expected[1, 7, 7] = False
    assert torch.equal(cleaned < 0, torch.from_numpy(expected))


def test_filled_space_crosses_just_inside_so_a_filled_dent_leaves_no_bump():
    inside = np.zeros((12, 12, 12), dtype=bool)
    inside[2:10, 2:10, 2:10] = True  # a cube of vertices
    inside[5:7, 5:7, 4:7] = False  # a narrow closed pocket inside it
    sdf = torch.where(torch.from_numpy(inside), -0.4, 0.2)
    cleaned = clean_sdf(sdf, min_component=None, tunnel=0)
    pocket = torch.zeros_like(cleaned, dtype=torch.bool)
    pocket[5:7, 5:7, 4:7] = True
    assert (cleaned[pocket] < 0).all()  # filled
    torch.testing.assert_close(cleaned[pocket], torch.full_like(cleaned[pocket], -0.1))  # mirrored and halved, not -1
    assert torch.equal(cleaned[~pocket], sdf[~pocket])


def _sphere(radius, subdivisions=3, inward=False, offset=(0.0, 0.0, 0.0)):
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    if inward:
        mesh.invert()
    mesh.apply_translation(offset)
    return mesh


def test_export_drops_shells_inside_another(tmp_path):
    hollow = trimesh.util.concatenate([_sphere(0.5), _sphere(0.3, inward=True), _sphere(0.1, 2)])
    verts = torch.tensor(hollow.vertices, dtype=torch.float32)
    faces = torch.tensor(hollow.faces, dtype=torch.long)
    result = export(verts, faces, lambda p: torch.full_like(p, 0.5), tmp_path / "hollow",
                    ExportConfig(texture_size=64, turntable=False, target_faces=0))
    assert result.dropped_shells == 2  # the cavity's wall and the small ball inside it
    assert result.dropped_faces == len(hollow.faces) - len(_sphere(0.5).faces)
    mesh = trimesh.load(result.paths["obj"], force="mesh", process=True)
    assert topology(mesh.vertices, mesh.faces) == (1, 2, True)
    apart = trimesh.util.concatenate([_sphere(0.3, offset=(-0.4, 0, 0)), _sphere(0.3, offset=(0.4, 0, 0))])
    result = export(torch.tensor(apart.vertices, dtype=torch.float32), torch.tensor(apart.faces, dtype=torch.long),
                    lambda p: torch.full_like(p, 0.5), tmp_path / "apart",
                    ExportConfig(texture_size=64, turntable=False, target_faces=0))
    assert result.dropped_shells == 0  # two balls side by side are two parts, neither inside the other


PARALLEL = visibility.CameraBand((-10.0, 90.0))  # the default training cameras' elevations, infinitely far
CAMERAS = visibility.CameraBand((-10.0, 90.0), distance=3.2)  # and at the farthest default distance


def pitted_cylinder(x, pit=True):  # a cylinder (r 0.4, h 0.8) with an empty pit 0.3 wide and 0.25 deep in its base
    ring = torch.sqrt(x[:, 0] ** 2 + x[:, 1] ** 2)
    sigma = soft(torch.minimum(0.4 - ring, 0.4 - x[:, 2].abs()))
    if pit:
        sigma = sigma * (1 - torch.sigmoid(torch.minimum(0.15 - ring, -0.15 - x[:, 2]) / 0.02))
    return sigma


def test_view_directions_span_the_cameras_elevations_and_azimuths():
    dirs = visibility.view_directions((-10.0, 90.0), elevation_step=15.0, azimuths=8)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    elevation = np.degrees(np.arcsin(dirs[:, 2]))
    assert elevation.min() == pytest.approx(-10.0) and elevation.max() == pytest.approx(90.0)
    assert (np.abs(elevation - 90.0) < 1e-6).sum() == 1  # straight above: one direction, not one per azimuth
    assert len(dirs) == 7 * 8 + 1
    half = visibility.view_directions((0.0, 0.0), azimuths=4, azimuth_range=(0.0, 90.0))
    np.testing.assert_allclose(np.degrees(np.arctan2(half[:, 1], half[:, 0])), [0.0, 30.0, 60.0, 90.0], atol=1e-9)


def test_space_no_camera_sees_is_unseen_and_open_space_is_seen():
    n = 33
    x = np.linspace(-0.6, 0.6, n)
    xx, yy, zz = np.meshgrid(x, x, x, indexing="ij")
    cell, origin = np.full(3, x[1] - x[0]), np.full(3, x[0])
    ring = np.hypot(xx, yy)
    cylinder = (ring <= 0.4) & (np.abs(zz) <= 0.4)
    pit = (ring <= 0.1) & (zz < -0.15)
    dish = (ring <= 0.3) & (zz < -0.4 + 0.05 * (1 - ring / 0.3))  # a shallow dent, 0.05 deep, across the base
    cup = cylinder & ~((ring <= 0.25) & (zz > -0.1))  # a deep well open to the top: seen from above
    tube = np.hypot(ring - 0.4, zz)
    torus = tube <= 0.15
    for cameras in (PARALLEL, CAMERAS):
        assert not visibility.unseen(cylinder, cell, cameras, origin).any()
        hidden = visibility.unseen(cylinder & ~pit, cell, cameras, origin)
        assert hidden[cylinder & pit & (zz > -0.35)].all()  # rays at -10 degrees reach into the pit's mouth at most
        assert not hidden[~(cylinder & pit)].any()
        assert not visibility.unseen(cup, cell, cameras, origin).any()
        assert not visibility.unseen(torus, cell, cameras, origin).any()  # the hole is seen from above
        hidden = visibility.unseen(torus & (tube >= 0.08), cell, cameras, origin)
        assert hidden[torus & (tube < 0.06)].all() and not hidden[~torus].any()
    # From the cameras' real places a ray from the middle of the base to the lowest one runs almost flat:
    # the shallow dent is unseen; parallel rays at -10 degrees would see into it.
    assert not visibility.unseen(cylinder & ~dish, cell, PARALLEL)[cylinder & dish].any()
    assert visibility.unseen(cylinder & ~dish, cell, CAMERAS, origin)[cylinder & dish & (ring < 0.2)].all()
    below = visibility.CameraBand((-90.0, 90.0), distance=3.2)
    assert not visibility.unseen(cylinder & ~pit, cell, below, origin).any()  # seen from straight below
    with pytest.raises(ValueError, match="origin"):
        visibility.unseen(cylinder, cell, CAMERAS)


def _unseen_by_sweeps(inside, cell, cameras, origin):
    """`visibility.unseen` the plain way: one whole-grid sweep per direction, in the given order."""
    hidden = ~inside
    if cameras.distance is None:
        for d in visibility.view_directions(cameras.elevation_range, cameras.azimuth_range):
            hidden &= visibility.shadow(inside, d / cell)
        return hidden
    points = origin + np.stack(np.meshgrid(*(np.arange(n) for n in inside.shape), indexing="ij"), -1) * cell
    spread = np.degrees(np.arcsin(min(np.linalg.norm(points, axis=-1).max() / cameras.distance, 1.0)))
    rows = (max(cameras.elevation_range[0] - spread, -90.0), min(cameras.elevation_range[1] + spread, 90.0))
    for d in visibility.view_directions(rows, elevation_step=visibility.PERSPECTIVE_STEP):
        reached = visibility._reaches(points, d, cameras)
        hidden &= ~reached | visibility.shadow(inside, d / cell)
    return hidden


def test_marching_a_few_lines_gives_the_sweeps_answer():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for n in (13, 24, 31):
        x = np.linspace(-1.0, 1.0, n)
        xx, yy, zz = np.meshgrid(x, x, x, indexing="ij")
        blobs = ndimage.binary_opening(rng.random(xx.shape) < 0.4) & (xx**2 + yy**2 + zz**2 < 0.7)
        dented = (np.maximum(np.abs(xx), np.abs(yy)) < 0.45) & (np.abs(zz) < 0.45) & ~((np.hypot(xx, yy) < 0.25) & (zz < -0.35))
        cell = (x[1] - x[0]) * rng.uniform(0.9, 1.1, 3)
        origin = np.full(3, -1.0)
        for inside in (blobs | dented, dented):
            where = rng.choice(inside.size, 300)
            for d in rng.normal(size=(6, 3)):
                assert np.array_equal(visibility.shadow_at(inside, d / cell, where),
                                      visibility.shadow(inside, d / cell).reshape(-1)[where])
            for cameras in (PARALLEL, CAMERAS, visibility.CameraBand((-30.0, 60.0), (-90.0, 45.0), distance=2.0),
                            visibility.CameraBand((0.0, 30.0), (0.0, 120.0))):
                assert np.array_equal(visibility.unseen(inside, cell, cameras, origin),
                                      _unseen_by_sweeps(inside, cell, cameras, origin))


def test_a_pit_in_a_base_that_cameras_barely_see_is_filled():
    from bench.solid_metrics import flat_faces

    def base_pit(views):
        verts, faces = extract_mesh(Field(pitted_cylinder), LevelSetSettings(GRID, cameras=views))
        mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=True)
        assert topology(mesh.vertices, mesh.faces) == (1, 2, True)
        return flat_faces(mesh, "cylinder")["base_pit"]

    assert base_pit(None) > 0.2  # too wide for the tunnel rule
    assert base_pit(CAMERAS) < 0.03
    plain = extract_mesh(Field(lambda x: pitted_cylinder(x, pit=False)), LevelSetSettings(GRID))
    with_views = extract_mesh(Field(lambda x: pitted_cylinder(x, pit=False)), LevelSetSettings(GRID, cameras=CAMERAS))
    assert torch.equal(plain[1], with_views[1])  # nothing unseen on a plain cylinder: the same surface


def skirted_cylinder_sdf(slot_layers: int, n: int = GRID):
    """A cylinder whose rim hangs below its base as a skirt, with a flat slot `slot_layers` grid layers high
    run along x under the base and through the skirt: (grid verts, tets, sdf [n+1]^3, cell)."""
    from geometry.tets import make_tet_grid

    verts, tets = make_tet_grid(n, (-0.6,) * 3, (0.6,) * 3, dtype=torch.float64)
    x, y, z = verts.numpy().T
    ring = np.hypot(x, y)
    inside = (ring <= 0.4) & (z >= -0.3) & (z <= 0.4)
    inside |= (ring >= 0.34) & (ring <= 0.4) & (z >= -0.4) & (z < -0.3)
    inside &= ~((np.abs(y) <= 0.03) & (z < -0.3) & (z > -0.3 - 1.2 / n * slot_layers - 1e-3))
    sdf = torch.tensor(np.where(inside, -0.5, 0.5)).view(n + 1, n + 1, n + 1)
    return verts, tets, sdf, torch.full((3,), 1.2 / n, dtype=torch.float64)


def test_a_seen_slot_past_unseen_space_does_not_become_a_handle():
    # Low cameras look along the slot but not into the pocket under it that the skirt hides: filled alone,
    # the pocket would hang under the slot as a strap joined to the skirt at both ends (a handle per strap).
    for layers in (1, 2):
        verts, tets, sdf, cell = skirted_cylinder_sdf(layers)
        assert topology(*marching_tets(verts, tets, sdf.reshape(-1))) == (1, -2, True)  # a window each side
        cleaned = clean_sdf(sdf, cameras=CAMERAS, cell=cell, origin=verts[0])
        assert topology(*marching_tets(verts, tets, cleaned.reshape(-1))) == (1, 2, True)
        filled = (cleaned < 0) & (sdf > 0)
        assert filled.sum() > 0.8 * (sdf > 0)[14:35, 14:35, 8:12].sum()  # the pocket under the base, slot and all


def test_refinement_keeps_unseen_space_filled():
    dmtet, _ = dmtet_from_field(Field(lambda x: pitted_cylinder(x, pit=False)), LevelSetSettings(GRID, cameras=CAMERAS))
    with torch.no_grad():
        p = dmtet.grid_verts
        pit = (p[:, :2].norm(dim=-1) < 0.15) & (p[:, 2] < -0.15)
        dmtet.sdf_init[pit] = 0.5  # what SDS can do where cameras barely look: a pit opens in the base
        assert dmtet.solidify() > 0
        inside = dmtet.signed_distance() < 0
    assert inside[pit & (p[:, 2] > -0.35) & (p[:, 2] < 0.4)].all()


def test_relaxing_flattens_folds_and_keeps_the_sdf():
    from bench.solid_metrics import adjacent_angles

    dmtet, _ = dmtet_from_field(Field(lambda x: soft(0.45 - x.norm(dim=-1))), LevelSetSettings(24), deform_scale=0.25)
    with torch.no_grad():
        dmtet.deform.copy_(torch.randn(dmtet.deform.shape, generator=torch.Generator().manual_seed(0)) * 0.7)
        sdf = dmtet.signed_distance().clone()

    def p95():
        with torch.no_grad():
            verts, faces = dmtet.extract()
        return adjacent_angles(trimesh.Trimesh(verts.numpy(), faces.numpy(), process=True))["angle_p95"]

    before = p95()
    assert solid.relax_surface(dmtet, 40, 100.0, 1000.0, 1e-2) == 40
    assert p95() < 0.6 * before
    assert torch.equal(dmtet.signed_distance(), sdf) and dmtet.sdf.requires_grad
    assert solid.relax_surface(dmtet, 0, 100.0, 1000.0, 1e-2) == 0


def test_refine_settings_of_the_unseen_fill_and_the_relaxing():
    from renderers.cameras import CameraConfig
    from stages.refine import RefineConfig

    assert RefineConfig().fill_unseen == "cameras" and RefineConfig().relax_steps > 0
    for bad in ({"fill_unseen": True}, {"fill_unseen": "sometimes"}, {"relax_steps": -1}, {"relax_steps": 1.5}):
        with pytest.raises(ValueError, match="fill_unseen|relax_steps"):
            RefineConfig(**bad).check()
    camera = CameraConfig(elevation_range=(-5.0, 80.0))
    assert visibility.camera_band(camera) == visibility.CameraBand((-5.0, 80.0), (-180.0, 180.0), None)
    assert visibility.camera_band(camera, at_distance=True).distance == max(camera.filled().distance_range)

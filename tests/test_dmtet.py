import math

import pytest
import torch
import trimesh

from geometry.dmtet import dmtet_from_field
from geometry.level_set import (
    OPACITY_RANGE,
    LevelSetSettings,
    auto_threshold,
    density_to_sdf,
    extract_mesh,
    occupied_box,
    opacity_level,
    opacity_maps,
)
from geometry.mesh_ops import is_watertight, laplacian_loss, mesh_volume, normal_consistency_loss
from geometry.metrics import chamfer_distance, occupancy_grid, volumetric_iou
from geometry.nerf import FieldConfig, NeRFField
from guidance.primitive_shapes import primitive_mesh
from renderers.mesh import vertex_normals


class SoftBall(torch.nn.Module):
    """density = peak * sigmoid((radius - |x - centre|) / softness): a ball with a known level set."""

    def __init__(self, radius=0.5, peak=100.0, softness=0.02, centre=(0.0, 0.0, 0.0)):
        super().__init__()
        self.radius, self.peak, self.softness = radius, peak, softness
        self.centre = torch.tensor(centre)
        self.color_logit = torch.nn.Parameter(torch.tensor([-2.0, 1.0, -1.5]))

    def density(self, x):
        return self.peak * torch.sigmoid((self.radius - (x - self.centre).norm(dim=-1)) / self.softness)

    def albedo(self, x):
        return torch.sigmoid(self.color_logit).expand(x.shape[0], 3)

    def query(self, x, chunk_size=65536):
        with torch.no_grad():
            return self.density(x), self.albedo(x)


def level_radius(ball, level):
    """Radius at which the ball's density equals `level`."""
    return ball.radius + ball.softness * math.log(ball.peak / level - 1.0)


def silhouette_radius(ball, opacity):
    """Distance from the centre at which a straight ray through the ball accumulates `opacity`."""
    b = torch.linspace(0.0, 1.0, 1001)
    z = torch.linspace(-1.0, 1.0, 2001)
    points = torch.stack([b[:, None].expand(-1, 2001), torch.zeros(1001, 2001), z[None].expand(1001, -1)], -1)
    tau = ball.density(points.reshape(-1, 3) + ball.centre).view(1001, 2001).sum(1) * (2.0 / 2000)
    alpha = 1.0 - torch.exp(-tau)
    return float(b[alpha > opacity].max())


def probe_grid(ball, r=64):
    c = (torch.arange(r) + 0.5) * (2.0 / r) - 1.0
    points = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    return ball.density(points).view(r, r, r)


@pytest.mark.parametrize("peak, softness", [(200.0, 0.01), (8.0, 0.1)])
def test_auto_threshold_matches_the_opaque_silhouette(peak, softness):
    # A sharp field (a long GPU run) and a soft one (a short CPU run: opaque only through its bulk).
    ball = SoftBall(radius=0.45, peak=peak, softness=softness)
    grid, cell = probe_grid(ball), 2.0 / 64
    opacity = opacity_level(opacity_maps(grid, cell))
    assert OPACITY_RANGE[0] <= opacity <= OPACITY_RANGE[1]
    level = auto_threshold(grid, cell)
    assert 0 < level < peak
    assert level_radius(ball, level) == pytest.approx(silhouette_radius(ball, opacity), abs=1.5 / 64)
    if softness > 0.05:  # the soft ball's outline is far below its half-peak level
        assert level < 0.4 * peak
    # A fixed opacity is honoured: a higher one gives a smaller object.
    fixed = auto_threshold(grid, cell, opacity=0.9)
    assert level_radius(ball, fixed) == pytest.approx(silhouette_radius(ball, 0.9), abs=1.5 / 64)
    assert auto_threshold(torch.zeros(8, 8, 8), 0.25) == 0.0  # nothing opaque: no surface
    with pytest.raises(ValueError, match="opacity"):
        auto_threshold(torch.ones(4, 4, 4), 0.5, opacity=1.0)
    with pytest.raises(ValueError, match="density"):
        auto_threshold(torch.ones(10), 0.5)


def test_opacity_level_splits_fog_from_object():
    fog = torch.full((300,), 0.3) + torch.linspace(-0.1, 0.1, 300)  # grazing rays through pale fog
    solid = torch.full((200,), 0.95) + torch.linspace(-0.04, 0.04, 200)  # rays through the object
    level = opacity_level([torch.cat([fog, solid, torch.zeros(1000)])])  # rays that miss are ignored
    assert 0.4 < level < 0.86
    faint = opacity_level([torch.cat([fog * 0.5, solid * 0.7])])  # a white object: opaque to ~0.65 at most
    assert 0.25 <= faint < 0.5
    assert opacity_level([torch.zeros(10)]) == OPACITY_RANGE[1]  # no field: the strictest level
    assert opacity_level([torch.full((50,), 0.99)]) == 0.5  # one hump (a binary field): the usual alpha > 0.5


class FoggyBall(SoftBall):
    """A ball of `peak` density inside a sphere of faint fog (radius 0.8)."""

    def __init__(self, fog=1.0, **kwargs):
        super().__init__(**kwargs)
        self.fog = fog

    def density(self, x):
        return super().density(x) + self.fog * (x.norm(dim=-1) < 0.8).float()


def _mean_radius(field):
    verts, faces = extract_mesh(field, LevelSetSettings(40))
    assert is_watertight(faces)
    return (verts - field.centre).norm(dim=-1).mean().item()


@pytest.mark.slow
def test_the_mesh_level_leaves_out_fog_and_keeps_faint_objects():
    # A dense ball in pale fog (rays just past the ball: opacity ~0.33): the mesh is the ball's.
    clear = _mean_radius(FoggyBall(radius=0.45, peak=100.0, softness=0.02, fog=0.0))
    assert _mean_radius(FoggyBall(radius=0.45, peak=100.0, softness=0.02, fog=0.3)) == pytest.approx(clear, abs=0.04)
    # A faint ball, like a white object trained on a dark background: opaque to 0.74 at most. A
    # fixed 80 % silhouette finds nothing; the field's own split finds the whole ball.
    faint = FoggyBall(radius=0.45, peak=1.5, softness=0.02, fog=0.0)
    assert auto_threshold(probe_grid(faint), 2.0 / 64, opacity=0.8) == 0.0
    assert _mean_radius(faint) == pytest.approx(0.45, abs=0.06)
    # A fixed target can still be asked for (refine.surface_opacity): stricter, smaller.
    soft = SoftBall(radius=0.45, peak=8.0, softness=0.1)
    radii = [extract_mesh(soft, LevelSetSettings(40, opacity=o))[0].norm(dim=-1).mean().item() for o in (0.3, 0.9)]
    assert radii[0] > radii[1] + 0.03
    _, _, level = occupied_box(soft, opacity=0.9)
    assert level_radius(soft, level) == pytest.approx(silhouette_radius(soft, 0.9), abs=1.5 / 64)


def test_density_to_sdf_has_the_same_slope_for_soft_and_sharp_fields():
    x = torch.arange(21.0)  # grid cells along one axis
    for slope in (0.5, 50.0):  # a soft and a sharp field, crossing the level 10 at x = 8.5
        density = (10.0 + slope * (8.5 - x))[:, None, None].expand(21, 3, 3).contiguous()
        sdf = density_to_sdf(density, 10.0, band=2.0)[:, 1, 1]
        torch.testing.assert_close(sdf[7:11], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
        assert sdf[0] == -1 and sdf[-1] == 1
    with pytest.raises(ValueError, match="threshold"):
        density_to_sdf(torch.ones(3, 3, 3), 0.0)


@pytest.mark.parametrize("peak, softness", [(100.0, 0.02), (10.0, 0.08)])
def test_extract_mesh_finds_the_level_set_of_a_known_field(peak, softness):
    ball = SoftBall(radius=0.45, peak=peak, softness=softness, centre=(0.1, -0.05, 0.0))
    _, _, level = occupied_box(ball)
    verts, faces = extract_mesh(ball, LevelSetSettings(40))
    assert is_watertight(faces)
    expected = level_radius(ball, level)
    opacity = opacity_level(opacity_maps(probe_grid(ball), 2.0 / 64))
    assert expected == pytest.approx(silhouette_radius(ball, opacity), abs=1.5 / 64)
    radius = (verts - ball.centre).norm(dim=-1)
    # Every vertex lies on the level set, to a small fraction of a cell (0.03 here).
    assert radius.mean().item() == pytest.approx(expected, abs=0.01)
    assert radius.std().item() < 0.01
    assert mesh_volume(verts, faces).item() == pytest.approx(4 / 3 * math.pi * expected**3, rel=0.05)


def test_occupied_box_fits_the_object_with_margin_and_falls_back_when_empty():
    ball = SoftBall(radius=0.3, centre=(0.2, 0.0, -0.1))
    lo, hi, level = occupied_box(ball, margin=0.1)
    r = level_radius(ball, level)
    assert r == pytest.approx(silhouette_radius(ball, opacity_level(opacity_maps(probe_grid(ball), 2.0 / 64))), abs=1.5 / 64)
    for axis, c in enumerate((0.2, 0.0, -0.1)):
        # Probe points inside the ball (spacing 1/32), padded by one probe spacing and the margin.
        assert c - r - 0.1 - 1 / 32 - 1e-6 <= lo[axis] <= c - r - 0.1 + 1e-6
        assert c + r + 0.1 - 1e-6 <= hi[axis] <= c + r + 0.1 + 1 / 32 + 1e-6
    empty = SoftBall(peak=0.0)
    assert occupied_box(empty, threshold=1.0) == ((-1.0,) * 3, (1.0,) * 3, 1.0)
    verts, faces = extract_mesh(empty, LevelSetSettings(16, threshold=1.0))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)


@pytest.mark.slow
def test_surface_does_not_depend_on_the_grid_resolution():
    ball = SoftBall(radius=0.4, peak=30.0, softness=0.05)
    volumes = [mesh_volume(*extract_mesh(ball, LevelSetSettings(r))).item() for r in (24, 48)]
    assert volumes[0] == pytest.approx(volumes[1], rel=0.03)


def test_extract_mesh_from_a_nerf_field():
    torch.manual_seed(0)
    field = NeRFField(FieldConfig(num_levels=4, log2_table_size=12, max_resolution=64, hidden_dim=16, num_layers=1))
    verts, faces = extract_mesh(field, LevelSetSettings(24))
    # A fresh field is its density blob: a small closed ball around the origin.
    assert faces.shape[0] > 100 and is_watertight(faces)
    assert verts.norm(dim=-1).max().item() < 0.5


def test_dmtet_initial_surface_gradients_and_bounded_deformation():
    ball = SoftBall(radius=0.45)
    dmtet, level = dmtet_from_field(ball, LevelSetSettings(20), deform_scale=0.25)
    sdf = dmtet.signed_distance()
    assert sdf.min() >= -1 - 1e-5 and sdf.max() <= 1 + 1e-5 and bool((sdf[dmtet.boundary] == 1).all())
    verts, faces = dmtet.extract()
    ref_verts, ref_faces = extract_mesh(ball, LevelSetSettings(20))
    torch.testing.assert_close(verts, ref_verts)  # no training yet: the same surface as extract_mesh
    assert torch.equal(faces, ref_faces)

    # Gradients reach both the SDF and the deformation.
    mesh_volume(verts, faces).backward()
    assert dmtet.sdf.grad.abs().sum() > 0 and dmtet.deform.grad.abs().sum() > 0

    # The deformation is bounded by deform_scale cells, and boundary vertices never move.
    with torch.no_grad():
        dmtet.deform.normal_(0.0, 100.0)
    moved = dmtet.vertices() - dmtet.grid_verts
    assert bool((moved.abs() <= 0.25 * dmtet.cell_size + 1e-6).all())
    assert moved.abs().max() > 0.2 * dmtet.cell_size.min()
    assert moved[dmtet.boundary].abs().max() == 0

    # Any SDF change keeps the surface closed (boundary vertices are pinned outside).
    with torch.no_grad():
        dmtet.sdf.add_(torch.randn(dmtet.sdf.shape, generator=torch.Generator().manual_seed(0)))
    assert is_watertight(dmtet.extract()[1])


def test_vertex_normals_point_outward_and_are_differentiable():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    verts = torch.tensor(sphere.vertices, dtype=torch.float32, requires_grad=True)
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    normals = vertex_normals(verts, faces)
    cos = (normals * torch.nn.functional.normalize(verts, dim=-1)).sum(-1)
    assert cos.min() > 0.99
    normals[:, 0].sum().backward()
    assert verts.grad.abs().sum() > 0


def test_normal_consistency_and_laplacian():
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))  # 12 triangles, 18 edges, 12 of them at 90 degrees
    verts = torch.tensor(box.vertices, dtype=torch.float32)
    faces = torch.tensor(box.faces, dtype=torch.long)
    assert normal_consistency_loss(verts, faces).item() == pytest.approx(12 / 18, abs=1e-5)

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    smooth = torch.tensor(sphere.vertices, dtype=torch.float32)
    noisy = (smooth + 0.02 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(0))).requires_grad_()
    assert normal_consistency_loss(noisy, faces) > normal_consistency_loss(smooth, faces) + 0.01
    assert laplacian_loss(noisy, faces) > laplacian_loss(smooth, faces) + 0.005
    # Descending the Laplacian removes noise: the loss falls and the vertices move back toward the sphere.
    error = (noisy - smooth).norm(dim=-1).mean().item()
    before = laplacian_loss(noisy, faces).item()
    optimizer = torch.optim.Adam([noisy], lr=2e-3)
    for _ in range(30):
        optimizer.zero_grad()
        laplacian_loss(noisy, faces).backward()
        optimizer.step()
    assert laplacian_loss(noisy, faces).item() < 0.65 * before
    assert (noisy - smooth).norm(dim=-1).mean().item() < 0.85 * error


def test_volumetric_iou_and_chamfer_against_known_shapes():
    cube = primitive_mesh("cube")  # side 0.8
    half = trimesh.creation.box(extents=(0.4, 0.8, 0.8))
    assert volumetric_iou(cube, cube) == 1.0
    assert volumetric_iou(cube, half) == pytest.approx(0.5, abs=0.04)
    sphere = primitive_mesh("sphere")
    occupied = occupancy_grid(sphere, resolution=48).float().mean().item() * 8.0
    assert occupied == pytest.approx(sphere.volume, rel=0.03)
    # Inverted winding is still a solid; (vertices, faces) tensors work like meshes.
    inverted = (torch.tensor(cube.vertices), torch.tensor(cube.faces[:, ::-1].copy()))
    assert volumetric_iou(cube, inverted) == 1.0
    # Two independent samples of one surface are ~sqrt(area / N) / 2 apart each way: 0.04 here.
    same = chamfer_distance(sphere, sphere, num_points=2000)
    assert same < 0.05
    bigger = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    assert chamfer_distance(sphere, bigger, num_points=2000) == pytest.approx(0.21, abs=0.02)

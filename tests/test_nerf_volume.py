import copy
import math

import pytest
import torch

from geometry.nerf import FieldConfig, NeRFField
from renderers.cameras import cameras_from_angles, orbit_cameras
from renderers.ray_march import intersect_sphere
from renderers.volume import DREAMFUSION_SHADING, OccupancyGrid, VolumeConfig, render_volume, sample_shading

SMALL_FIELD = FieldConfig(num_levels=4, log2_table_size=12, base_resolution=8, max_resolution=64, hidden_dim=16, num_layers=1)
ALBEDO = (0.8, 0.3, 0.1)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class SphereField:
    """Analytic field: constant density inside a sphere at the origin, constant albedo, radial normals."""

    def __init__(self, radius=0.5, density=300.0, inward=False, centre=(0.0, 0.0, 0.0)):
        self.radius, self.sigma, self.sign = radius, density, -1.0 if inward else 1.0
        self.centre = torch.tensor(centre)

    def __call__(self, x):
        sigma = torch.where((x - self.centre).norm(dim=-1) < self.radius, self.sigma, 0.0)
        return sigma, torch.tensor(ALBEDO).expand(x.shape[0], 3)

    def density(self, x):
        return self(x)[0]

    def forward_with_normal(self, x, create_graph=False):
        sigma, albedo = self(x)
        return sigma, albedo, self.sign * torch.nn.functional.normalize(x - self.centre, dim=-1)


def front_camera(res=48, distance=2.8, fovy=40.0):
    return cameras_from_angles([0.0], [0.0], distance, fovy, (res, res))


def pixel_radius(cams):
    """Distance of each pixel centre from the image centre, px: [H, W]."""
    h, w = cams.height, cams.width
    i, j = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return ((i - h / 2) ** 2 + (j - w / 2) ** 2).sqrt()


def test_sphere_silhouette_colour_and_depth():
    cams = front_camera()
    field, config = SphereField(), VolumeConfig(num_samples=128)
    background = torch.tensor([[0.0, 0.0, 1.0]])
    out = render_volume(field, cams, config, shading="albedo", background=background)
    assert out["rgb"].shape == (1, 48, 48, 3) and out["alpha"].shape == (1, 48, 48, 1)
    assert out["depth"].shape == (1, 48, 48, 1) and "normal" not in out

    # The sphere's projected disc: radius focal * tan(asin(r / d)) px.
    focal = float(cams.intrinsics[0, 0, 0])
    disc = focal * math.tan(math.asin(0.5 / 2.8))
    r = pixel_radius(cams)
    alpha, rgb = out["alpha"][0, ..., 0], out["rgb"][0]
    inside, outside = r < disc - 1.0, r > disc + 1.0
    assert alpha[inside].min() > 0.99 and alpha[outside].max() < 0.01
    torch.testing.assert_close(rgb[inside], torch.tensor(ALBEDO).expand_as(rgb[inside]), atol=0.01, rtol=0)
    torch.testing.assert_close(rgb[outside], background.expand_as(rgb[outside]), atol=0.01, rtol=0)
    # Centre pixel: the surface is at distance d - r along the ray.
    assert abs(out["depth"][0, 24, 24, 0].item() - (2.8 - 0.5)) < 0.02


def test_lambertian_normals_point_outward_and_orientation_loss():
    cams = front_camera()
    config = VolumeConfig(num_samples=128, ambient=0.2)
    out = render_volume(SphereField(), cams, config, shading="lambertian")
    # Composited normal at the centre faces the camera (camera on +x).
    n = out["normal"][0, 24, 24]
    assert torch.nn.functional.cosine_similarity(n, cams.position[0], dim=0) > 0.99
    # Light at the camera: the centre is lit head-on (shade 1), the limb is darker.
    torch.testing.assert_close(out["rgb"][0, 24, 24], torch.tensor(ALBEDO), atol=0.02, rtol=0)
    assert out["rgb"][0, 24, 24].sum() > out["rgb"][0, 24, 14].sum() + 0.1
    textureless = render_volume(SphereField(), cams, config, shading="textureless")
    torch.testing.assert_close(textureless["rgb"][0, 24, 24], torch.ones(3), atol=0.02, rtol=0)
    # Outward normals seen from outside cost nothing; inward ones are penalised.
    assert out["orientation"].item() < 1e-6
    inward = render_volume(SphereField(inward=True), cams, config, shading="lambertian")
    assert inward["orientation"].item() > 0.05


def test_rays_missing_the_sphere_are_empty():
    near, far, hit = intersect_sphere(
        torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0.0, 0, 0]]),
        torch.tensor([[-1.0, 0, 0], [0.0, 1.0, 0], [0.0, 0, 1.0]]), 1.0, 0.05,
    )
    assert hit.tolist() == [True, False, True]
    torch.testing.assert_close(near[[0, 2]], torch.tensor([2.0, 0.05]))
    torch.testing.assert_close(far[[0, 2]], torch.tensor([4.0, 1.0]))


def test_fresh_field_blob_is_opaque_at_the_centre_only():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    cams = front_camera(res=32, fovy=45.0)
    with torch.no_grad():
        alpha = render_volume(field, cams, VolumeConfig(num_samples=48))["alpha"][0, ..., 0]
    assert alpha[16, 16] > 0.8
    # A ray 0.8 units off-centre crosses the bounding sphere but not the blob.
    focal = float(cams.intrinsics[0, 0, 0])
    col = int(16 + focal * 0.8 / 2.8)
    assert alpha[16, col] < 0.2 and alpha[0, 0] < 0.2


def test_gradients_reach_field_parameters():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    cams = orbit_cameras(2, (16, 16))
    out = render_volume(field, cams, VolumeConfig(num_samples=16), shading="lambertian",
                        background=torch.rand(2, 16, 16, 3), generator=torch.Generator().manual_seed(0))
    loss = (out["rgb"] - 0.3).square().mean() + out["orientation"]
    loss.backward()
    for name, p in field.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_occupancy_grid_skips_empty_space_without_changing_the_image():
    field = SphereField(radius=0.4, centre=(0.3, -0.2, 0.1))  # off-centre: catches swapped axes
    grid = OccupancyGrid(resolution=16, bound=1.0, threshold=0.01, update_every=4, warmup_steps=8)
    gen = torch.Generator().manual_seed(0)
    assert grid.occupied.all()
    assert grid.step(field, 4, gen) and grid.occupied.all()  # warm-up: nothing marked empty yet
    assert not grid.step(field, 5, gen)
    for step in (8, 12, 16):
        grid.step(field, step, gen)
    centres = grid.cell_points().reshape(16, 16, 16, 3)
    radius = (centres - field.centre).norm(dim=-1)
    assert grid.occupied[radius < 0.35].all()
    assert not grid.occupied[radius > 0.7].any()
    assert grid.occupied_fraction < 0.15
    points = torch.rand(20000, 3, generator=gen) * 2 - 1
    dist = (points - field.centre).norm(dim=-1)
    assert grid.lookup(points[dist < 0.4]).all()
    assert not grid.lookup(points[dist > 0.9]).any()  # dilation reaches at most ~2 cell diagonals

    cams = front_camera(res=32)
    config = VolumeConfig(num_samples=64)
    plain = render_volume(field, cams, config, background=torch.ones(1, 3))
    skipped = render_volume(field, cams, config, background=torch.ones(1, 3), occupancy=grid)
    assert skipped["samples_evaluated"] < plain["samples_evaluated"] / 3
    torch.testing.assert_close(skipped["rgb"], plain["rgb"], atol=1e-4, rtol=0)
    torch.testing.assert_close(skipped["alpha"], plain["alpha"], atol=1e-4, rtol=0)


def test_occupancy_grid_never_empties_a_uniform_field():
    class Uniform(SphereField):
        def density(self, x):
            return torch.full((x.shape[0],), 1e-3)

    grid = OccupancyGrid(resolution=8, threshold=0.01, warmup_steps=0)
    grid.update(Uniform())
    assert grid.occupied.all()  # every cell is at the mean: nothing is singled out as empty


def test_occupancy_grid_on_a_nerf_field():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    grid = OccupancyGrid.from_config(VolumeConfig(occupancy_resolution=16, occupancy_threshold=1.0), device="cpu")
    grid.update(field, torch.Generator().manual_seed(0))
    # Threshold 1.0 against softplus(-3) = 0.05 empty space: only the blob's cells stay.
    assert 0.0 < grid.occupied_fraction < 0.3
    cams = front_camera(res=24, fovy=45.0)
    config = VolumeConfig(num_samples=48)
    with torch.no_grad():
        plain = render_volume(field, cams, config)
        skipped = render_volume(field, cams, config, occupancy=grid)
    assert (skipped["alpha"] - plain["alpha"]).abs().max() < 0.15  # only the faint haze is dropped
    assert abs(skipped["alpha"][0, 12, 12].item() - plain["alpha"][0, 12, 12].item()) < 0.1


def test_chunked_rendering_equals_unchunked():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    cams = orbit_cameras(2, (12, 12))
    full = render_volume(field, cams, VolumeConfig(num_samples=16), shading="lambertian",
                         generator=torch.Generator().manual_seed(3))
    chunked = render_volume(field, cams, VolumeConfig(num_samples=16, chunk_size=50), shading="lambertian",
                            generator=torch.Generator().manual_seed(3))
    for key in ("rgb", "alpha", "depth", "normal"):
        torch.testing.assert_close(chunked[key], full[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked["orientation"], full["orientation"], atol=1e-7, rtol=1e-4)


def test_jitter_changes_samples_and_midpoints_are_deterministic():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    cams = front_camera(res=8)
    config = VolumeConfig(num_samples=8)
    with torch.no_grad():
        a = render_volume(field, cams, config)["rgb"]
        b = render_volume(field, cams, config)["rgb"]
        c = render_volume(field, cams, config, generator=torch.Generator().manual_seed(1))["rgb"]
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_nerf_field_interface():
    torch.manual_seed(0)
    field = NeRFField(SMALL_FIELD)
    x = torch.rand(100, 3) * 2 - 1
    sigma, albedo = field(x)
    assert sigma.shape == (100,) and albedo.shape == (100, 3)
    assert (sigma >= 0).all() and (albedo >= 0).all() and (albedo <= 1).all()
    outside = torch.tensor([[1.5, 0.0, 0.0], [0.0, -1.2, 0.3]])
    assert (field.density(outside) == 0).all()
    torch.testing.assert_close(field.albedo(x), albedo)

    # Normals: unit, -grad(density), outward on the fresh blob.
    p = torch.tensor([[0.25, 0.0, 0.0], [0.0, -0.2, 0.1]])
    n = field.normal(p)
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(2))
    assert (n * torch.nn.functional.normalize(p, dim=-1)).sum(-1).min() > 0.95
    pg = p.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(field.density(pg).sum(), pg)
    torch.testing.assert_close(n, -torch.nn.functional.normalize(g, dim=-1))
    with torch.no_grad():  # evaluation mode still gets normals
        torch.testing.assert_close(field.normal(p), n)
    # Normals equal -normalised autograd gradients on a field with a non-trivial table too.
    trained = copy.deepcopy(field)
    with torch.no_grad():
        trained.encoding.table.normal_(0.0, 0.5)
    q = (torch.rand(64, 3) * 1.6 - 0.8).requires_grad_(True)
    (g,) = torch.autograd.grad(trained.density(q).sum(), q)
    torch.testing.assert_close(trained.normal(q), -torch.nn.functional.normalize(g, dim=-1), atol=1e-4, rtol=0)
    # create_graph keeps them differentiable w.r.t. the parameters.
    field.normal(p, create_graph=True)[:, 0].sum().backward()
    assert field.encoding.table.grad.abs().sum() > 0

    # query: chunked, gradient-free, same values.
    qs, qa = field.query(x, chunk_size=7)
    torch.testing.assert_close(qs, sigma.detach())
    torch.testing.assert_close(qa, albedo.detach())
    assert not qs.requires_grad
    # deepcopy gives an independent, identical field.
    clone = copy.deepcopy(field)
    torch.testing.assert_close(clone(x)[0], sigma)
    with torch.no_grad():
        clone.encoding.table.add_(1.0)
    torch.testing.assert_close(field(x)[0], sigma)

    groups = field.parameter_groups(lr_encoding=1e-2, lr_network=1e-3)
    assert [g["lr"] for g in groups] == [1e-2, 1e-3]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in field.parameters())
    torch.optim.Adam(groups)  # accepted as is


def test_exp_activation_and_config_errors():
    field = NeRFField(FieldConfig(**{**SMALL_FIELD.__dict__, "density_activation": "exp"}))
    assert (field.density(torch.zeros(1, 3)) > 100).all()  # exp(10 - 3 + ...) at the blob centre
    with pytest.raises(ValueError, match="density_activation"):
        NeRFField(FieldConfig(density_activation="relu"))
    with pytest.raises(ValueError, match="shading"):
        render_volume(SphereField(), front_camera(res=4), VolumeConfig(), shading="phong")
    with pytest.raises(ValueError, match="background"):
        render_volume(SphereField(), front_camera(res=4), VolumeConfig(), background=torch.ones(2, 3))
    with pytest.raises(ValueError, match="num_samples"):
        render_volume(SphereField(), front_camera(res=4), VolumeConfig(num_samples=0))


def test_sample_shading_follows_dreamfusion_mix():
    gen = torch.Generator().manual_seed(0)
    assert sample_shading(5, albedo_warmup_steps=10, generator=gen) == "albedo"
    draws = [sample_shading(100, albedo_warmup_steps=10, generator=gen) for _ in range(2000)]
    for name, p in DREAMFUSION_SHADING.items():
        assert abs(draws.count(name) / 2000 - p) < 0.04, name
    assert sum(DREAMFUSION_SHADING.values()) == pytest.approx(1.0)


class ParamSphereField(SphereField):
    """SphereField whose density and albedo are two separate parameters."""

    def __init__(self):
        super().__init__()
        self.log_density = torch.nn.Parameter(torch.tensor(math.log(30.0)))
        self.albedo = torch.nn.Parameter(torch.tensor(ALBEDO))

    def __call__(self, x):
        inside = (x - self.centre).norm(dim=-1) < self.radius
        return inside * self.log_density.exp(), self.albedo.expand(x.shape[0], 3)


@pytest.mark.parametrize("shading", ["albedo", "lambertian", "textureless"])
@pytest.mark.parametrize("chunk_size, skip_empty", [(0, False), (100, False), (0, True)])
def test_the_texture_path_has_the_images_values_and_trains_the_albedo_alone(shading, chunk_size, skip_empty):
    """rgb_texture: rgb's values, but a loss on it reaches the albedo the way rgb would, and the density not at all."""
    field, cams = ParamSphereField(), front_camera(res=16)
    config = VolumeConfig(num_samples=32, ambient=0.2, chunk_size=chunk_size)
    grid = None
    if skip_empty:  # an occupancy grid that has marked the space around the sphere empty
        grid = OccupancyGrid(resolution=16, update_every=1, warmup_steps=0)
        for step in range(3):
            grid.step(field, step, torch.Generator().manual_seed(step))
        assert grid.occupied_fraction < 0.2
    out = render_volume(field, cams, config, shading=shading, background=torch.tensor([[0.2, 0.5, 0.9]]),
                        occupancy=grid, generator=torch.Generator().manual_seed(0), texture_path=True)
    torch.testing.assert_close(out["rgb_texture"], out["rgb"].detach(), rtol=0, atol=1e-6)
    target = torch.rand(out["rgb"].shape, generator=torch.Generator().manual_seed(1))
    via_rgb = torch.autograd.grad((out["rgb"] * target).sum(), [field.log_density, field.albedo], retain_graph=True,
                                  allow_unused=True, materialize_grads=True)
    assert via_rgb[0].abs() > 1e-3  # the density shapes the image...
    if shading == "textureless":  # white: the albedo is not seen, so nothing is trained through the texture path
        assert not out["rgb_texture"].requires_grad and via_rgb[1].abs().sum() == 0
    else:
        via_texture = torch.autograd.grad((out["rgb_texture"] * target).sum(), [field.log_density, field.albedo],
                                          allow_unused=True, materialize_grads=True)
        assert via_texture[0] == 0  # ...but not through the texture path
        assert via_rgb[1].abs().sum() > 1e-3
        torch.testing.assert_close(via_texture[1], via_rgb[1])
    assert "rgb_texture" not in render_volume(field, cams, config, shading=shading)

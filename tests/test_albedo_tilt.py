"""geometry.mesh_ops.albedo_tilt_loss: light baked into an albedo (bright top, dark bottom) is measured and trained away."""
import torch
import trimesh

from geometry.mesh_ops import albedo_tilt_loss


def _sphere():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def test_slope_of_a_lit_albedo():
    verts, faces = _sphere()
    lit = lambda p: (0.5 + 0.2 * p[:, 2:] / 0.5).expand(-1, 3)  # brightness = 0.5 + 0.2 n_z on this sphere
    assert abs(float(albedo_tilt_loss(verts, faces, lit, samples=0)) - 0.2**2) < 2e-3
    sampled = albedo_tilt_loss(verts, faces, lit, samples=4096, generator=torch.Generator().manual_seed(0))
    assert abs(float(sampled) - 0.2**2) < 5e-3
    flat = lambda p: torch.full_like(p, 0.4)
    assert float(albedo_tilt_loss(verts, faces, flat, samples=0)) < 1e-10
    sideways = lambda p: (0.5 + 0.2 * p[:, :1] / 0.5).expand(-1, 3)  # varies with x, not with z
    assert float(albedo_tilt_loss(verts, faces, sideways, samples=0)) < 1e-4


def test_descent_removes_the_tilt_and_not_the_colour():
    verts, faces = _sphere()
    tilt, base = torch.tensor(0.3, requires_grad=True), torch.tensor(0.6, requires_grad=True)
    albedo = lambda p: (base + tilt * p[:, 2:] / 0.5).expand(-1, 3)
    optimizer = torch.optim.Adam([tilt, base], lr=0.01)
    for _ in range(100):
        optimizer.zero_grad()
        albedo_tilt_loss(verts, faces, albedo, samples=0).backward()
        optimizer.step()
    assert abs(tilt.item()) < 0.05
    # The mean colour gets only rounding-level gradient (Adam still turns it into small steps).
    assert abs(base.item() - 0.6) < 0.03

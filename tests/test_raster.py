"""Tests of renderers/raster.py: the pure-PyTorch rasterizer on CPU, and its agreement with
nvdiffrast (through `renderers.rasterizer.Rasterizer`) on CUDA when both are available."""

import math

import pytest
import torch
import trimesh

from renderers.raster import antialias, interpolate, rasterize, texture
from renderers.rasterizer import Rasterizer, available_backends


def perspective(focal: float, near: float = 0.1, far: float = 10.0) -> torch.Tensor:
    """OpenGL projection [4, 4] without the y flip (tests reason in NDC directly)."""
    a, b = -(far + near) / (far - near), -2 * far * near / (far - near)
    return torch.tensor([[focal, 0, 0, 0], [0, focal, 0, 0], [0, 0, a, b], [0, 0, -1, 0]], dtype=torch.float64)


def to_clip(verts_cam: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """Camera-space points [V, 3] -> clip space [1, V, 4]."""
    return (torch.cat([verts_cam, torch.ones_like(verts_cam[:, :1])], -1) @ proj.T)[None]


def cube() -> tuple[torch.Tensor, torch.Tensor]:
    """Unit cube centred at the origin with outward (counter-clockwise) winding."""
    m = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    return torch.tensor(m.vertices, dtype=torch.float64), torch.tensor(m.faces, dtype=torch.int64)


# ----------------------------------------------------------------------------- rasterize
def test_single_triangle_coverage_barycentrics_and_ids():
    # Legs along x and y from (-0.9, -0.9); the hypotenuse x + y = -0.1 passes no pixel centre.
    pos = torch.tensor([[[-0.9, -0.9, 0.1, 1.0], [0.8, -0.9, 0.3, 1.0], [-0.9, 0.8, 0.5, 1.0]]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast = rasterize(pos, tri, (4, 4))
    assert rast.shape == (1, 4, 4, 4)
    # Pixel (i, j) has its centre at x = -0.75 + 0.5 j, y = -0.75 + 0.5 i: inside iff i + j <= 2.
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(rast[0, ..., 3], expected)
    assert (rast[0][expected == 0] == 0).all()  # background is all zeros
    for i, j in [(0, 0), (1, 1), (0, 2), (2, 0)]:
        x, y = -0.75 + 0.5 * j, -0.75 + 0.5 * i
        v = (x + 0.9) / 1.7  # weight of vertex 1
        w2 = (y + 0.9) / 1.7  # weight of vertex 2
        u = 1 - v - w2
        z = 0.1 * u + 0.3 * v + 0.5 * w2
        torch.testing.assert_close(rast[0, i, j, :3], torch.tensor([u, v, z]), atol=1e-6, rtol=0)


def test_cube_depth_test_coverage_and_attributes():
    verts, tri = cube()
    focal = 2.0
    cam = verts - torch.tensor([0.0, 0.0, 3.0], dtype=torch.float64)  # camera at z = 3, looking along -z
    pos = to_clip(cam, perspective(focal))
    rast = rasterize(pos, tri, (20, 20))
    covered = rast[0, ..., 3] > 0
    # The front face (depth 2.5) projects to |x|, |y| < 0.5 * focal / 2.5 = 0.4 in NDC: 8 x 8
    # pixel centres (x = -0.95 + 0.1 j); side and back faces project inside it.
    assert int(covered.sum()) == 64
    assert covered[6:14, 6:14].all()
    front = torch.nonzero(torch.isclose(verts[tri][:, :, 2], torch.tensor(0.5, dtype=torch.float64)).all(-1))
    ids = rast[0, ..., 3][covered].long() - 1
    assert torch.isin(ids, front.squeeze(1)).all()  # the nearest face wins everywhere
    z_front = (perspective(focal)[2, 2] * -2.5 + perspective(focal)[2, 3]) / 2.5
    torch.testing.assert_close(rast[0, ..., 2][covered], z_front.expand(64), atol=1e-9, rtol=0)
    # Interpolated world positions: z = 0.5 on the front face, x = x_ndc * 2.5 / focal.
    world = interpolate(verts, rast, tri)
    assert world.shape == (1, 20, 20, 3)
    x_ndc = -0.95 + 0.1 * torch.arange(20, dtype=torch.float64)
    torch.testing.assert_close(world[0, ..., 2][covered], torch.full((64,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(world[0, 6:14, 6:14, 0], (x_ndc[6:14] * 2.5 / focal).expand(8, 8))
    assert (world[0][~covered] == 0).all()


def test_perspective_correct_interpolation():
    # A triangle receding in depth (w from 1.5 to 4): interpolated camera-space points must
    # lie where each pixel's ray hits the triangle's plane.
    cam = torch.tensor([[-1.0, -0.8, -1.5], [1.2, -0.6, -4.0], [-0.2, 1.0, -2.5]], dtype=torch.float64)
    tri = torch.tensor([[0, 1, 2]])
    focal, n = 1.5, 24
    rast = rasterize(to_clip(cam, perspective(focal)), tri, (n, n))
    covered = rast[0, ..., 3] > 0
    assert int(covered.sum()) > 100
    points = interpolate(cam, rast, tri)[0][covered]  # [P, 3]
    i, j = (k.double() for k in torch.nonzero(covered, as_tuple=True))
    ray = torch.stack([(2 * j + 1) / n - 1, (2 * i + 1) / n - 1, torch.full_like(i, -focal)], -1)
    normal = torch.linalg.cross(cam[1] - cam[0], cam[2] - cam[0])
    hit = ray * ((cam[0] @ normal) / (ray @ normal))[:, None]
    torch.testing.assert_close(points, hit, atol=1e-9, rtol=1e-9)
    # Screen-space (affine) interpolation would be far off: the test can tell them apart.
    ndc = cam[:, :2] * focal / -cam[:, 2:]
    px = ray[:, :2]
    lam = torch.linalg.solve(torch.stack([ndc[1] - ndc[0], ndc[2] - ndc[0]], 1), (px - ndc[0]).T).T
    affine = cam[0] + lam[:, :1] * (cam[1] - cam[0]) + lam[:, 1:] * (cam[2] - cam[0])
    assert (affine - hit).abs().max() > 0.05


def test_chunking_batches_and_skipped_triangles():
    verts, tri = cube()
    cam = verts @ torch.tensor([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]], dtype=torch.float64).T
    pos = torch.cat([to_clip(cam - torch.tensor([0.0, 0.0, 3.0]), perspective(2.0)),
                     to_clip(cam - torch.tensor([0.3, 0.1, 2.5]), perspective(2.0))])
    full = rasterize(pos, tri, (24, 20))
    torch.testing.assert_close(rasterize(pos, tri, (24, 20), chunk_size=5), full)
    torch.testing.assert_close(rasterize(pos[1:], tri, (24, 20)), full[1:])
    assert (full[0, ..., 3] > 0).sum() != (full[1, ..., 3] > 0).sum()
    # A triangle with a vertex behind the camera (w <= 0) and a degenerate one are skipped.
    bad = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, -1.0], [0.0, 0.5, 0.0, 1.0],
                         [0.1, 0.1, 0.0, 1.0], [0.2, 0.2, 0.0, 1.0], [0.3, 0.3, 0.0, 1.0]]])
    assert rasterize(bad, torch.tensor([[0, 1, 2], [3, 4, 5]]), (8, 8)).abs().sum() == 0


def test_invalid_arguments_are_named():
    pos = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="pos_clip"):
        rasterize(torch.zeros(3, 4), torch.tensor([[0, 1, 2]]), (4, 4))
    with pytest.raises(ValueError, match="tri"):
        rasterize(pos, torch.tensor([[0.0, 1.0, 2.0]]), (4, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        rasterize(pos, torch.tensor([[0, 1, 2]]), (4, 4), chunk_size=-1)


# ----------------------------------------------------------------------------- gradients
def test_interpolation_gradients_match_finite_differences():
    torch.manual_seed(0)
    pos = torch.tensor([[[-0.7, -0.6, 0.2, 1.0], [0.9, -0.8, 0.4, 1.6], [-0.13, 0.93, -0.3, 1.2]]],
                       dtype=torch.float64, requires_grad=True)
    tri = torch.tensor([[0, 1, 2]])
    attr = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 12, 12, 3, dtype=torch.float64)

    def loss(p: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rast = rasterize(p, tri, (12, 12))
        img = torch.cat([interpolate(a, rast, tri), rast[..., 2:3]], -1)
        return (img * weight).sum(), rast[..., 3]

    value, ids = loss(pos, attr)
    value.backward()
    eps = 1e-6
    for v in range(3):
        for c in range(4):
            delta = torch.zeros_like(pos)
            delta[0, v, c] = eps
            (lp, ids_p), (lm, ids_m) = loss(pos.detach() + delta, attr), loss(pos.detach() - delta, attr)
            assert torch.equal(ids_p, ids) and torch.equal(ids_m, ids)  # coverage unchanged
            fd = (lp - lm) / (2 * eps)
            assert math.isclose(pos.grad[0, v, c].item(), fd.item(), rel_tol=1e-4, abs_tol=1e-6)
    assert pos.grad.abs().sum() > 0 and attr.grad.abs().sum() > 0


def square(half: float) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.tensor([[[-half, -half, 0.0, 1.0], [half, -half, 0.0, 1.0], [half, half, 0.0, 1.0],
                         [-half, half, 0.0, 1.0]]], dtype=torch.float64)
    return pos, torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_antialias_silhouette_gradient_pushes_square_outward():
    n = 16
    pos, tri = square(0.4)  # edges halfway between pixel centres
    pos.requires_grad_(True)
    target = (rasterize(square(0.6)[0], tri, (n, n))[..., 3:] > 0).double()
    white = torch.ones(4, 1, dtype=torch.float64)
    rast = rasterize(pos, tri, (n, n))
    hard = interpolate(white, rast, tri)
    aa = antialias(hard, rast, pos, tri)
    # Covered pixels (5..10) keep their colour: the outline's crossings lie beyond their
    # footprints, and the interior diagonal joins two same-facing triangles (no silhouette).
    shade = interpolate(torch.rand(4, 3, dtype=torch.float64), rast, tri)
    torch.testing.assert_close(antialias(shade, rast, pos, tri)[0, 5:11, 5:11], shade[0, 5:11, 5:11])
    assert ((aa > 0) & (aa < 1)).sum() == 4 * 6  # blended pixels: the 6 outer neighbours per side
    ((aa - target) ** 2).sum().backward()
    xy, g = pos.detach()[0, :, :2], pos.grad[0, :, :2]
    assert (g * xy.sign() < 0).all()  # every corner is pushed outward, in x and in y
    # Without antialias the silhouette carries no position gradient at all.
    pos.grad = None
    ((interpolate(white, rasterize(pos, tri, (n, n)), tri) - target) ** 2).sum().backward()
    assert pos.grad is None or pos.grad.abs().max() == 0


def test_antialias_gradient_matches_finite_differences():
    torch.manual_seed(1)
    pos = torch.tensor([[[-0.63, -0.52, 0.1, 1.0], [0.71, -0.38, 0.2, 1.3], [-0.12, 0.77, 0.3, 1.1]]],
                       dtype=torch.float64, requires_grad=True)
    tri = torch.tensor([[0, 1, 2]])
    colors = torch.rand(3, 3, dtype=torch.float64)
    weight = torch.randn(1, 12, 12, 3, dtype=torch.float64)

    def loss(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rast = rasterize(p, tri, (12, 12))
        img = interpolate(colors, rast, tri) + 0.2 * (rast[..., 3:] == 0)  # grey background
        return (antialias(img, rast, p, tri) * weight).sum(), rast[..., 3]

    value, ids = loss(pos)
    value.backward()
    eps = 1e-6
    for v in range(3):
        for c in range(2):
            delta = torch.zeros_like(pos)
            delta[0, v, c] = eps
            (lp, ids_p), (lm, ids_m) = loss(pos.detach() + delta), loss(pos.detach() - delta)
            assert torch.equal(ids_p, ids) and torch.equal(ids_m, ids)
            fd = (lp - lm) / (2 * eps)
            assert math.isclose(pos.grad[0, v, c].item(), fd.item(), rel_tol=1e-4, abs_tol=1e-6)


def test_antialias_approaches_supersampled_coverage():
    # A sphere's outline is crossed by thin grazing triangles that cover no pixel centre:
    # the silhouette must still be found (the segment walks across them).
    m = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    cam = torch.tensor(m.vertices) - torch.tensor([0.1, 0.05, 2.0])
    pos = to_clip(cam, perspective(2.5)).float()
    tri = torch.tensor(m.faces)
    rast = rasterize(pos, tri, (32, 32))
    mask = (rast[..., 3:] > 0).float()
    aa = antialias(mask, rast, pos, tri)
    fine = (rasterize(pos, tri, (256, 256))[..., 3:] > 0).float()
    truth = torch.nn.functional.avg_pool2d(fine.permute(0, 3, 1, 2), 8).permute(0, 2, 3, 1)
    hard_err, aa_err = (mask - truth).abs().sum(), (aa - truth).abs().sum()
    assert aa_err < 0.35 * hard_err, (aa_err, hard_err)


# ----------------------------------------------------------------------------- texture
def test_texture_on_a_2x2_texture():
    tex = torch.tensor([[[[1.0], [2.0]], [[3.0], [4.0]]]], dtype=torch.float64)  # rows (1, 2), (3, 4)
    uv = torch.tensor([[[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.0, 0.25], [0.5, 0.0]]]],
                      dtype=torch.float64)
    wrap = texture(tex, uv, boundary="wrap")[0, 0, :, 0]
    torch.testing.assert_close(wrap, torch.tensor([1.0, 2.0, 3.0, 2.5, 1.5, 2.5], dtype=torch.float64))
    clamp = texture(tex, uv, boundary="clamp")[0, 0, :, 0]
    torch.testing.assert_close(clamp, torch.tensor([1.0, 2.0, 3.0, 2.5, 1.0, 1.5], dtype=torch.float64))
    zero = texture(tex, uv, boundary="zero")[0, 0, :, 0]
    torch.testing.assert_close(zero, torch.tensor([1.0, 2.0, 3.0, 2.5, 0.5, 0.75], dtype=torch.float64))
    nearest = texture(tex, uv[:, :, :3] + 0.1, filter="nearest")[0, 0, :, 0]
    torch.testing.assert_close(nearest, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    tex_g, uv_g = tex.clone().requires_grad_(True), torch.rand(1, 2, 3, 2, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, u: texture(t, u), (tex_g, uv_g))


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or "nvdiffrast" not in available_backends(),
    reason="needs CUDA and nvdiffrast",
)
def test_backends_agree_on_cuda():
    dev = torch.device("cuda")
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    cam = torch.tensor(m.vertices, dtype=torch.float32) - torch.tensor([0.05, 0.1, 2.0])
    pos0 = to_clip(cam.double(), perspective(2.5)).float().to(dev)
    tri = torch.tensor(m.faces, dtype=torch.int32, device=dev)
    attr0 = torch.rand(1, cam.shape[0], 3, device=dev)
    res = (64, 64)
    rasterizers = {b: Rasterizer.make(b, dev) for b in ("torch", "nvdiffrast")}
    ids = {b: r.rasterize(pos0, tri, res)[..., 3] for b, r in rasterizers.items()}
    same = ids["torch"] == ids["nvdiffrast"]
    assert same.float().mean() > 0.99
    weight = torch.randn(1, *res, 3, device=dev) * same[..., None]
    out = {}
    for b, r in rasterizers.items():
        pos, attr = pos0.clone().requires_grad_(True), attr0.clone().requires_grad_(True)
        rast = r.rasterize(pos, tri, res)
        img = r.interpolate(attr, rast, tri)
        (img * weight).sum().backward()
        aa_pos = pos0.clone().requires_grad_(True)
        aa = r.antialias(img.detach(), rast.detach(), aa_pos, tri)
        (aa * weight).sum().backward()
        out[b] = (rast.detach(), img.detach(), pos.grad, attr.grad, aa.detach(), aa_pos.grad)
    (rt, it, gpt, gat, at, gaat), (rn, inn, gpn, gan, an, gaan) = out["torch"], out["nvdiffrast"]
    torch.testing.assert_close(rt[same], rn[same], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(it, inn, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gat, gan, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gpt, gpn, atol=1e-3, rtol=1e-2)
    # Antialiasing follows the same idea but not the same arithmetic: compare loosely.
    assert (at - an).abs().mean() < 0.01
    cos = torch.nn.functional.cosine_similarity(gaat.flatten(), gaan.flatten(), dim=0)
    assert cos > 0.8, cos

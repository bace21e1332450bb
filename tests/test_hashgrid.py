import math

import pytest
import torch

from geometry.hashgrid import HASH_PRIMES, HashGridEncoding

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_output_shape_and_levels():
    enc = HashGridEncoding(num_levels=6, features_per_level=2, log2_table_size=12, base_resolution=8, max_resolution=128)
    x = torch.rand(37, 3) * 2 - 1
    y = enc(x)
    assert enc.output_dim == 12
    assert y.shape == (37, 12)
    assert torch.isfinite(y).all()
    assert enc.resolutions[0] == 8 and enc.resolutions[-1] == 128
    assert all(a < b for a, b in zip(enc.resolutions, enc.resolutions[1:]))
    assert enc.table.abs().max() <= 1e-4  # Instant-NGP init


def test_dense_and_hashed_levels():
    enc = HashGridEncoding(num_levels=5, log2_table_size=12, base_resolution=4, max_resolution=64)
    t = 2**12
    for r, dense, size in zip(enc.resolutions, enc.dense, enc.level_sizes):
        assert dense == ((r + 1) ** 3 <= t)
        assert size == ((r + 1) ** 3 if dense else t)
    assert enc.dense[0] and not enc.dense[-1]
    assert enc.table.shape == (enc.features_per_level, sum(enc.level_sizes))

    # A dense level is a bijection of its vertices onto its own block of the table.
    r = enc.resolutions[0]
    v = torch.arange(r + 1)
    coords = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    rows = enc.vertex_index(0, coords)
    assert rows.unique().numel() == (r + 1) ** 3
    assert rows.min() == enc.level_offsets[0] and rows.max() == enc.level_offsets[0] + (r + 1) ** 3 - 1

    # A hashed level uses Instant-NGP's xor hash of coordinates times primes, modulo T.
    level = enc.num_levels - 1
    coords = torch.randint(0, enc.resolutions[level] + 1, (50, 3))
    expected = [
        ((int(i) * HASH_PRIMES[0]) ^ (int(j) * HASH_PRIMES[1]) ^ (int(k) * HASH_PRIMES[2])) % t + enc.level_offsets[level]
        for i, j, k in coords.tolist()
    ]
    assert enc.vertex_index(level, coords).tolist() == expected


def _single_level(dense: bool) -> HashGridEncoding:
    # base 4 -> 125 vertices: dense in a 2^10 table, hashed in a 2^6 one.
    return HashGridEncoding(num_levels=1, features_per_level=2, log2_table_size=10 if dense else 6,
                            base_resolution=4, max_resolution=4, bound=1.0)


@pytest.mark.parametrize("dense", [True, False])
def test_interpolation_exact_at_vertices_and_cell_centres(dense):
    torch.manual_seed(0)
    enc = _single_level(dense)
    assert enc.dense[0] == dense
    with torch.no_grad():
        enc.table.normal_()
    r = enc.resolutions[0]
    coords = torch.randint(0, r + 1, (20, 3))
    x = coords.float() / r * 2 - 1  # vertices in world coordinates
    rows = enc.vertex_index(0, coords)
    torch.testing.assert_close(enc(x), enc.table[:, rows].t(), atol=1e-5, rtol=0)

    # At a cell centre, trilinear interpolation is the mean of the 8 corners.
    cell = torch.tensor([[1, 2, 0], [3, 3, 3]])
    centre = (cell.float() + 0.5) / r * 2 - 1
    corners = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    for n in range(cell.shape[0]):
        rows = enc.vertex_index(0, cell[n] + corners)
        torch.testing.assert_close(enc(centre[n : n + 1])[0], enc.table[:, rows].mean(1), atol=1e-5, rtol=0)


def test_interpolation_reproduces_linear_functions():
    enc = _single_level(dense=True)
    r = enc.resolutions[0]
    v = torch.arange(r + 1)
    coords = torch.stack(torch.meshgrid(v, v, v, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        enc.table.zero_()
        rows = enc.vertex_index(0, coords)
        enc.table[0, rows] = (coords.float() @ torch.tensor([1.0, 2.0, -3.0]))
        enc.table[1, rows] = coords[:, 2].float() ** 2  # not linear: exact only at vertices
    x = torch.rand(200, 3) * 2 - 1
    pos = (x + 1) / 2 * r  # vertex units
    torch.testing.assert_close(enc(x)[:, 0], pos @ torch.tensor([1.0, 2.0, -3.0]), atol=1e-4, rtol=0)
    # Between vertices the quadratic is interpolated, not reproduced (z = 0.5 in a cell: mean of 0 and 1).
    mid = torch.tensor([[0.1, 0.1, (0.5 / r) * 2 - 1]])
    assert abs(enc(mid)[0, 1].item() - 0.5) < 1e-5


def test_gradients_reach_table_and_input():
    torch.manual_seed(0)
    enc = HashGridEncoding(num_levels=4, log2_table_size=10, base_resolution=4, max_resolution=32).double()
    with torch.no_grad():
        enc.table.normal_()
    x = (torch.rand(16, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    (enc(x) * torch.randn(16, enc.output_dim, dtype=torch.float64)).sum().backward()
    assert enc.table.grad is not None and (enc.table.grad != 0).sum() > 0
    assert x.grad is not None and (x.grad != 0).all()
    # Input gradient equals finite differences (inside cells the encoding is smooth).
    assert torch.autograd.gradcheck(lambda p: enc(p), (x.detach().requires_grad_(True),), eps=1e-7, atol=1e-4)
    # And it is differentiable once more (normals' losses need d(grad_x)/d(table)).
    xr = x.detach().requires_grad_(True)
    (gx,) = torch.autograd.grad(enc(xr).square().sum(), xr, create_graph=True)
    enc.table.grad = None
    gx.square().sum().backward()
    assert (enc.table.grad != 0).sum() > 0


def test_fits_a_3d_function():
    torch.manual_seed(0)
    enc = HashGridEncoding(num_levels=6, log2_table_size=13, base_resolution=4, max_resolution=64)
    head = torch.nn.Linear(enc.output_dim, 1)
    opt = torch.optim.Adam([{"params": enc.parameters(), "lr": 3e-2}, {"params": head.parameters(), "lr": 1e-2}])

    def target(x):
        return torch.sin(3 * x[:, 0]) * torch.cos(2 * x[:, 1]) + x[:, 2] ** 2

    x_eval = torch.rand(4096, 3) * 2 - 1
    with torch.no_grad():
        initial = (head(enc(x_eval))[:, 0] - target(x_eval)).square().mean().item()
    for _ in range(200):
        x = torch.rand(2048, 3) * 2 - 1
        loss = (head(enc(x))[:, 0] - target(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (head(enc(x_eval))[:, 0] - target(x_eval)).square().mean().item()
    assert final < initial / 20, (initial, final)
    assert math.isfinite(final)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="max_resolution"):
        HashGridEncoding(base_resolution=32, max_resolution=16)
    with pytest.raises(ValueError, match="num_levels"):
        HashGridEncoding(num_levels=0)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        HashGridEncoding(num_levels=2, log2_table_size=8, max_resolution=32)(torch.zeros(4, 2))

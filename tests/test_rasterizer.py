"""renderers/rasterizer.py: the backend is resolved once, when the context is made; wrong names and
nvdiffrast where it cannot run are refused there; the nvdiffrast path forwards to nvdiffrast's calls
(checked here with a stand-in module, since nvdiffrast needs CUDA)."""
import pytest
import torch

from renderers import raster, rasterizer
from renderers.rasterizer import Rasterizer, resolve_backend


def _square() -> tuple[torch.Tensor, torch.Tensor]:
    """Two triangles covering the middle of the screen: pos_clip [1, 4, 4], tri [2, 3]."""
    xy = torch.tensor([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    pos = torch.cat([xy, torch.zeros(4, 1), torch.ones(4, 1)], 1)[None]
    return pos, torch.tensor([[0, 1, 2], [0, 2, 3]])


class FakeNvdiffrast:
    """Records what the nvdiffrast path hands to nvdiffrast.torch and answers with fixed tensors."""

    def __init__(self):
        self.calls, self.contexts = [], []

    def RasterizeCudaContext(self, device):  # nvdiffrast's name
        self.contexts.append(device)
        return ("context", device)

    def rasterize(self, context, pos, tri, resolution):
        self.calls.append(("rasterize", context, pos.dtype, tri.dtype, resolution))
        return torch.ones(pos.shape[0], *resolution, 4), None

    def interpolate(self, attr, rast, tri):
        self.calls.append(("interpolate", attr.shape, tri.dtype))
        return torch.zeros(*rast.shape[:3], attr.shape[-1]), None

    def texture(self, tex, uv, filter_mode, boundary_mode):
        self.calls.append(("texture", filter_mode, boundary_mode))
        return torch.zeros(*uv.shape[:3], tex.shape[-1])

    def antialias(self, color, rast, pos, tri):
        self.calls.append(("antialias", color.dtype, pos.dtype, tri.dtype))
        return color


@pytest.fixture
def fake_nvdiffrast(monkeypatch):
    fake = FakeNvdiffrast()
    monkeypatch.setattr(rasterizer, "_nvdr_module", fake)
    return fake


def test_auto_is_resolved_once_when_the_context_is_made(monkeypatch):
    calls = []

    def counting(name, device):
        calls.append((name, str(device)))
        return resolve_backend(name, device)

    monkeypatch.setattr(rasterizer, "resolve_backend", counting)
    context = Rasterizer.make("auto", "cpu")
    assert context.backend == "torch" and context.device == torch.device("cpu") and context.context is None
    pos, tri = _square()
    rast = context.rasterize(pos, tri, (8, 8))
    colour = context.interpolate(torch.rand(4, 3), rast, tri)
    context.antialias(colour, rast, pos, tri)
    context.texture(torch.rand(1, 2, 2, 3), torch.rand(1, 8, 8, 2))
    assert calls == [("auto", "cpu")]  # at make, not per call


def test_the_torch_context_gives_the_pytorch_rasterizers_outputs():
    pos, tri = _square()
    attr = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    context = Rasterizer.make("torch")
    rast = context.rasterize(pos, tri, (12, 10), chunk_size=1)
    assert torch.equal(rast, raster.rasterize(pos, tri, (12, 10)))
    assert torch.equal(context.interpolate(attr, rast, tri), raster.interpolate(attr, rast, tri))
    colour = raster.interpolate(attr, rast, tri)
    assert torch.equal(context.antialias(colour, rast, pos, tri), raster.antialias(colour, rast, pos, tri))
    tex, uv = torch.rand(1, 3, 3, 2), torch.rand(1, 4, 4, 2)
    assert torch.equal(context.texture(tex, uv, "nearest", "clamp"), raster.texture(tex, uv, "nearest", "clamp"))


def test_a_wrong_name_and_nvdiffrast_off_cuda_are_refused_with_a_clear_error(monkeypatch, fake_nvdiffrast):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'nvdiffrast'\), got 'opengl'"):
        Rasterizer.make("opengl", "cpu")
    with pytest.raises(ValueError, match="backend='nvdiffrast' needs a CUDA device, got cpu"):
        Rasterizer.make("nvdiffrast", "cpu")  # importable (the stand-in), but not on the CPU
    assert fake_nvdiffrast.contexts == []
    monkeypatch.setattr(rasterizer, "_nvdr_module", False)  # the import failed
    with pytest.raises(RuntimeError, match="nvdiffrast is not importable"):
        Rasterizer.make("nvdiffrast", "cuda:0")
    assert Rasterizer.make("auto", "cuda:0").backend == "torch"  # auto falls back where nvdiffrast is missing


def test_the_nvdiffrast_context_is_made_once_and_every_call_goes_through_it(fake_nvdiffrast):
    context = Rasterizer.make("auto", "cuda:0")
    assert context.backend == "nvdiffrast" and fake_nvdiffrast.contexts == [torch.device("cuda:0")]
    pos, tri = _square()
    rast = context.rasterize(pos.double(), tri, (8, 6))
    context.interpolate(torch.rand(4, 2), rast, tri)
    context.texture(torch.rand(1, 2, 2, 3), torch.rand(1, 8, 6, 2), boundary="clamp")
    context.antialias(torch.rand(1, 8, 6, 3, dtype=torch.float64), rast, pos, tri)
    assert fake_nvdiffrast.calls == [
        ("rasterize", ("context", torch.device("cuda:0")), torch.float32, torch.int32, (8, 6)),
        ("interpolate", (1, 4, 2), torch.int32),  # [V, C] attributes batched as nvdiffrast needs
        ("texture", "linear", "clamp"),
        ("antialias", torch.float32, torch.float32, torch.int32),
    ]
    assert fake_nvdiffrast.contexts == [torch.device("cuda:0")]  # no second context
    with pytest.raises(ValueError, match="pos_clip"):  # inputs are checked before nvdiffrast sees them
        context.rasterize(pos[0], tri, (8, 6))
    assert len(fake_nvdiffrast.calls) == 4

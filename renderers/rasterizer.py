"""The rasterizer a run renders meshes with, chosen once: an explicit context instead of a backend name
passed along with every call.

`Rasterizer.make(name, device)` resolves `name` for `device` ("auto": nvdiffrast on a CUDA device when
`nvdiffrast.torch` is importable, else "torch") and, for nvdiffrast, creates its rasterizer context, which
the object then holds. Its four methods take and return what `renderers.raster`'s functions do, with the
same conventions: "torch" runs those functions (the PyTorch reference), "nvdiffrast" thin wrappers over
`nvdiffrast.torch` on the context's device.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from renderers import raster

__all__ = ["BACKENDS", "Rasterizer", "available_backends", "resolve_backend"]
BACKENDS = ("auto", "torch", "nvdiffrast")  # the names a config may give; "auto" resolves to one of the others
_nvdr_module = None  # nvdiffrast.torch once imported; False when the import failed


def _nvdr():
    """nvdiffrast.torch, or None when it cannot be imported."""
    global _nvdr_module
    if _nvdr_module is None:
        try:
            import nvdiffrast.torch as dr

            _nvdr_module = dr
        except Exception:  # ImportError, or a broken install
            _nvdr_module = False
    return _nvdr_module or None


def available_backends() -> list[str]:
    """Backends usable on this machine: always "torch", plus "nvdiffrast" with CUDA."""
    found = ["torch"]
    if _nvdr() is not None and torch.cuda.is_available():
        found.append("nvdiffrast")
    return found


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` stands for on `device`: "torch" or "nvdiffrast". Raises ValueError for an
    unknown name or nvdiffrast off CUDA, RuntimeError for nvdiffrast where it cannot be imported."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "nvdiffrast" if cuda and _nvdr() is not None else "torch"
    if name == "nvdiffrast":
        if _nvdr() is None:
            raise RuntimeError("backend='nvdiffrast' requested but nvdiffrast is not importable")
        if not cuda:
            raise ValueError(f"backend='nvdiffrast' needs a CUDA device, got {torch.device(device)}")
    return name


@dataclasses.dataclass(frozen=True)
class Rasterizer:
    """A resolved rasterizer backend for one device; make one per run or stage with `Rasterizer.make`."""

    backend: str  # "torch" or "nvdiffrast", never "auto"
    device: torch.device  # where its tensors live
    context: object = dataclasses.field(default=None, repr=False, compare=False)  # nvdiffrast's; None for torch

    @classmethod
    def make(cls, name: str = "auto", device: torch.device | str = "cpu") -> Rasterizer:
        """Resolve `name` on `device` (see `resolve_backend`) and, for nvdiffrast, create its context. The
        CUDA context is preferred (no OpenGL needed); the GL one is used only where the CUDA one is missing.
        nvdiffrast before 0.3.2 needed H and W to be multiples of 8 (and at most 2048) with its CUDA context;
        its GL context never had that limit."""
        device = torch.device(device)
        backend = resolve_backend(name, device)
        if backend == "torch":
            return cls("torch", device)
        if device.index is None:
            device = torch.device(device.type, torch.cuda.current_device())
        dr = _nvdr()
        make_context = getattr(dr, "RasterizeCudaContext", None) or dr.RasterizeGLContext
        return cls("nvdiffrast", device, make_context(device=device))

    def rasterize(
        self,
        pos_clip: Tensor,  # [B, V, 4] clip-space vertex positions
        tri: Tensor,  # [F, 3] integer vertex indices
        resolution: tuple[int, int],  # (H, W) in pixels
        chunk_size: int = 0,  # triangles per visibility pass (torch backend), 0 = all at once
    ) -> Tensor:  # [B, H, W, 4] = (u, v, z/w, triangle_id + 1), zeros on background
        """`raster.rasterize`; nvdiffrast's second output (`rast_db`) is dropped as there."""
        if self.backend == "torch":
            return raster.rasterize(pos_clip, tri, resolution, chunk_size)
        size = raster.check_rasterize(pos_clip, tri, resolution, chunk_size)
        rast, _ = _nvdr().rasterize(self.context, pos_clip.float().contiguous(), tri.int().contiguous(), size)
        return rast

    def interpolate(
        self,
        attr: Tensor,  # [B, V, C] or [V, C] vertex attributes (batch 1 broadcasts)
        rast: Tensor,  # [B, H, W, 4] output of rasterize
        tri: Tensor,  # [F, 3] integer vertex indices
    ) -> Tensor:  # [B, H, W, C], zeros on background
        """`raster.interpolate`."""
        if self.backend == "torch":
            return raster.interpolate(attr, rast, tri)
        attr = raster.check_interpolate(attr, rast)
        out, _ = _nvdr().interpolate(attr.float().contiguous(), rast.contiguous(), tri.int().contiguous())
        return out

    def texture(
        self,
        tex: Tensor,  # [B, Ht, Wt, C] texture (batch 1 broadcasts)
        uv: Tensor,  # [B, H, W, 2] texture coordinates
        filter: str = "linear",  # "linear" (bilinear) or "nearest"
        boundary: str = "wrap",  # "wrap", "clamp" (to boundary texel centres) or "zero"
    ) -> Tensor:  # [B, H, W, C]
        """`raster.texture`."""
        if self.backend == "torch":
            return raster.texture(tex, uv, filter, boundary)
        raster.check_texture(tex, uv, filter, boundary)
        return _nvdr().texture(
            tex.float().contiguous(), uv.float().contiguous(), filter_mode=filter, boundary_mode=boundary
        )

    def antialias(
        self,
        color: Tensor,  # [B, H, W, C] shaded image
        rast: Tensor,  # [B, H, W, 4] output of rasterize for pos_clip, tri
        pos_clip: Tensor,  # [B, V, 4] the clip-space positions that produced rast
        tri: Tensor,  # [F, 3] integer vertex indices
    ) -> Tensor:  # [B, H, W, C]
        """`raster.antialias` (nvdiffrast's own analytic antialiasing on that backend)."""
        if self.backend == "torch":
            return raster.antialias(color, rast, pos_clip, tri)
        raster.check_antialias(color, rast, pos_clip, tri)
        return _nvdr().antialias(
            color.float().contiguous(), rast.contiguous(), pos_clip.float().contiguous(), tri.int().contiguous()
        )

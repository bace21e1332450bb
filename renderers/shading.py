"""Shading shared by the volume and the mesh renderers: the shading names and the Lambertian factor."""
from __future__ import annotations

from torch import Tensor

__all__ = ["SHADINGS", "lambert"]

SHADINGS = ("albedo", "lambertian", "textureless")


def lambert(
    normals: Tensor,  # [..., 3] unit
    to_light: Tensor,  # [..., 3] unit, broadcast against normals
    ambient: float,  # share of the light that reaches every point
    two_sided: bool = False,  # light faces turned away as if they faced the light
) -> Tensor:  # [..., 1]
    """Lambertian shading factor ambient + (1 - ambient) * cos(normal, light) of every render."""
    cos = (normals * to_light).sum(-1, keepdim=True)
    return ambient + (1.0 - ambient) * (cos.abs() if two_sided else cos.clamp_min(0.0))

"""The SDS stages' preview images: orbit views of the current result, colour above shape, as one mosaic."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from renderers.cameras import Cameras, get_rays, orbit_cameras
from renderers.mesh import render_mesh
from renderers.rasterizer import Rasterizer
from renderers.volume import OccupancyGrid, VolumeConfig, render_volume
from stages.common import to_uint8

PREVIEW_CHUNK = 16384  # rays per pass of a NeRF preview render


def image_grid(images: Tensor, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] -> one [rows*H, columns*W, 3] uint8 mosaic."""
    n, h, w, c = images.shape
    columns = columns or n
    rows = (n + columns - 1) // columns
    canvas = torch.ones(rows * h, columns * w, c, dtype=images.dtype, device=images.device)
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return to_uint8(canvas)


def colour_and_shape(
    rgb: Tensor,  # [V, H, W, 3] in [0, 1]
    normal: Tensor,  # [V, H, W, 3] world normals, any length (0 off the object)
    alpha: Tensor,  # [V, H, W, 1] coverage in [0, 1]
) -> np.ndarray:  # [2H, V*W, 3] uint8
    """Orbit views as a person judges them: colour in the top row, shape below it (normals as colours,
    (n + 1) / 2, over white, as the reference implementations' validation images show them)."""
    n = torch.nn.functional.normalize(normal.to(rgb.dtype), dim=-1)
    shape = (n + 1) / 2 * alpha + (1 - alpha)
    return image_grid(torch.cat([rgb, shape]), columns=rgb.shape[0])


def orbit_preview(
    render: Callable[[Cameras], tuple[Tensor, Tensor, Tensor]],  # cameras -> (rgb, normal, alpha) [V, H, W, 3|3|1]
    views: int, resolution: int, device,
) -> np.ndarray:
    """`views` orbit renders without gradients, colour above normals: [2 * resolution, views * resolution, 3] uint8."""
    cams = orbit_cameras(views, (resolution, resolution), device=device)
    with torch.no_grad():
        rgb, normal, alpha = render(cams)
    return colour_and_shape(rgb, normal, alpha)


def nerf_preview(
    field, volume: VolumeConfig, views: int, resolution: int, background: Tensor,  # background [1, 3]
    occupancy: OccupancyGrid | None = None,
) -> np.ndarray:
    """A NeRF's orbit mosaic, albedo shaded. Forward only (the field's own normals need a gradient per
    sample, twice the cost or more): the normals are those of the rendered depth map's surface. With
    the training's occupancy grid, empty space is skipped."""
    config = dataclasses.replace(volume, chunk_size=min(volume.chunk_size or PREVIEW_CHUNK, PREVIEW_CHUNK))

    def render(cams):
        out = render_volume(field, cams, config, shading="albedo", background=background.expand(views, 3),
                            occupancy=occupancy)
        return out["rgb"], _depth_normals(cams, out["depth"]), out["alpha"]

    return orbit_preview(render, views, resolution, next(field.parameters()).device)


def mesh_preview(
    verts: Tensor, faces: Tensor,  # [V, 3], [F, 3]
    color_field, views: int, resolution: int, ambient: float, rasterizer: Rasterizer, device,
) -> np.ndarray:
    """A textured mesh's orbit mosaic, Lambertian shaded (`ambient` share of ambient light)."""

    def render(cams):
        out = render_mesh(verts, faces, color_field, cams, "lambertian", ambient, rasterizer=rasterizer)
        return out["rgb"], out["normal"], out["alpha"]

    return orbit_preview(render, views, resolution, device)


def _depth_normals(cams, depth: Tensor) -> Tensor:  # depth [V, H, W, 1] -> world normals [V, H, W, 3]
    """Normals of the surface a depth map sees (central differences of its points), facing the camera."""
    origins, dirs = get_rays(cams)  # [V, H, W, 3] each
    points = origins + dirs * depth
    d_row, d_col = torch.gradient(points, dim=(1, 2))
    normal = torch.nn.functional.normalize(torch.cross(d_col, d_row, dim=-1), dim=-1)
    return torch.where((normal * dirs).sum(-1, keepdim=True) > 0, -normal, normal)

"""Measuring a result against a known primitive (the quality benchmarks, the tests' outcome checks):
silhouette IoU over held-out views and colour error."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from guidance.primitive_shapes import COLORS, primitive_mesh
from guidance.primitives import CAMERA_DISTANCE, CAMERA_FOVY
from renderers import raster
from renderers.cameras import Cameras, cameras_from_angles, to_clip
from renderers.volume import VolumeConfig, render_volume


def held_out_cameras(resolution: int = 64, device=None) -> Cameras:
    """8 fixed views between the training draws: azimuths 22.5 + 45k, elevations alternating 10 / 35 degrees."""
    azimuth = [22.5 + 45.0 * k for k in range(8)]
    elevation = [10.0 if k % 2 == 0 else 35.0 for k in range(8)]
    return cameras_from_angles(elevation, azimuth, CAMERA_DISTANCE, CAMERA_FOVY, (resolution, resolution), device=device)


def mesh_silhouettes(vertices: Tensor, faces: Tensor, cameras: Cameras) -> Tensor:
    """Coverage masks [B, H, W] (bool) of a mesh seen by `cameras`."""
    pos = to_clip(vertices.float(), cameras.mvp)
    rast = raster.rasterize(pos, faces.long(), (cameras.height, cameras.width))
    return rast[..., 3] > 0


def primitive_silhouettes(shape: str, cameras: Cameras) -> Tensor:
    mesh = primitive_mesh(shape)
    device = cameras.mvp.device
    verts = torch.tensor(np.array(mesh.vertices), dtype=torch.float32, device=device)
    faces = torch.tensor(np.array(mesh.faces), dtype=torch.int64, device=device)
    return mesh_silhouettes(verts, faces, cameras)


def field_silhouettes(field, cameras: Cameras, volume: VolumeConfig | None = None, threshold: float = 0.5) -> tuple[Tensor, Tensor]:
    """Opacity masks [B, H, W] (bool, alpha > threshold) and albedo renders [B, H, W, 3] of a NeRF field."""
    volume = volume or VolumeConfig(use_occupancy=False)
    with torch.no_grad():
        out = render_volume(field, cameras, volume, shading="albedo", background=None)
    alpha = out["alpha"][..., 0]
    albedo = out["rgb"] / alpha[..., None].clamp_min(1e-6)
    return alpha > threshold, albedo


def iou(a: Tensor, b: Tensor) -> float:
    union = (a | b).sum().item()
    return float((a & b).sum().item() / union) if union else 1.0


def color_error(rgb: Tensor, color: str) -> float:
    """Euclidean RGB distance (0..sqrt(3)) between a mean colour [3] and a named colour of the vocabulary."""
    target = torch.tensor(COLORS[color], dtype=rgb.dtype, device=rgb.device)
    return float((rgb - target).norm())


def evaluate_field(field, shape: str, color: str, resolution: int = 64) -> dict:
    """Silhouette IoU against the primitive over 8 held-out views, and the mean albedo on the object."""
    device = next(field.parameters()).device
    cams = held_out_cameras(resolution, device)
    masks, albedo = field_silhouettes(field, cams)
    truth = primitive_silhouettes(shape, cams)
    per_view = [iou(masks[i], truth[i]) for i in range(len(cams))]
    inside = masks & truth
    mean_albedo = albedo[inside].mean(0) if inside.any() else torch.zeros(3, device=device)
    return {
        "silhouette_iou": float(np.mean(per_view)),
        "silhouette_iou_min": float(np.min(per_view)),
        "mean_albedo": [round(float(v), 4) for v in mean_albedo],
        "color_error": color_error(mean_albedo, color),
    }

"""Mesh rendering on the rasterizer: rasterize a triangle mesh, shade it (albedo, Lambertian or
textureless) over a background with antialiased silhouettes, and the vertex normals that
shading needs. The refine stage trains through these; its previews use `render_mesh`; a mesh
with a baked texture (the export's turntable, the quality benchmark) renders with `render_textured`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from renderers.cameras import Cameras, to_clip
from renderers.rasterizer import Rasterizer
from renderers.shading import SHADINGS, lambert

__all__ = ["face_normals", "rasterize_mesh", "render_mesh", "render_textured", "shade_mesh", "vertex_normals"]
LIGHTS = ("point", "view")  # render_textured: a point light at each camera's light position, or light along its view


def face_normals(
    verts: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] long
    normalize: bool = True,
) -> Tensor:  # [F, 3] unit normals, or area-weighted (length = twice the area) when normalize=False
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = torch.linalg.cross(v1 - v0, v2 - v0, dim=-1)
    return F.normalize(n, dim=-1, eps=1e-20) if normalize else n


def vertex_normals(
    verts: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] long
) -> Tensor:  # [V, 3] unit normals (zero for a vertex no face uses)
    """Area-weighted average of the normals of the faces around each vertex."""
    n = face_normals(verts, faces, normalize=False)  # [F, 3], length = 2 * area
    acc = torch.zeros_like(verts).index_add(0, faces.reshape(-1), n.repeat_interleave(3, dim=0))
    return F.normalize(acc, dim=-1, eps=1e-20)


def rasterize_mesh(
    verts: Tensor,  # [V, 3] world positions
    faces: Tensor,  # [F, 3] long
    cameras: Cameras,
    rasterizer: Rasterizer,
    chunk_size: int = 0,
) -> dict:
    """pos_clip [B, V, 4], rast [B, H, W, 4], points [B, H, W, 3] and unit normals [B, H, W, 3] per pixel."""
    pos_clip = to_clip(verts, cameras.mvp)  # [B, V, 4]
    rast = rasterizer.rasterize(pos_clip, faces, (cameras.height, cameras.width), chunk_size)
    attrs = torch.cat([verts, vertex_normals(verts, faces)], dim=-1)  # [V, 6]
    interp = rasterizer.interpolate(attrs, rast, faces)  # [B, H, W, 6]
    normals = F.normalize(interp[..., 3:], dim=-1, eps=1e-12)
    return {"pos_clip": pos_clip, "rast": rast, "faces": faces, "points": interp[..., :3], "normals": normals}


def shade_mesh(
    raster_out: dict,  # output of rasterize_mesh
    color_field,  # albedo(points [N, 3]) -> [N, 3]
    cameras: Cameras,
    shading: str,  # "albedo", "lambertian" or "textureless"
    ambient: float,
    background: Tensor,  # [B, 3]
    rasterizer: Rasterizer,
) -> dict:
    """rgb [B, H, W, 3] composited over the background with antialiased silhouettes, alpha [B, H, W, 1].

    The colour field is queried only at covered pixels, and at detached points: the texture
    learns its colours, the geometry learns from silhouettes and shading.
    """
    if shading not in SHADINGS:
        raise ValueError(f"shading must be one of {SHADINGS}, got {shading!r}")
    rast, points, normals = raster_out["rast"], raster_out["points"], raster_out["normals"]
    covered = rast[..., 3] > 0  # [B, H, W]
    pts = points[covered]  # [P, 3]
    if shading == "textureless":
        albedo = torch.ones_like(pts)
    else:
        albedo = color_field.albedo(pts.detach()).to(pts.dtype)  # [P, 3]
    if shading == "albedo":
        color = albedo
    else:
        batch = covered.nonzero()[:, 0]
        to_light = F.normalize(cameras.light_position.to(pts.dtype)[batch] - pts, dim=-1)
        color = albedo * lambert(normals[covered], to_light, ambient)
    bg = background.to(pts.dtype)[:, None, None, :].expand_as(points)
    rgb = bg.index_put((covered,), color)  # [B, H, W, 3]
    rgb = rasterizer.antialias(rgb, rast, raster_out["pos_clip"], raster_out["faces"])
    return {"rgb": rgb, "alpha": covered[..., None].to(rgb.dtype)}


def render_mesh(
    verts: Tensor,  # [V, 3]
    faces: Tensor,  # [F, 3] long
    color_field,  # albedo(points [N, 3]) -> [N, 3]
    cameras: Cameras,
    shading: str = "lambertian",
    ambient: float = 0.3,
    background: Tensor | None = None,  # [B, 3]; None = white
    *,
    rasterizer: Rasterizer,
) -> dict:
    """rgb [B, H, W, 3], alpha [B, H, W, 1] and normal [B, H, W, 3] of a mesh (previews, turntables)."""
    if background is None:
        background = torch.ones(len(cameras), 3, device=verts.device, dtype=verts.dtype)
    out = rasterize_mesh(verts, faces, cameras, rasterizer)
    shaded = shade_mesh(out, color_field, cameras, shading, ambient, background, rasterizer)
    return {**shaded, "normal": out["normals"] * shaded["alpha"]}


def render_textured(
    verts: Tensor,  # [V, 3] world positions
    faces: Tensor,  # [F, 3] long
    uv: Tensor,  # [V, 2] texture coordinates
    normals: Tensor,  # [V, 3] vertex normals
    tex: Tensor,  # [T, T, 3] texture, row 0 = v 0
    cameras: Cameras,
    ambient: float,  # ambient share of the Lambertian shading
    light: str = "point",  # LIGHTS: "point" (one-sided, at cameras.light_position) or "view" (two-sided headlight)
    background: float = 1.0,  # grey level behind the mesh
    antialiased: bool = True,  # antialias the silhouettes
    chunk_size: int = 0,  # triangles per visibility pass (torch backend), 0 = all at once
    *,
    rasterizer: Rasterizer,
) -> Tensor:  # [B, H, W, 3]
    """The textured mesh shaded over a grey level: the export's turntable, the quality benchmark's renders."""
    if light not in LIGHTS:
        raise ValueError(f"light must be one of {LIGHTS}, got {light!r}")
    pos_clip = to_clip(verts, cameras.mvp)  # [B, V, 4]
    rast = rasterizer.rasterize(pos_clip, faces, (cameras.height, cameras.width), chunk_size)
    colour = rasterizer.texture(tex[None], rasterizer.interpolate(uv, rast, faces), boundary="clamp")  # [B, H, W, 3]
    n = F.normalize(rasterizer.interpolate(normals, rast, faces), dim=-1)
    if light == "view":
        shade = lambert(n, cameras.c2w[:, None, None, :3, 2], ambient, two_sided=True)  # towards the camera
    else:
        points = rasterizer.interpolate(verts, rast, faces)
        shade = lambert(n, F.normalize(cameras.light_position[:, None, None, :] - points, dim=-1), ambient)
    alpha = (rast[..., 3:] > 0).to(colour.dtype)
    image = colour * shade * alpha + (1 - alpha) * background
    return rasterizer.antialias(image, rast, pos_clip, faces) if antialiased else image

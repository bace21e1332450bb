"""Export: clean a mesh, unwrap it (projected charts packed by xatlas), bake its colour field into a texture, and
write OBJ + MTL + PNG, GLB, a zip of the OBJ set and a turntable video.

The input is generic (vertices, faces and a colour function), so the refined DMTet mesh and
a mesh extracted from the coarse NeRF export the same way.

Frames: the input lives in the +z-up training frame; every exported file is Y-up (glTF),
converted by the rotation `to_y_up` (inverse `from_y_up`). The training front (+x, azimuth 0)
stays on +x.

Texture layout: the baked texture is stored in memory as nvdiffrast sees it (row 0 is v = 0);
OBJ puts v = 0 on the bottom row of the image, so the PNG is that array flipped vertically;
the GLB writer flips v again (glTF puts v = 0 on the top row).

The file encoders live in `stages.export_files`, the UV atlas in `geometry.uv`.
"""
from __future__ import annotations

import io
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from geometry.mesh_ops import clean_mesh, decimate, file_normals, is_watertight
from geometry.short_edges import collapse_short_edges
from geometry.solid import drop_enclosed_shells
from geometry.uv import RASTER_CHUNK, unwrap, uv_coverage
from renderers.cameras import orbit_cameras
from renderers.mesh import render_textured
from renderers.rasterizer import Rasterizer
from stages.common import Callback, StepEvent, StopCheck, check_stop
from stages.export_files import MTL_NAME, OBJ_NAME, TEXTURE_NAME, glb_bytes, mtl_text, obj_text, zip_bytes
from stages.export_files import write_video as _write_video
from stages.live_models import clear as clear_live_models

TURNTABLE_AMBIENT = 0.35  # share of the turntable's light that reaches faces turned away from the camera
FILE_NAMES = {  # ExportResult.paths keys -> fixed file names
    "obj": OBJ_NAME, "mtl": MTL_NAME, "texture": TEXTURE_NAME,
    "glb": "model.glb", "zip": "model.zip", "turntable": "turntable.mp4",
}


@dataclass
class ExportConfig:
    texture_size: int = 1024  # baked texture width = height, texels
    target_faces: int = 60_000  # decimate (quadric) meshes with more faces than this; 0 = never
    min_component_ratio: float = 0.01  # drop pieces whose face count and area are both below this fraction of the largest piece's
    merge_distance: float = 1e-6  # vertices closer than this merge, world units
    dilation_iterations: int = 16  # texel rings around the charts that copy the nearest chart texel (hides seams); the rest gets the mean colour
    bake_chunk_size: int = 65536  # surface points per albedo_fn call
    uv_faces_per_chart: int = 250  # when xatlas charts the mesh (projected charts overlap): caps a chart's area at about this many faces' worth; smaller = faster, more seams; 0 = no cap
    uv_padding: int = 1  # empty texels between charts (the bake dilates charts into them)
    uv_max_iterations: int = 0  # when xatlas charts the mesh: chart-optimisation iterations; 1 made a noisy 60k-face unwrap ~4x slower
    turntable: bool = True  # render turntable.mp4
    turntable_frames: int = 60  # frames of the 360-degree orbit
    turntable_fps: int = 24  # frames per second
    turntable_resolution: int = 256  # frame width = height, px, a multiple of 16
    turntable_elevation: float = 15.0  # camera elevation above the xy plane, degrees

    def check(self) -> None:
        for name in ("texture_size", "bake_chunk_size", "turntable_frames", "turntable_fps", "turntable_resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("target_faces", "dilation_iterations", "uv_faces_per_chart", "uv_padding", "uv_max_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.texture_size < 8:
            raise ValueError(f"texture_size must be >= 8, got {self.texture_size}")
        if 0 < self.target_faces < 4:
            raise ValueError(f"target_faces must be 0 (off) or >= 4, got {self.target_faces}")
        if not 0.0 <= self.min_component_ratio < 1.0:
            raise ValueError(f"min_component_ratio must be in [0, 1), got {self.min_component_ratio}")
        if not self.merge_distance > 0:
            raise ValueError(f"merge_distance must be > 0, got {self.merge_distance}")
        if self.turntable_resolution % 16:
            raise ValueError(f"turntable_resolution must be a multiple of 16, got {self.turntable_resolution}")
        if not -90.0 < self.turntable_elevation < 90.0:
            raise ValueError(f"turntable_elevation must be in (-90, 90) degrees, got {self.turntable_elevation}")


@dataclass
class ExportResult:
    paths: dict[str, str | None]  # FILE_NAMES keys -> written path; "turntable" is None when off
    timings: dict[str, float] = field(default_factory=dict)  # clean, unwrap, bake, write, turntable -> seconds
    num_faces: int = 0  # faces of the exported mesh
    num_vertices: int = 0  # vertices of the exported mesh, welded (the OBJ's `v` lines)
    num_uv_vertices: int = 0  # vertices split along UV seams (the OBJ's `vt` lines, the GLB's vertices)
    watertight: bool = False  # every edge of the welded mesh has two faces, wound consistently (GLB single-sided)
    texture_fill: float = 0.0  # fraction of texel centres a triangle covers
    dropped_shells: int = 0  # closed shells dropped because they lay inside another one (hidden walls, cavities)
    dropped_faces: int = 0  # faces of those shells
    short_edges: int = 0  # edges shorter than geometry.short_edges.MIN_EDGE left, each unsafe to collapse


# --------------------------------------------------------------------------- frames
def to_y_up(points: np.ndarray) -> np.ndarray:
    """+z-up training frame -> Y-up export frame: (x, y, z) -> (x, z, -y), a rotation."""
    return np.stack([points[..., 0], points[..., 2], -points[..., 1]], axis=-1)


def from_y_up(points: np.ndarray) -> np.ndarray:
    """Inverse of `to_y_up`: (x, y, z) -> (x, -z, y)."""
    return np.stack([points[..., 0], -points[..., 2], points[..., 1]], axis=-1)


# --------------------------------------------------------------------------- bake
def dilate_texture(
    image: Tensor,  # [H, W, C]
    covered: Tensor,  # [H, W] bool
    iterations: int,
) -> Tensor:  # [H, W, C]
    """Give every uncovered texel within `iterations` texels (chessboard distance, i.e. that
    many rings of 8-neighbour growth) the colour of its nearest covered texel, so bilinear
    lookups and mipmaps at chart borders see the chart's own colours; texels farther away
    get the mean covered colour. One distance transform, not `iterations` passes."""
    from scipy.ndimage import distance_transform_cdt

    mask = covered.cpu().numpy()
    if not mask.any():
        return torch.full_like(image, 0.5)
    distance, (rows, cols) = distance_transform_cdt(~mask, metric="chessboard", return_indices=True)
    rows, cols = torch.as_tensor(rows, device=image.device), torch.as_tensor(cols, device=image.device)
    near = torch.as_tensor((distance <= iterations) & ~mask, device=image.device)
    out = torch.where(covered[..., None], image, image[covered].mean(0))
    out[near] = image[rows[near], cols[near]]
    return out


def bake_texture(
    positions: Tensor,  # [V', 3] training-frame position of each unwrapped vertex
    uv: Tensor,  # [V', 2] in [0, 1]
    faces: Tensor,  # [F, 3] into V'
    albedo_fn: Callable[[Tensor], Tensor],
    config: ExportConfig,
    rasterizer: Rasterizer,
) -> tuple[Tensor, Tensor]:  # texture [T, T, 3] (row 0 = v 0), covered [T, T] bool
    """Rasterize the mesh in UV space, query albedo_fn at covered texel centres, dilate seams."""
    size = config.texture_size
    rast, covered = uv_coverage(uv, faces, size, rasterizer)  # [1, T, T, 4], [T, T]
    points = rasterizer.interpolate(positions[None], rast, faces)[0]  # [T, T, 3]
    query = points[covered]  # [N, 3]
    colours = []
    for start in range(0, len(query), config.bake_chunk_size):
        colours.append(albedo_fn(query[start : start + config.bake_chunk_size]).to(positions.dtype))
    image = torch.zeros(size, size, 3, dtype=positions.dtype, device=positions.device)
    if colours:
        image[covered] = torch.cat(colours).clamp(0, 1)
    return dilate_texture(image, covered, config.dilation_iterations), covered


# --------------------------------------------------------------------------- turntable
def render_turntable(
    vertices: Tensor,  # [V, 3] training frame
    faces: Tensor,  # [F, 3]
    uv: Tensor,  # [V, 2]
    normals: Tensor,  # [V, 3]
    tex: Tensor,  # [T, T, 3] row 0 = v 0
    config: ExportConfig,
    rasterizer: Rasterizer,
    batch: int = 8,
) -> np.ndarray:  # [N, R, R, 3] uint8
    """A 360-degree orbit around the mesh's bounding-box centre, framed to its bounding sphere,
    headlight-shaded texture over a white background."""
    res, fovy = config.turntable_resolution, 40.0
    centre = (vertices.amin(0) + vertices.amax(0)) / 2
    radius = float((vertices - centre).norm(dim=1).max().clamp(min=1e-6))
    cams = orbit_cameras(
        config.turntable_frames, (res, res), elevation=config.turntable_elevation,
        distance=1.1 * radius / math.sin(math.radians(fovy / 2)), fovy=fovy,
        device=vertices.device, dtype=vertices.dtype,
    )
    frames = []
    for start in range(0, len(cams), batch):
        image = render_textured(vertices - centre, faces, uv, normals, tex, cams[start : start + batch],
                                TURNTABLE_AMBIENT, light="view", chunk_size=RASTER_CHUNK,
                                rasterizer=rasterizer)  # [b, R, R, 3]
        frames.append((image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy())
    return np.concatenate(frames)


# --------------------------------------------------------------------------- export
def export(
    vertices: Tensor,  # [V, 3] float, +z-up training frame
    faces: Tensor,  # [F, 3] long
    albedo_fn: Callable[[Tensor], Tensor],  # points [N, 3] -> colours [N, 3] in [0, 1]
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    progress: Callback | None = None,  # gets a StepEvent(stage="export") after each of the 5 steps
    should_stop: StopCheck | None = None,  # polled between steps; True raises Cancelled
) -> ExportResult:
    """Clean (dropping shells enclosed by another), unwrap, bake, then write every file of FILE_NAMES into out_dir.

    Files are written under temporary names first and renamed once all of them exist, so an
    error leaves neither half-written files nor temporary ones. Rasterization and albedo_fn
    run on vertices' device."""
    config = config or ExportConfig()
    config.check()
    if vertices.dim() != 2 or vertices.shape[1] != 3 or not vertices.dtype.is_floating_point:
        raise ValueError(f"vertices must be a float tensor [V, 3], got {vertices.dtype} {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[1] != 3 or faces.dtype.is_floating_point or len(faces) == 0:
        raise ValueError(f"faces must be an integer tensor [F, 3] with F >= 1, got {faces.dtype} {tuple(faces.shape)}")
    if int(faces.min()) < 0 or int(faces.max()) >= len(vertices):
        raise ValueError(f"faces must index vertices in [0, {len(vertices)}), got [{int(faces.min())}, {int(faces.max())}]")
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError("vertices must be finite, got NaN or inf")
    steps = ("clean", "unwrap", "bake", "write", "turntable")

    def report(name: str, message: str) -> None:
        step = steps.index(name) + 1
        if progress is not None:
            progress(StepEvent(stage="export", step=step, total=len(steps), message=message, timings=dict(timings)))
        check_stop(should_stop, "export", step)

    device, dtype = vertices.device, vertices.dtype
    rasterizer = Rasterizer.make("auto", device)  # the bake's and the turntable's, whatever the refine stage used
    timings: dict[str, float] = {}
    os.makedirs(out_dir, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    temps = {key: os.path.join(out_dir, f".tmp-{token}-{name}") for key, name in FILE_NAMES.items()}
    try:
        with torch.no_grad():
            # 1. Clean and decimate.
            t0 = time.perf_counter()
            # Edges an importer would weld are collapsed where that folds nothing, before the weld and after decimating.
            v, f, _ = collapse_short_edges(vertices.detach().cpu().double().numpy(), faces.detach().cpu().long().numpy())
            v, f = clean_mesh(v, f, config.min_component_ratio, config.merge_distance)
            v, f = decimate(v, f, config.target_faces)
            if config.target_faces:  # collapses can pinch off a sliver of a few faces: drop it again
                v, f = clean_mesh(v, f, config.min_component_ratio, config.merge_distance)
            v, f, short_edges = collapse_short_edges(v, f)
            if len(f) == 0:
                raise ValueError("the mesh has no faces left after cleaning")
            v, f, dropped_shells, dropped_faces = drop_enclosed_shells(v, f)  # the last guard for a solid
            normals = file_normals(v, f)
            timings["clean"] = time.perf_counter() - t0
            report("clean", f"cleaned: {len(f)} faces, {len(v)} vertices, {dropped_shells} enclosed shells dropped")
            # 2. UV unwrap: vertices split along chart seams (vmap points back to the welded v).
            t0 = time.perf_counter()
            vmap, uv_faces, uv = unwrap(
                v, f, config.texture_size, config.uv_faces_per_chart, config.uv_padding, config.uv_max_iterations
            )
            v_split, n_split = v[vmap], normals[vmap]
            timings["unwrap"] = time.perf_counter() - t0
            report("unwrap", f"unwrapped: {len(v_split)} vertices after seam splits")
            # 3. Bake the colour field.
            t0 = time.perf_counter()
            pos_t = torch.as_tensor(v_split, dtype=dtype, device=device)
            uv_t = torch.as_tensor(uv, dtype=dtype, device=device)
            tri_t = torch.as_tensor(uv_faces, dtype=torch.long, device=device)
            tex, covered = bake_texture(pos_t, uv_t, tri_t, albedo_fn, config, rasterizer)
            timings["bake"] = time.perf_counter() - t0
            report("bake", f"baked a {config.texture_size}px texture")
            # 4. Encode every file in memory, then write the temporaries.
            t0 = time.perf_counter()
            from PIL import Image

            png_image = Image.fromarray((tex.flip(0).clamp(0, 1) * 255 + 0.5).byte().cpu().numpy())
            png = io.BytesIO()
            png_image.save(png, format="PNG")
            watertight = is_watertight(torch.as_tensor(f))
            data = {
                "obj": obj_text(to_y_up(v), to_y_up(normals), uv, vmap, uv_faces),
                "mtl": mtl_text(),
                "texture": png.getvalue(),
                "glb": glb_bytes(to_y_up(v_split), to_y_up(n_split), uv, uv_faces, png.getvalue(), not watertight),
            }
            data["zip"] = zip_bytes({FILE_NAMES[k]: data[k] for k in ("obj", "mtl", "texture")})
            for key, payload in data.items():
                with open(temps[key], "wb") as handle:
                    handle.write(payload)
            timings["write"] = time.perf_counter() - t0
            report("write", "encoded OBJ, MTL, PNG, GLB and zip")
            # 5. Turntable video.
            t0 = time.perf_counter()
            if config.turntable:
                frames = render_turntable(
                    pos_t, tri_t, uv_t, torch.as_tensor(n_split, dtype=dtype, device=device), tex, config, rasterizer
                )
                _write_video(temps["turntable"], frames, config.turntable_fps)
            timings["turntable"] = time.perf_counter() - t0
            report("turntable", "rendered the turntable" if config.turntable else "turntable off")
        # 6. Publish: rename the temporaries to their final names.
        paths: dict[str, str | None] = {}
        for key, name in FILE_NAMES.items():
            if key == "turntable" and not config.turntable:
                paths[key] = None
                continue
            paths[key] = os.path.join(out_dir, name)
            os.replace(temps[key], paths[key])
        clear_live_models(out_dir)  # the textured GLB replaces the intermediate ones the viewer showed
    except BaseException:
        for path in temps.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    return ExportResult(
        paths=paths, timings=timings, num_faces=len(uv_faces), num_vertices=len(v), num_uv_vertices=len(v_split),
        watertight=watertight, texture_fill=float(covered.float().mean()),
        dropped_shells=dropped_shells, dropped_faces=dropped_faces, short_edges=short_edges,
    )

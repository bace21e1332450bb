"""Stage 2: a textured mesh refined with SDS through a differentiable rasterizer (Magic3D's fine stage).

`run(field, guidance, prompt, config, camera, device)` turns the coarse NeRF into a DMTet
(`geometry.dmtet`: SDF from the density, grid fitted to the object) and copies the field
for colour. Each step extracts the mesh with marching tetrahedra, rasterizes it from random
cameras, shades the covered pixels (albedo, Lambertian or textureless), composites over the
background with analytic antialiasing (the silhouette gradient), and applies the SDS loss
plus two mesh regularisers (and, with `lambda_albedo_tilt`, a penalty on light baked into the
albedo). With `sds.texture_guidance_scale` the colour field learns from SDS at that CFG scale and
the surface at `sds.guidance_scale`, from the same render and model call. The coarse field
itself is never modified.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from geometry.dmtet import dmtet_from_field
from geometry.level_set import LevelSetSettings
from geometry.solid import relax_surface
from geometry.visibility import camera_band
from geometry.mesh_ops import albedo_tilt_loss, laplacian_loss, normal_consistency_loss
from guidance.sds import NonFiniteError, SDSConfig, SDSLoss
from renderers.cameras import CameraConfig, sample_cameras
from renderers.mesh import rasterize_mesh, shade_mesh
from renderers.rasterizer import BACKENDS, Rasterizer
from renderers.volume import sample_shading
from stages.background import Background, check_background
from stages.common import Callback, StageError, StopCheck, check_stage_inputs
from stages.live_models import LiveModels, refine_label
from stages.loop import Step, Timer, adam, run_loop
from stages.previews import mesh_preview

BACKGROUNDS = ("white", "random")  # or a fixed (r, g, b) colour in [0, 1]
UNSEEN_RAYS = ("parallel", "cameras", "off")  # refine.fill_unseen
TIMING_PARTS = ("marching", "rasterize", "shade", "guidance", "regularize", "backward")  # "backward" includes the Adam step


# What the fields left unset (None) take when no guidance model sets them (`RefineConfig.filled`).
UNSET_REFINE = {"lambda_normal_consistency": 1000.0, "lambda_laplacian": 10000.0,
                "prob_albedo": 0.2, "prob_lambertian": 0.8, "prob_textureless": 0.0, "background": "white",
                "ambient": 0.3}


@dataclass
class RefineConfig:
    iters: int = 500  # SDS steps
    batch_size: int = 4  # cameras rendered per step
    resolution: int = 512  # rendered image side, px (64-128 for CPU presets)
    grid_resolution: int = 128  # tet grid cells per axis of the box fitted to the object
    grid_margin: float = 0.1  # world units added around the coarse object's box
    threshold: float | None = None  # density level of the initial surface; None = automatic
    surface_opacity: float | None = None  # automatic level: the opacity a ray needs to be on the object; None = the field's own split
    sdf_smoothing: float = 1.0  # Gaussian sigma of the initial SDF, grid cells (as extract_mesh; 0 = off)
    update_smoothing: float = 2.0  # Gaussian sigma of the learned SDF change, grid cells (0 = per-vertex)
    deform_scale: float = 0.25  # largest vertex deformation per axis, fraction of a grid cell (geometry.dmtet.MAX_SAFE_DEFORM rules out folded tets; why it is not the default: bench/HISTORY.md)
    fill_tunnel: int = 2  # space reached from outside only through passages about 2 * this + 1 grid vertices wide is filled (0 = only closed cavities)
    fill_unseen: str = "cameras"  # fill what no training camera sees (`geometry.visibility.unseen`): "cameras" rays to their places, "parallel" rays, "off"
    relax_steps: int = 50  # final steps that move the vertices under the mesh regularisers alone (`geometry.solid.relax_surface`)
    fill_every: int = 0  # steps between fills of the enclosed space and undoing isolated sign flips (`DMTet.solidify`); 0 = only at the start and end
    lr_sdf: float = 1e-2  # Adam learning rate of the per-vertex SDF change (the SDF goes 0 -> 1 over ~2 cells)
    lr_deform: float = 1e-2  # Adam learning rate of the deformation (pre-tanh, so scale-free)
    lr_color: float = 1e-3  # Adam learning rate of the copied colour field; 0 = frozen texture
    # Regulariser weights are relative to the SDS loss per image, whose gradient on a mesh vertex is
    # of order 10-1000 with CFG 100, while the regularisers are means over edges / vertices.
    lambda_normal_consistency: float | None = None  # weight of the mean 1 - cos between adjacent face normals; None = the guidance model's, else 1000
    lambda_laplacian: float | None = None  # weight of the mean uniform-Laplacian length (world units); None = the guidance model's, else 10000
    lambda_albedo_tilt: float | None = None  # weight of the squared slope of albedo brightness against normal z (baked light); None = 1e5 with the primitives prior, else 0
    color_average_from: float = 1.0  # fraction of the steps after which the colour field's parameters are averaged (Polyak): the texture is their mean; 1 = off
    albedo_warmup: int = 0  # first steps shaded with albedo only (the coarse stage already warmed the colour)
    prob_albedo: float | None = None  # after the warm-up: probability of albedo shading; None = the guidance model's, else 0.2
    prob_lambertian: float | None = None  # after the warm-up: probability of Lambertian shading; None = the guidance model's, else 0.8
    prob_textureless: float | None = None  # after the warm-up: probability of textureless (white) shading; None = the guidance model's, else 0
    ambient: float | None = None  # ambient share of Lambertian shading (the prior renders with its own); None = the model's, else 0.3
    background: str | tuple | None = None  # "white", "random" (a colour per image) or (r, g, b) in [0, 1]; None = the model's, else white
    camera_jitter: float | None = None  # this stage's camera pose jitter, times the camera config's (`stages.plan.refine_view`); None = 1, or 0 with the primitives prior
    light_jitter: float | None = None  # this stage's light spread (as camera.light_jitter, `stages.plan.refine_view`); None = camera.light_jitter's, or 0 with the primitives prior
    preview_every: int = 100  # steps between preview renders (0 = only at the end)
    preview_views: int = 4  # orbit views in a preview
    preview_resolution: int = 256  # preview image side, px (colour and normals of each view)
    model_every: int = 500  # steps between the intermediate GLBs of the current mesh for the viewer (0 = none; needs `live`)
    seed: int = 0  # seeds cameras, shading draws, backgrounds and timesteps
    max_nonfinite_steps: int = 10  # steps with a NaN/inf loss or gradient are skipped; this many in a row end the stage
    chunk_size: int = 0  # triangles per visibility pass of the torch rasterizer (0 = all): the memory knob
    backend: str = "auto"  # rasterizer: "auto" (nvdiffrast on CUDA when installed), "torch" or "nvdiffrast"
    sds: SDSConfig = dataclasses.field(default_factory=lambda: SDSConfig(t_max=0.5))  # score distillation

    def filled(self) -> RefineConfig:
        """A copy with the unset (None) fields at their values for a run whose guidance model chose none."""
        unset = {name: value for name, value in UNSET_REFINE.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def check(self) -> None:
        for name in ("iters", "batch_size", "resolution", "preview_views", "preview_resolution", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"refine.{name} must be an integer >= 1, got {value!r}")
        if self.fill_unseen not in UNSEEN_RAYS:
            raise ValueError(f"refine.fill_unseen must be one of {list(UNSEEN_RAYS)}, got {self.fill_unseen!r}")
        for name in ("fill_tunnel", "fill_every", "relax_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"refine.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in UNSET_REFINE.keys() - {"background"}:  # the numbers; the background is checked below
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"refine.{name} must be >= 0 or None, got {getattr(self, name)!r}")
        probs = self.filled()
        if not isinstance(self.grid_resolution, int) or self.grid_resolution < 4:
            raise ValueError(f"refine.grid_resolution must be an integer >= 4, got {self.grid_resolution!r}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"refine.threshold must be > 0 or None, got {self.threshold!r}")
        if self.surface_opacity is not None and not 0.0 < self.surface_opacity < 1.0:
            raise ValueError(f"refine.surface_opacity must be in (0, 1) or None, got {self.surface_opacity!r}")
        if not 0.0 <= self.color_average_from <= 1.0:
            raise ValueError(f"refine.color_average_from must be in [0, 1], got {self.color_average_from!r}")
        if not 0.0 <= self.deform_scale <= 0.5:
            raise ValueError(f"refine.deform_scale must be in [0, 0.5], got {self.deform_scale!r}")
        if self.ambient is not None and not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"refine.ambient must be in [0, 1], got {self.ambient!r}")
        for name in ("lr_sdf", "lr_deform", "lr_color", "sdf_smoothing", "update_smoothing", "grid_margin", "albedo_warmup",
                     "preview_every", "chunk_size", "model_every"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"refine.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("camera_jitter", "light_jitter"):
            if getattr(self, name) is not None and not getattr(self, name) >= 0:
                raise ValueError(f"refine.{name} must be >= 0 or None, got {getattr(self, name)!r}")
        if self.lambda_albedo_tilt is not None and not self.lambda_albedo_tilt >= 0:
            raise ValueError(f"refine.lambda_albedo_tilt must be >= 0 or None, got {self.lambda_albedo_tilt!r}")
        if self.lr_sdf + self.lr_deform + self.lr_color <= 0:
            raise ValueError("refine.lr_sdf + lr_deform + lr_color must be > 0 (nothing would be trained)")
        if probs.prob_albedo + probs.prob_lambertian + probs.prob_textureless <= 0:
            raise ValueError("refine.prob_albedo + prob_lambertian + prob_textureless must be > 0")
        if self.background is not None:
            check_background(self.background, "refine.background", BACKGROUNDS)
        if self.backend not in BACKENDS:
            raise ValueError(f"refine.backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        self.sds.check()


@dataclass
class RefineResult:
    vertices: Tensor  # [V, 3] final mesh vertices, detached, training frame (+z up)
    faces: Tensor  # [F, 3] long, counter-clockwise seen from outside
    color_field: object  # the refined colour field: albedo(points [N, 3]) -> [N, 3] in [0, 1]
    previews: list[np.ndarray] = dataclasses.field(default_factory=list)  # [H, W, 3] uint8 orbit mosaics
    stats: dict = dataclasses.field(default_factory=dict)  # seconds per step part (mean), faces, threshold, ...


def _to_guidance_size(images: Tensor, size: int) -> Tensor:  # [B, H, W, 3] -> [B, h, w, 3]
    """Box-filter renders down to the guidance model's size when it divides them (antialiased,
    every pixel gets gradient); any other size is left to SDS's bilinear resize."""
    height = images.shape[1]
    if height > size and height % size == 0 and images.shape[2] % size == 0:
        pooled = F.avg_pool2d(images.permute(0, 3, 1, 2), height // size)
        return pooled.permute(0, 2, 3, 1)
    return images


# --------------------------------------------------------------------------- the stage
def run(
    field,  # the coarse NeRFField (any object with query(x, chunk_size) and albedo(x)); not modified
    guidance,
    prompt: str,
    config: RefineConfig,
    camera: CameraConfig,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    should_stop: StopCheck | None = None,
    live: LiveModels | None = None,  # where to write the current mesh every `model_every` steps; None = nowhere
) -> RefineResult:
    """Refine the coarse field's surface and texture as a mesh with SDS; see the module docstring."""
    # 1. Check inputs; build the DMTet, the colour field copy, the optimizer and the loss.
    device = check_stage_inputs(prompt, config, camera, device)
    config = config.filled()
    generator = torch.Generator().manual_seed(config.seed)
    cameras = None if config.fill_unseen == "off" else camera_band(camera, config.fill_unseen == "cameras")
    level_set = LevelSetSettings(config.grid_resolution, config.threshold, config.grid_margin, config.sdf_smoothing,
                                 config.surface_opacity, config.fill_tunnel, cameras=cameras)
    dmtet, threshold = dmtet_from_field(field, level_set, config.deform_scale, config.update_smoothing, device)
    dmtet = dmtet.to(device)
    color_field = copy.deepcopy(field)
    color_params = [p for p in getattr(color_field, "parameters", lambda: [])()]
    for p in color_params:
        p.requires_grad_(config.lr_color > 0)
    if hasattr(color_field, "train"):
        color_field.train()
    groups = [
        {"params": [dmtet.sdf], "lr": config.lr_sdf, "name": "sdf"},
        {"params": [dmtet.deform], "lr": config.lr_deform, "name": "deform"},
    ]
    if config.lr_color > 0 and color_params:
        groups.append({"params": color_params, "lr": config.lr_color, "name": "color"})
    optimizer = adam(groups)
    sds = SDSLoss(guidance, prompt, config.sds)
    background = Background(config.background).to(device)
    rasterizer = Rasterizer.make(config.backend, device)  # chosen once for the stage's renders and previews
    probabilities = {
        "albedo": config.prob_albedo, "lambertian": config.prob_lambertian, "textureless": config.prob_textureless,
    }
    size = (config.resolution, config.resolution)
    with torch.no_grad():
        initial_faces = dmtet.extract()[1].shape[0]
    if initial_faces == 0:
        raise StageError("refine", 0, f"the coarse field has no surface at density level {threshold:.4g}; "
                                      "set refine.threshold or refine.surface_opacity lower, or train the coarse stage longer")

    # Polyak averaging of the colour field: SDS's albedo wanders with each step's lights and noise.
    average_from = math.ceil(config.color_average_from * config.iters)
    color_mean = [p.detach().clone() for p in color_params] if average_from < config.iters else []  # no copy when off
    averaged = [0]  # steps averaged so far
    solidified = [0]  # grid vertices whose side `DMTet.solidify` changed

    def sds_step(step: int, timer: Timer) -> Step:
        """Extract the mesh, render a batch of random cameras and build the SDS loss plus the regularisers."""
        verts, faces = dmtet.extract()
        if faces.shape[0] == 0:
            raise StageError("refine", step + 1, "the surface vanished (the SDF has no zero crossing); lower refine.lr_sdf")
        timer.mark("marching")
        cams = sample_cameras(config.batch_size, camera, size, generator=generator, device=device)
        shading = sample_shading(step, config.albedo_warmup, generator, probabilities)
        bg = background(config.batch_size, generator, device).to(verts.dtype)
        rast_out = rasterize_mesh(verts, faces, cams, rasterizer, config.chunk_size)
        timer.mark("rasterize")
        images = shade_mesh(rast_out, color_field, cams, shading, config.ambient, bg, rasterizer)["rgb"]
        timer.mark("shade")
        loss_sds, info = sds(
            _to_guidance_size(images, guidance.resolution), cams.view_words,
            progress=step / max(config.iters - 1, 1), generator=generator, elevations=cams.elevation,
        )
        timer.mark("guidance")
        loss = loss_sds / config.batch_size
        if config.lambda_normal_consistency > 0:
            loss = loss + config.lambda_normal_consistency * normal_consistency_loss(verts, faces)
        if config.lambda_laplacian > 0:
            loss = loss + config.lambda_laplacian * laplacian_loss(verts, faces)
        if config.lambda_albedo_tilt and color_params:
            loss = loss + config.lambda_albedo_tilt * albedo_tilt_loss(verts, faces, color_field.albedo, generator=generator)
        timer.mark("regularize")
        texture_grads = _texture_gradients(info["texture_loss"], color_params, config.batch_size)
        faces_now = faces.shape[0]
        return Step(loss, lambda value: f"refine mesh step {step + 1}/{config.iters}, {faces_now} faces, loss {value:.4g}",
                    finish_grads=lambda: _add_gradients(texture_grads), view=(verts, faces))

    def after_update(step: int) -> None:
        if config.fill_every and (step + 1) % config.fill_every == 0:  # SDS leaves unseen space free to open cavities
            solidified[0] += dmtet.solidify(config.fill_tunnel)
        if color_mean and step >= average_from:
            with torch.no_grad():
                averaged[0] += 1
                for mean, p in zip(color_mean, color_params):
                    mean.add_(p.detach() - mean, alpha=1.0 / averaged[0])
        if step == config.iters - 1:
            _use_mean(color_params, color_mean, averaged[0])  # the last preview shows the texture that is handed on

    def preview(out: Step) -> np.ndarray:
        verts, faces = out.view
        return mesh_preview(verts.detach(), faces, color_field, config.preview_views, config.preview_resolution,
                            config.ambient, rasterizer, device)

    def model(step: int, out: Step) -> tuple[str, str]:
        return live.refine_mesh(*out.view, color_field, step + 1), refine_label(step + 1)

    # 2. The SDS loop (`stages.loop`): a preview every `preview_every` steps and at the end, a GLB every `model_every`.
    done = run_loop("refine", config, optimizer, device, sds_step, preview, TIMING_PARTS, callback, should_stop,
                    after_update=after_update, model=model if live is not None else None, model_every=config.model_every,
                    update_part="backward")

    # 3. Hand off the final mesh and the colour field.
    solidified[0] += dmtet.solidify(config.fill_tunnel)
    relax_surface(dmtet, config.relax_steps, config.lambda_normal_consistency, config.lambda_laplacian, config.lr_deform)
    with torch.no_grad():
        verts, faces = dmtet.extract()
    _use_mean(color_params, color_mean, averaged[0])
    if hasattr(color_field, "eval"):
        color_field.eval()
    for p in color_params:
        p.requires_grad_(False)
    stats = {key: value / config.iters for key, value in done.totals.items()}
    stats.update(faces=int(faces.shape[0]), vertices=int(verts.shape[0]), initial_faces=int(initial_faces),
                 threshold=float(threshold), final_loss=done.loss, steps=config.iters,
                 nonfinite_skipped=done.nonfinite_skipped, preview_seconds=done.preview_seconds,
                 model_seconds=done.model_seconds, solidified_vertices=solidified[0])
    return RefineResult(vertices=verts.detach(), faces=faces, color_field=color_field, previews=done.previews, stats=stats)


def _texture_gradients(texture_loss: Tensor | None, color_params: list[Tensor], batch_size: int) -> list | None:
    """With `sds.texture_guidance_scale`: the colour parameters' share of the texture's own SDS term
    (taken before the main backward frees the graph); None without it or with a frozen texture."""
    trainable = [p for p in color_params if p.requires_grad]
    if texture_loss is None or not trainable:
        return None
    grads = torch.autograd.grad(texture_loss / batch_size, trainable, retain_graph=True, allow_unused=True)
    return list(zip(trainable, grads))


def _add_gradients(grads: list | None) -> None:
    """Add `_texture_gradients`' (parameter, gradient) pairs to the parameters' .grad."""
    if not grads:
        return
    extra = [g for _, g in grads if g is not None]
    if extra and not torch.isfinite(torch.nn.utils.get_total_norm(extra)):
        raise NonFiniteError("non-finite texture gradients")
    for p, g in grads:
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def _use_mean(params: list[Tensor], means: list[Tensor], count: int) -> None:
    """Set the colour field's parameters to their running means (when any step was averaged)."""
    if count:
        with torch.no_grad():
            for mean, p in zip(means, params):
                p.copy_(mean)

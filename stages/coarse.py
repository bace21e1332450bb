"""Stage 1: a NeRF distilled from a 2D diffusion model with SDS at low resolution (DreamFusion).

`run(guidance, prompt, config, camera, device)` trains a hash-grid NeRF: each step samples
random cameras, volume-renders them, and applies the SDS loss of the guidance model plus
named regularizers. It returns a `CoarseResult` holding the trained field, which can be
queried for density and albedo anywhere, and the preview images it reported.

With `sds.texture_guidance_scale` the albedo learns from SDS at that CFG scale and the density at
the stage's: the loss adds the difference of the two scales' gradients on a render whose gradient
reaches the albedo alone (`render_volume(texture_path=True)`: weights and shading held). The MLP is
shared, so its hidden layers take both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from geometry.nerf import FieldConfig, NeRFField
from guidance.sds import SDSConfig, SDSLoss
from renderers.cameras import CameraConfig, sample_cameras
from renderers.volume import DREAMFUSION_AMBIENT, OccupancyGrid, VolumeConfig, render_volume, sample_shading
from stages.background import Background, check_background
from stages.common import Callback, StepEvent, StopCheck, check_stage_inputs, clock
from stages.live_models import COARSE_LABEL, LiveModels
from stages.loop import Step, Timer, adam, run_loop
from stages.previews import nerf_preview

TIMING_PARTS = ("render", "guidance", "backward", "optimizer")  # "backward" includes the regularizers


# What the fields left unset (None) take when no guidance model sets them (`CoarseConfig.filled`).
UNSET_COARSE = {"lr_network": 1e-3, "background": "learned", "background_greys": (), "greys_until": 1.0}


@dataclass
class CoarseConfig:
    iters: int = 1000  # SDS steps
    batch_size: int = 1  # cameras rendered per step
    resolution: int = 64  # rendered image side, px (the guidance model resizes it to its own)
    lr_encoding: float = 1e-2  # Adam learning rate of the hash-grid tables
    lr_network: float | None = None  # Adam learning rate of the MLP and the learned background; None = the guidance model's, else 1e-3
    albedo_warmup: int = 100  # first steps rendered with albedo shading only
    prob_albedo: float = 0.25  # after the warm-up: probability of albedo shading
    prob_lambertian: float = 0.375  # after the warm-up: probability of Lambertian shading
    prob_textureless: float = 0.375  # after the warm-up: probability of textureless (white) shading
    background: str | tuple | None = None  # "white", "random" (a colour per image), "learned" (one colour), (r, g, b) in [0, 1]; None = the model's, else learned
    background_greys: tuple | None = None  # grey levels in [0, 1]: each step renders on one drawn at random (`background` stays the previews'), and a model that takes a level (the primitives prior) denoises on it too; None = the model's, else () = off
    greys_until: float | None = None  # fraction of the steps (the first ones) rendered on `background_greys`; the rest on `background`, the model on its own level; None = the model's, else 1
    lambda_orientation: float = 1e-2  # weight of Ref-NeRF's orientation loss, reached after the ramp
    orientation_ramp: int = 500  # steps over which the orientation weight rises linearly from 0
    lambda_sparsity: float = 0.0  # weight of the mean opacity (pushes empty space to be empty)
    lambda_entropy: float = 1e-3  # weight of the opacity entropy (pushes opacity to 0 or 1)
    preview_every: int = 100  # steps between preview renders (0 = only at the end)
    preview_views: int = 4  # orbit views in a preview
    preview_resolution: int = 256  # preview image side, px (colour and normals of each view; training keeps `resolution`)
    seed: int = 0  # seeds the field, cameras, ray jitter and timesteps
    max_nonfinite_steps: int = 10  # steps with a NaN/inf loss or gradient are skipped; this many in a row end the stage
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)  # the NeRF's encoding and MLP
    volume: VolumeConfig = dataclasses.field(default_factory=VolumeConfig)  # ray marching and shading
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)  # score distillation

    def filled(self) -> CoarseConfig:
        """A copy with the unset (None) fields at their values for a run whose guidance model chose none."""
        unset = {name: value for name, value in UNSET_COARSE.items() if getattr(self, name) is None}
        if self.volume.ambient is None:
            unset["volume"] = dataclasses.replace(self.volume, ambient=DREAMFUSION_AMBIENT)
        return dataclasses.replace(self, **unset) if unset else self

    def check(self) -> None:
        for name in ("iters", "batch_size", "resolution", "preview_views", "preview_resolution", "max_nonfinite_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"coarse.{name} must be an integer >= 1, got {value!r}")
        for name in ("lr_encoding", "lr_network"):
            if name in UNSET_COARSE and getattr(self, name) is None:
                continue
            if not getattr(self, name) > 0:
                raise ValueError(f"coarse.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("albedo_warmup", "orientation_ramp", "preview_every", "prob_albedo", "prob_lambertian",
                     "prob_textureless", "lambda_orientation", "lambda_sparsity", "lambda_entropy"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"coarse.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.prob_albedo + self.prob_lambertian + self.prob_textureless <= 0:
            raise ValueError("coarse.prob_albedo + prob_lambertian + prob_textureless must be > 0")
        if self.background is not None:
            check_background(self.background, "coarse.background")
        greys = self.background_greys
        if greys is not None and (not isinstance(greys, tuple) or not all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and 0.0 <= g <= 1.0 for g in greys)):
            raise ValueError(f"coarse.background_greys must be a tuple of grey levels in [0, 1] (or none), got {greys!r}")
        until = self.greys_until
        if until is not None and (isinstance(until, bool) or not isinstance(until, (int, float)) or not 0.0 <= until <= 1.0):
            raise ValueError(f"coarse.greys_until must be a fraction of the steps in [0, 1], got {until!r}")
        self.field.check()
        self.volume.check()
        self.sds.check()


@dataclass
class CoarseResult:
    field: NeRFField  # the trained density + albedo field (eval mode)
    previews: list[np.ndarray] = dataclasses.field(default_factory=list)  # [H, W, 3] uint8 orbit mosaics
    stats: dict = dataclasses.field(default_factory=dict)  # mean seconds per step part, final loss, steps


def run(
    guidance,
    prompt: str,
    config: CoarseConfig,
    camera: CameraConfig,
    device: torch.device | str = "cpu",
    callback: Callback | None = None,
    should_stop: StopCheck | None = None,
    live: LiveModels | None = None,  # where to write the coarse surface for the viewer at the end; None = nowhere
) -> CoarseResult:
    """Train the coarse NeRF for `prompt` with SDS from `guidance`; see the module docstring."""
    # 1. Check inputs and prepare the field, optimizer, loss and random streams.
    device = check_stage_inputs(prompt, config, camera, device)
    config = config.filled()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    field_ = NeRFField(config.field).to(device)
    background = Background(config.background).to(device)
    groups = field_.parameter_groups(config.lr_encoding, config.lr_network)
    if background.logit is not None:
        groups.append({"params": [background.logit], "lr": config.lr_network, "name": "background"})
    optimizer = adam(groups)
    sds = SDSLoss(guidance, prompt, config.sds)
    greys = config.background_greys or ()
    occupancy = OccupancyGrid.from_config(config.volume, device) if config.volume.use_occupancy else None
    probabilities = {
        "albedo": config.prob_albedo, "lambertian": config.prob_lambertian, "textureless": config.prob_textureless,
    }
    size = (config.resolution, config.resolution)

    def sds_step(step: int, timer: Timer) -> Step:
        """Render a batch of random cameras and build the SDS loss plus the regularizers."""
        field_.train()
        background.train()
        if occupancy is not None:
            occupancy.step(field_, step, generator)
        timer.start()
        cams = sample_cameras(config.batch_size, camera, size, generator=generator, device=device)
        shading = sample_shading(step, config.albedo_warmup, generator, probabilities)
        bg = background(config.batch_size, generator, device)
        if greys and step < config.greys_until * config.iters:  # the prior must denoise on the level the images show
            level = float(greys[int(torch.randint(len(greys), (1,), generator=generator))])
            bg = torch.full_like(bg, level)
            sds.guidance = guidance.with_background(level) if hasattr(guidance, "with_background") else guidance
        elif greys:
            sds.guidance = guidance
        out = render_volume(
            field_, cams, config.volume, shading=shading, background=bg, occupancy=occupancy,
            generator=generator, need_normals=config.lambda_orientation > 0 and step >= config.albedo_warmup,
            texture_path=config.sds.texture_guidance_scale is not None,
        )
        timer.mark("render")
        loss_sds, info = sds(out["rgb"], cams.view_words, progress=step / max(config.iters - 1, 1), generator=generator,
                             elevations=cams.elevation, texture_images=out.get("rgb_texture"))
        timer.mark("guidance")
        loss = loss_sds / config.batch_size + _regularizers(out, config, step)  # per image, as in refine
        if info["texture_loss"] is not None:  # the albedo's path gets the texture's CFG scale instead
            loss = loss + info["texture_loss"] / config.batch_size
        return Step(loss, lambda value: f"coarse NeRF step {step + 1}/{config.iters}, loss {value:.4g}, t={int(info['t'][0])}")

    def preview(_: Step) -> np.ndarray:
        field_.eval()
        background.eval()
        return nerf_preview(field_, config.volume, config.preview_views, config.preview_resolution,
                            background(1, None, device).detach(), occupancy=occupancy)

    # 2. The SDS loop (`stages.loop`): a preview every `preview_every` steps and at the end.
    done = run_loop("coarse", config, optimizer, device, sds_step, preview, TIMING_PARTS, callback, should_stop)

    # 3. Hand off the trained field.
    field_.eval()
    for p in field_.parameters():
        p.requires_grad_(False)
    stats = {f"{k}_s_per_step": v / config.iters for k, v in done.totals.items()}
    stats.update(final_loss=done.loss, steps=config.iters, nonfinite_skipped=done.nonfinite_skipped,
                 preview_seconds=done.preview_seconds)
    if occupancy is not None:
        stats["occupied_fraction"] = occupancy.occupied_fraction
    if live is not None:  # the shape in the viewer while the refine stage starts
        t0 = clock(device)
        model = live.coarse_surface(field_, device)
        stats["model_seconds"] = clock(device) - t0
        if callback is not None and model is not None:
            callback(StepEvent(stage="coarse", step=config.iters, total=config.iters, loss=done.loss,
                               message="coarse stage done: its surface is in the viewer", model=model,
                               model_label=COARSE_LABEL))
    return CoarseResult(field=field_, previews=done.previews, stats=stats)


def _regularizers(out: dict, config: CoarseConfig, step: int) -> Tensor:
    """Orientation (ramped), opacity sparsity and opacity entropy, each with its named weight."""
    alpha = out["alpha"].clamp(1e-5, 1.0 - 1e-5)
    total = torch.zeros((), device=alpha.device)
    if config.lambda_orientation > 0 and "orientation" in out:
        ramp = min(1.0, step / config.orientation_ramp) if config.orientation_ramp > 0 else 1.0
        total = total + config.lambda_orientation * ramp * out["orientation"]
    if config.lambda_sparsity > 0:
        total = total + config.lambda_sparsity * alpha.mean()
    if config.lambda_entropy > 0:
        entropy = -(alpha * alpha.log() + (1 - alpha) * (1 - alpha).log()).mean()
        total = total + config.lambda_entropy * entropy
    return total


def surface_mesh(field: NeRFField, refine, device: torch.device) -> tuple[Tensor, Tensor]:
    """The trained field's density level set (verts [V, 3], faces [F, 3]) on the refine stage's grid (`refine`: its
    RefineConfig): the mesh of a run that stops after this stage."""
    from geometry.level_set import LevelSetSettings, extract_mesh

    settings = LevelSetSettings(refine.grid_resolution, refine.threshold, opacity=refine.surface_opacity)
    return extract_mesh(field, settings, device)

"""The GPU cost model: seconds a run's stages take on a card, from its settings, before anything runs.

A host that charges GPU time by the request (a ZeroGPU Space asks each call for its duration up front)
needs the time before the run; the `fast` preset was sized with it. Each step's cost is the sum of its
parts, each part a per-unit cost times the work the settings ask for:

- the diffusion model: one UNet pass per image and branch (classifier-free guidance: 2 per rendered
  view; Perp-Neg: 2 more), at the model's resolution (SD 2.1 base: 64 x 64 latents);
- the VAE encoder, forward and backward, for latent models (the render, upsampled to 512 px);
- the renderer: ray samples of the hash-grid NeRF (coarse), pixels of the rasterizer (refine), each
  forward and backward in pure PyTorch (no CUDA extension: none builds on a Space);
- marching tetrahedra per refine step (tets of the grid), the optimizer and the launches of a step;
- per call: the worker's start (fork, CUDA context) and the model's load onto the card.

The per-unit figures are in `CARDS`; bench/RESULTS.md ("The GPU cost model") and bench/HISTORY.md say where each comes from.
None was measured on a GPU yet: `python -m bench.gpu_check` measures each part on a CUDA card, and its
table is how a card is added or a figure corrected. UNCERTAINTY bounds the error of the whole estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

UNCERTAINTY = 1.6  # the true time is taken to lie within [estimate / 1.6, estimate x 1.6]


@dataclass(frozen=True)
class Card:
    """Per-unit costs on one GPU (seconds), for Stable Diffusion 2.1 base at fp16."""

    name: str
    unet_image: float  # one UNet pass of one image at 64 x 64 latents (a batch of 2 costs twice this)
    vae_image: float  # VAE encoder forward + backward of one 512 px image
    volume_msample: float  # a million NeRF ray samples, forward + backward (hash grid + MLP + compositing)
    raster_mpixel: float  # a million rasterized, interpolated and shaded pixels, forward + backward
    marching_mtet: float  # marching tetrahedra and the SDF/deformation update over a million tets
    step_fixed: float  # optimizer step, regularizers, random cameras, kernel launches: per step
    call_start: float  # a GPU call's start: the forked worker, the CUDA context, first-use kernels
    model_load: float  # SD 2.1 base's 2.6 GB of fp16 weights from the local disk's cache onto the card, modules built


# The full H100 (SXM, 132 SMs). UNet: the published diffusers figure for SD 1.5 at fp16 on an A100 80GB
# (torch SDPA, 31 it/s for 50 CFG steps at 512 px: 16 ms per latent image), and H100s run SD about 1.8x
# faster than A100s (SD 2.1 base's UNet has the same size). VAE encoder: about 0.5 TFLOP forward at 512 px,
# twice that with the input gradient, at a third of the card's fp16 peak. The renderers and marching
# tetrahedra are pure PyTorch: chains of small kernels bound by memory traffic and launches, taken as this
# project's one-thread CPU figures (bench/HISTORY.md) divided by 50 (memory bandwidth) and doubled (launches).
H100 = Card(name="H100 (full card)", unet_image=0.009, vae_image=0.012, volume_msample=0.03,
            raster_mpixel=0.06, marching_mtet=0.003, step_fixed=0.008, call_start=3.0, model_load=5.0)

# A ZeroGPU Space's card: a 3g.71gb slice of an H200 (60 of its 132 SMs; `spaces` 0.51's own config).
# Compute-bound parts (UNet, VAE) scale by the SM count; memory- and launch-bound parts less: the slice has
# 3/7 of the H200's 4.8 TB/s, 0.6 of an H100's bandwidth, taken as 1.5x for the renderers and 1.3x per step.
_SM = 132 / 60
ZEROGPU = Card(name="ZeroGPU (H200 3g.71gb slice)", unet_image=0.009 * _SM, vae_image=0.012 * _SM,
               volume_msample=0.03 * 1.5, raster_mpixel=0.06 * 1.5, marching_mtet=0.003 * 1.5,
               step_fixed=0.008 * 1.3, call_start=4.0, model_load=6.0)

CARDS = {"h100": H100, "zerogpu": ZEROGPU}


def unet_images_per_view(sds) -> int:
    """UNet images per rendered view: conditional and unconditional, plus two negatives with Perp-Neg."""
    return 4 if sds.perp_neg else 2


def coarse_step_seconds(config, card: Card, latent: bool = True) -> dict:
    """Seconds of one coarse step by part, for a `CoarseConfig`."""
    views = config.batch_size
    samples = views * config.resolution**2 * config.volume.num_samples / 1e6
    return {
        "render": samples * card.volume_msample,
        "vae": views * card.vae_image if latent else 0.0,
        "model": views * unet_images_per_view(config.sds) * card.unet_image,
        "fixed": card.step_fixed,
    }


def refine_step_seconds(config, card: Card, latent: bool = True) -> dict:
    """Seconds of one refine step by part, for a `RefineConfig` (about 6 tets per grid cube)."""
    views = config.batch_size
    return {
        "marching": 6 * config.grid_resolution**3 / 1e6 * card.marching_mtet,
        "render": views * config.resolution**2 / 1e6 * card.raster_mpixel,
        "vae": views * card.vae_image if latent else 0.0,
        "model": views * unet_images_per_view(config.sds) * card.unet_image,
        "fixed": card.step_fixed,
    }


@dataclass(frozen=True)
class CallCost:
    """One GPU call of a run: its stage and the seconds it is expected to take."""

    stage: str
    steps: float  # the stage's steps: iters x seconds per step
    overhead: float  # the call's start and the model's load

    @property
    def seconds(self) -> float:
        return self.steps + self.overhead


def stage_calls(config, card: Card, latent: bool = True) -> list[CallCost]:
    """The GPU calls of a run of `config` (a whole `stages.config.Config`): one per SDS stage it trains."""
    overhead = card.call_start + card.model_load
    calls = [CallCost("coarse", config.coarse.iters * sum(coarse_step_seconds(config.coarse, card, latent).values()),
                      overhead)]
    if config.stop_after != "coarse":
        calls.append(CallCost("refine", config.refine.iters * sum(refine_step_seconds(config.refine, card, latent).values()),
                              overhead))
    return calls


def run_gpu_seconds(config, card: Card, latent: bool = True) -> float:
    """A whole run's GPU seconds of steps (the export runs on the CPU; calls' starts and model loads left out)."""
    return sum(c.steps for c in stage_calls(config, card, latent))

"""The guidance models a run can choose: one `GuidanceSpec` each, listed in registration order.

A spec says everything the rest of the project needs to know about a model: how to build it
(`build`, and `settings`: what a run's Config passes to it, which also identifies a loaded one),
which prompts it understands (`check_prompt`), which settings of the run follow from it
(`adapt`), what the app shows for it (examples, a note), and whether it takes a model id. The
app, the command line, the batch and the pipeline list and choose models here and never branch
on a model's name; adding a model is one `register(GuidanceSpec(...))`, in the model's own file
or, for the built-in ones, at the bottom of this one.

The modules of the models themselves are imported only when a model is built or adapted to, so
importing this file is cheap. Specs take the run's `stages.config.Config` as a plain object
(the guidance package sits below the stages and does not import them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

AUTO = "auto"  # the choice that picks a model for the device (see `resolve_name`)
AUTO_BY_DEVICE = {"cuda": "stable-diffusion"}  # device type -> the model "auto" picks there
AUTO_FALLBACK = "primitives"  # what "auto" picks on any other device (no GPU: the offline prior)
EXAMPLES_FILE = Path(__file__).resolve().parents[1] / "examples" / "prompts.txt"  # free-form example prompts


@runtime_checkable
class Guidance(Protocol):
    """A frozen 2D diffusion model as SDS uses it (`guidance.sds.SDSLoss`; docs/ARCHITECTURE.md, "Adding a guidance model").
    Latent models (space == "latent") also have `encode_images(pixels [B, 3, H, W] in [0, 1]) -> [B, C, h, w]`."""

    space: str  # "pixel" (SDS on the image in [-1, 1]) or "latent" (on encode_images' latents)
    resolution: int  # image side the model diffuses at, px
    alphas_cumprod: Tensor  # [T] the noise schedule's cumulative alphas
    default_guidance_scale: float  # CFG scale when SDSConfig.guidance_scale is None
    view_dependent_uncond: bool  # whether the unconditional text also gets the ", <view> view" suffix

    def encode_prompt(self, texts: list[str]) -> Tensor:  # [N, ...] text embeddings
        ...

    def predict_noise(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:  # [B, C, h, w]
        ...


def _any_prompt(prompt: str) -> None:
    """Free-form text models take every prompt that `stages.plan.check_prompt` lets through."""


def _adapt_nothing(config, prompt: str) -> None:
    """No setting of the run depends on the model."""


def _as_built(model, config):
    return model


@dataclass(frozen=True)
class GuidanceSpec:
    name: str  # what --guidance, the app's menu and Config.guidance call it
    title: str  # how messages name it, e.g. "the primitives prior"
    build: Callable[..., Guidance]  # build(device, dtype=None, model_id=None, **kwargs) -> the model
    settings: Callable[[object], dict]  # Config -> the keyword arguments `load` passes to build
    default_model_id: str | None = None  # hub id used when Config.model_id is None; None = it has no weights
    check_prompt: Callable[[str], None] = _any_prompt  # raises ValueError for a prompt it cannot use
    adapt: Callable[[object, str], None] = _adapt_nothing  # (config, prompt): sets what follows from the model
    for_run: Callable[[Guidance, object], Guidance] = _as_built  # (cached model, config) -> the run's view of it
    examples: Callable[[], list[str]] = list  # the app's example prompts
    app_note: str = ""  # said after the app's "Active guidance: ..." line
    kept: int = 1  # models of this spec a process keeps in memory at once (different settings: the primitives prior's two libraries)

    @property
    def takes_model_id(self) -> bool:
        return self.default_model_id is not None

    def load(self, config, device: torch.device) -> Guidance:
        """The model for a run's (adapted) config on `device`."""
        return self.build(device, **self.settings(config))

    def cache_key(self, config, device: torch.device) -> tuple:
        """What identifies the model `load(config, device)` builds: equal keys, interchangeable models."""
        return (self.name, str(device), *((k, repr(v)) for k, v in sorted(self.settings(config).items())))


_SPECS: dict[str, GuidanceSpec] = {}


def register(spec: GuidanceSpec) -> GuidanceSpec:
    """Add a model (or replace the one of that name); returns the spec."""
    if spec.name == AUTO:
        raise ValueError(f"a guidance model cannot be called {AUTO!r}: that name picks one per device")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a model (tests that registered one of their own)."""
    _SPECS.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered models' names, in registration order."""
    return tuple(_SPECS)


def choices() -> tuple[str, ...]:
    """What a user can ask for: "auto" and every registered model."""
    return (AUTO, *_SPECS)


def get(name: str) -> GuidanceSpec:
    if name not in _SPECS:
        raise ValueError(f"guidance name must be one of {list(_SPECS)}, got {name!r}")
    return _SPECS[name]


def resolve_name(name: str, device: torch.device) -> str:
    """The model a run uses: `name`, or for "auto" the device's choice (Stable Diffusion on CUDA, else primitives)."""
    if name == AUTO:
        return AUTO_BY_DEVICE.get(torch.device(device).type, AUTO_FALLBACK)
    return name


# --------------------------------------------------------------------------- the built-in models
PRIMITIVES_REFINE_GUIDANCE_SCALE = 10.0  # the refine stage's CFG with the primitives prior (its coarse CFG is 5)
PRIMITIVES_ALBEDO_TILT = 1e5  # refine.lambda_albedo_tilt with the primitives prior (single-colour prompts)
PRIMITIVES_REGULARIZER_SCALE = 0.1  # the refine stage's mesh regularizer weights with the primitives prior, times the defaults
PRIMITIVES_TEXTURE_GUIDANCE_SCALE = 3.0  # the CFG scale of the refine stage's texture gradient with the primitives prior
PRIMITIVES_LR_NETWORK = 1e-2  # the coarse stage's MLP learning rate with the primitives prior (the default is 1e-3)
PRIMITIVES_REFINE_CAMERA_JITTER = 0.0  # refine.camera_jitter with the primitives prior: no pose jitter while refining


def _build_primitives(device, dtype=None, model_id=None, **kwargs):
    from guidance.primitives import PrimitivesPrior

    if model_id is not None:
        raise ValueError(f"model_id must be None for the primitives prior (it has no weights), got {model_id!r}")
    return PrimitivesPrior(device=device, dtype=dtype if dtype is not None else torch.float32, **kwargs)


def _primitives_settings(config) -> dict:
    prior = config.prior
    return dict(resolution=prior.resolution, renders_per_view=prior.renders_per_view, flat_share=prior.flat_share,
                elevation_sigma=prior.elevation_sigma, camera=config.camera.filled(), ambient=config.coarse.volume.ambient)


def _check_primitives_prompt(prompt: str) -> None:
    from guidance.primitive_shapes import parse_prompt

    parse_prompt(prompt)  # raises UnknownPromptError listing the vocabulary


def adapt_to_primitives(config, prompt: str | None = None) -> None:
    """The primitives prior's libraries are Lambertian renders on a grey level (white, or dark for
    white objects: `guidance.primitives.background_for`): the stages render on the same with the
    same ambient light. The prior sees no camera but its elevation, so a range of distances would leave the
    object's size free: its runs use one distance and field of view. Every setting it tunes is
    changed only where the config leaves it unset (None): an explicit one is always obeyed. Each
    setting's reason and figures: docs/PRIMITIVES.md."""
    from guidance.primitive_shapes import PRIOR_AMBIENT
    from guidance.primitives import CAMERA_DISTANCE, CAMERA_FOVY, background_for

    config.prior.background = background_for(prompt)
    white = config.prior.background == 1.0
    grey = "white" if white else (config.prior.background,) * 3
    if config.camera.distance_range is None:
        config.camera.distance_range = (CAMERA_DISTANCE, CAMERA_DISTANCE)
    if config.camera.fovy_range is None:
        config.camera.fovy_range = (CAMERA_FOVY, CAMERA_FOVY)
    config.coarse.background = grey
    config.refine.background = grey
    config.coarse.volume.ambient = PRIOR_AMBIENT
    config.refine.ambient = PRIOR_AMBIENT
    if config.refine.sds.guidance_scale is None:
        # The mesh regularizers' weights suit CFG-100 gradients: at the prior's 5 they hold the mesh still.
        config.refine.sds.guidance_scale = PRIMITIVES_REFINE_GUIDANCE_SCALE
    if config.coarse.sds.pass_elevations is None:
        # The elevation kernel in the coarse stage too leaves the cones' textures saturated.
        config.coarse.sds.pass_elevations = False
    if config.refine.lambda_albedo_tilt is None:
        # Every prompt of the prior is one colour, so brightness must not follow the normal's z.
        config.refine.lambda_albedo_tilt = PRIMITIVES_ALBEDO_TILT
    if config.refine.sds.texture_guidance_scale is None and white:
        # At the shape's CFG the texture saturates; not for white objects, whose texture sinks to grey at 3.
        config.refine.sds.texture_guidance_scale = PRIMITIVES_TEXTURE_GUIDANCE_SCALE
    if config.coarse.lr_network is None and white:
        # Corners and rims beyond the initial blob stay a haze at the default rate; white objects break up at this one.
        config.coarse.lr_network = PRIMITIVES_LR_NETWORK
    if config.refine.camera_jitter is None:
        # Jitter the prior cannot see would let a shifted or stretched object match as well as the true one.
        config.refine.camera_jitter = PRIMITIVES_REFINE_CAMERA_JITTER
    shading = ("prob_albedo", "prob_lambertian", "prob_textureless")
    if all(getattr(config.refine, name) is None for name in shading):
        # The libraries hold shaded renders only: albedo-only renders would pull the albedo toward their darker mean.
        config.refine.prob_albedo, config.refine.prob_lambertian, config.refine.prob_textureless = 0.0, 1.0, 0.0
    unset = type(config.refine)().filled()  # what the refine stage takes for a field nothing sets
    for name in ("lambda_normal_consistency", "lambda_laplacian"):
        # The weights suit CFG-100 gradients: at the prior's refine CFG they hold the surface still.
        if getattr(config.refine, name) is None:
            setattr(config.refine, name, getattr(unset, name) * PRIMITIVES_REGULARIZER_SCALE)


def _primitives_for_run(model, config):
    return model.with_background(config.prior.background)  # one library serves every background level


def _primitives_examples() -> list[str]:
    return ["a red cube", "a blue torus", "a green sphere", "a yellow cylinder", "an orange cone", "a purple capsule"]


def adapt_to_hub_model(config, prompt: str | None = None) -> None:
    """Text-to-image models see real backgrounds: the coarse stage learns one, the refine stage draws random ones
    (unless the config chose a colour or mode of its own)."""
    if not isinstance(config.coarse.background, str) or config.coarse.background == "white":
        config.coarse.background = "learned"
    if not isinstance(config.refine.background, str) or config.refine.background == "white":
        config.refine.background = "random"


def _hub_settings(config) -> dict:
    from guidance.hub import model_dtype

    dtype = model_dtype(getattr(config, "model_dtype", "auto"))  # None ("auto"): fp16 on CUDA, fp32 elsewhere
    return {**({"model_id": config.model_id} if config.model_id else {}), **({"dtype": dtype} if dtype else {})}


def _file_examples() -> list[str]:
    lines = [ln.strip() for ln in EXAMPLES_FILE.read_text().splitlines() if ln.strip()] if EXAMPLES_FILE.exists() else []
    return lines or ["a ceramic teapot", "a wooden chair"]


def _build_stable_diffusion(device, dtype=None, model_id=None, **kwargs):
    from guidance.hub import DEFAULT_SD_MODEL_ID
    from guidance.stable_diffusion import StableDiffusionGuidance

    return StableDiffusionGuidance(model_id or DEFAULT_SD_MODEL_ID, device=device, dtype=dtype, **kwargs)


def _build_deepfloyd_if(device, dtype=None, model_id=None, **kwargs):
    from guidance.deepfloyd_if import DeepFloydIFGuidance
    from guidance.hub import DEFAULT_IF_MODEL_ID

    return DeepFloydIFGuidance(model_id or DEFAULT_IF_MODEL_ID, device=device, dtype=dtype, **kwargs)


def _register_builtins() -> None:
    from guidance.hub import DEFAULT_IF_MODEL_ID, DEFAULT_SD_MODEL_ID

    register(GuidanceSpec(
        name="primitives", title="the primitives prior", build=_build_primitives, settings=_primitives_settings,
        check_prompt=_check_primitives_prompt, adapt=adapt_to_primitives, for_run=_primitives_for_run,
        examples=_primitives_examples, app_note=" (offline primitives prior: prompts like 'a red cube', 'a blue torus')",
        kept=2,  # one library for the coarse stage's cameras, one for the refine stage's (no pose jitter)
    ))
    register(GuidanceSpec(
        name="stable-diffusion", title="Stable Diffusion", build=_build_stable_diffusion, settings=_hub_settings,
        default_model_id=DEFAULT_SD_MODEL_ID, adapt=adapt_to_hub_model, examples=_file_examples,
    ))
    register(GuidanceSpec(
        name="deepfloyd-if", title="DeepFloyd IF", build=_build_deepfloyd_if, settings=_hub_settings,
        default_model_id=DEFAULT_IF_MODEL_ID, adapt=adapt_to_hub_model, examples=_file_examples,
    ))


_register_builtins()

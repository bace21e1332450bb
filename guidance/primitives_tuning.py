"""The primitives prior as a guidance model: how it is built, which prompts it takes, and the run settings it
tunes (`adapt`), registered with `guidance.registry`. Every setting's reason and figures: docs/PRIMITIVES.md.

The prior itself (`guidance.primitives`) is imported only when it is built or adapted to.
"""
from __future__ import annotations

import torch

from guidance.registry import GuidanceSpec, register

__all__ = ["SPEC", "adapt_to_primitives"]

PRIMITIVES_REFINE_GUIDANCE_SCALE = 10.0  # the refine stage's CFG with the primitives prior (its coarse CFG is 5)
PRIMITIVES_ALBEDO_TILT = 1e5  # refine.lambda_albedo_tilt with the primitives prior (single-colour prompts)
PRIMITIVES_REGULARIZER_SCALE = 0.1  # the refine stage's mesh regularizer weights with the primitives prior, times the defaults
PRIMITIVES_TEXTURE_GUIDANCE_SCALE = 3.0  # the CFG scale of the refine stage's texture gradient with the primitives prior
PRIMITIVES_LR_NETWORK = 1e-2  # the coarse stage's MLP learning rate with the primitives prior (the default is 1e-3)
ACHROMATIC = ("white", "gray")  # colours whose objects keep the default MLP learning rate
PRIMITIVES_REFINE_CAMERA_JITTER = 0.0  # refine.camera_jitter with the primitives prior: no pose jitter while refining
PRIMITIVES_BACKGROUND_GREYS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)  # coarse.background_greys with the primitives prior ...
PRIMITIVES_GREYS_UNTIL = 0.5  # ... for this fraction of the coarse steps (coarse.greys_until)
PRIMITIVES_LIGHT_JITTER = 0.0  # camera.light_jitter with the primitives prior, every colour but white, and
# refine.light_jitter for every colour: the light at the camera (white objects keep the light's spread in the coarse stage)


def build(device, dtype=None, model_id=None, **kwargs):
    from guidance.primitives import PrimitivesPrior

    if model_id is not None:
        raise ValueError(f"model_id must be None for the primitives prior (it has no weights), got {model_id!r}")
    return PrimitivesPrior(device=device, dtype=dtype if dtype is not None else torch.float32, **kwargs)


def settings(config) -> dict:
    prior = config.prior
    return dict(resolution=prior.resolution, renders_per_view=prior.renders_per_view, flat_share=prior.flat_share,
                elevation_sigma=prior.elevation_sigma, camera=config.camera.filled(), ambient=config.coarse.volume.ambient)


def check_prompt(prompt: str) -> None:
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
    white_background = config.prior.background == 1.0  # every colour but white
    grey = "white" if white_background else (config.prior.background,) * 3
    if config.camera.distance_range is None:
        config.camera.distance_range = (CAMERA_DISTANCE, CAMERA_DISTANCE)
    if config.camera.fovy_range is None:
        config.camera.fovy_range = (CAMERA_FOVY, CAMERA_FOVY)
    if config.coarse.background is None:
        config.coarse.background = grey
    if config.refine.background is None:
        config.refine.background = grey
    if config.coarse.volume.ambient is None:
        config.coarse.volume.ambient = PRIOR_AMBIENT
    if config.refine.ambient is None:
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
    if config.refine.sds.texture_guidance_scale is None and white_background:
        # At the shape's CFG the texture saturates; not for white objects, whose texture sinks to grey at 3.
        config.refine.sds.texture_guidance_scale = PRIMITIVES_TEXTURE_GUIDANCE_SCALE
    if config.coarse.lr_network is None and not _achromatic(prompt):
        # Corners and rims beyond the initial blob stay a haze at the default rate; white and gray objects turn dark
        # and break up at this one.
        config.coarse.lr_network = PRIMITIVES_LR_NETWORK
    if config.coarse.background_greys is None:
        # On one background a translucent shell over a dark core can pass for a pale object's shading; on a grey level
        # drawn per step (the prior denoising on the same) no shell does.
        config.coarse.background_greys = PRIMITIVES_BACKGROUND_GREYS
    if config.coarse.greys_until is None:
        # The later steps settle the colour on the libraries' own level (on the levels to the end, a red sphere's
        # text-only run came out dark red).
        config.coarse.greys_until = PRIMITIVES_GREYS_UNTIL
    if config.camera.light_jitter is None:
        # A colour's brightness changes with the light's direction as much as with the albedo: with the light around
        # the camera (the library's renders have the same lights), a darker albedo lit head-on passes for the colour
        # lit from the side, and the field turns translucent or lumpy to match (pale colours most, which are mostly
        # brightness). With the light at the camera the brightness is the albedo's. White objects on their dark
        # background keep the spread in the coarse stage, whose fields of their tori were solid pucks with the light
        # at the camera; their refine stage starts from a surface with its hole and takes the light at the camera.
        if config.refine.light_jitter is None:
            config.refine.light_jitter = PRIMITIVES_LIGHT_JITTER
        if white_background:
            config.camera.light_jitter = PRIMITIVES_LIGHT_JITTER
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


def _achromatic(prompt: str | None) -> bool:
    """Whether the prompt names a white or gray object (no hue for CFG to push the albedo towards)."""
    from guidance.primitive_shapes import parse_prompt

    return prompt is not None and parse_prompt(prompt)[0] in ACHROMATIC


def for_run(model, config):
    return model.with_background(config.prior.background)  # one library serves every background level


def examples() -> list[str]:
    return ["a red cube", "a blue torus", "a green sphere", "a yellow cylinder", "an orange cone", "a purple capsule"]


SPEC = register(GuidanceSpec(
    name="primitives", title="the primitives prior", build=build, settings=settings,
    check_prompt=check_prompt, adapt=adapt_to_primitives, for_run=for_run,
    examples=examples, app_note=" (offline primitives prior: prompts like 'a red cube', 'a blue torus')",
    kept=2,  # one library for the coarse stage's cameras, one for the refine stage's (no pose jitter)
))

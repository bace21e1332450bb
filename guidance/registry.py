"""The guidance models a run can choose: one `GuidanceSpec` each, listed in registration order.

A spec says everything the rest of the project needs to know about a model: how to build it
(`build`, and `settings`: what a run's Config passes to it, which also identifies a loaded one),
which prompts it understands (`check_prompt`), which settings of the run follow from it
(`adapt`), what the app shows for it (examples, a note), and whether it takes a model id. The
app, the command line, the batch and the pipeline list and choose models here and never branch
on a model's name; adding a model is one `register(GuidanceSpec(...))` in the model's own file.
This file holds the mechanism only: each built-in model registers itself, with its own tuning, in
the module `BUILTIN_MODULES` names (imported on the first lookup, so importing this file stays cheap).
Specs take the run's `stages.config.Config` as a plain object (the guidance package sits below the
stages and does not import them).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

AUTO = "auto"  # the choice that picks a model for the device (see `resolve_name`)
AUTO_BY_DEVICE = {"cuda": "stable-diffusion"}  # device type -> the model "auto" picks there
AUTO_FALLBACK = "primitives"  # what "auto" picks on any other device (no GPU: the offline prior)
BUILTIN_MODULES = {  # the built-in models, listed first in this order -> the module that registers each
    "primitives": "guidance.primitives_tuning",
    "stable-diffusion": "guidance.stable_diffusion",
    "deepfloyd-if": "guidance.deepfloyd_if",
}


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
_builtins_loaded = False  # whether the built-in models' modules were imported


def _specs() -> dict[str, GuidanceSpec]:
    """Every registered model: the built-in ones first (importing their modules registers them), then the others
    in registration order."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # first, so that a module that registers while it loads does not recurse
        for module in BUILTIN_MODULES.values():
            importlib.import_module(module)
    builtin = [name for name in BUILTIN_MODULES if name in _SPECS]
    return {name: _SPECS[name] for name in builtin + [name for name in _SPECS if name not in BUILTIN_MODULES]}


def register(spec: GuidanceSpec) -> GuidanceSpec:
    """Add a model (or replace the one of that name); returns the spec."""
    if spec.name == AUTO:
        raise ValueError(f"a guidance model cannot be called {AUTO!r}: that name picks one per device")
    if spec.name not in BUILTIN_MODULES:
        _specs()  # the built-in ones first: a later import of theirs must not replace this one
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a model (tests that registered one of their own)."""
    _specs()
    _SPECS.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered models' names: the built-in ones, then the others in registration order."""
    return tuple(_specs())


def choices() -> tuple[str, ...]:
    """What a user can ask for: "auto" and every registered model."""
    return (AUTO, *_specs())


def get(name: str) -> GuidanceSpec:
    specs = _specs()
    if name not in specs:
        raise ValueError(f"guidance name must be one of {list(specs)}, got {name!r}")
    return specs[name]


def resolve_name(name: str, device: torch.device) -> str:
    """The model a run uses: `name`, or for "auto" the device's choice (Stable Diffusion on CUDA, else primitives)."""
    if name == AUTO:
        return AUTO_BY_DEVICE.get(torch.device(device).type, AUTO_FALLBACK)
    return name



"""One run, resolved once: `resolve(prompt, config) -> RunPlan`.

Every way in (the app, the command line, a batch, `stages.pipeline.generate`) calls `resolve`
at its boundary: it checks the prompt and the config, decides the device and the guidance model
("auto" is decided here and only here), checks the prompt against the model's vocabulary, and
returns a frozen plan with an adapted copy of the config and the refine stage's view of it (its
cameras). Nothing is loaded or written; the caller's config is left as it was. The stages trust
the plan: nothing during a run comes back here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from guidance import registry
from guidance.registry import GuidanceSpec
from renderers.cameras import scale_pose_jitter
from stages.config import Config

MAX_PROMPT_CHARS = 300


class PromptError(ValueError):
    """The prompt cannot be used; the message says why."""


@dataclass(frozen=True)
class RunPlan:
    prompt: str  # stripped, checked against the guidance model's vocabulary
    device: torch.device  # where the run trains ("auto" resolved)
    guidance: GuidanceSpec  # the model ("auto" resolved)
    config: Config  # a copy of the caller's config, adapted to the model and the prompt, seeds set
    refine_config: Config  # `config` as the refine stage sees it (its own cameras); `config` itself when the same

    @property
    def guidance_name(self) -> str:
        return self.guidance.name


def check_prompt(prompt) -> str:
    """The prompt, stripped; raises PromptError for empty, too long or control-character prompts."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be text, got {type(prompt).__name__}")
    text = prompt.strip()
    if not text:
        raise PromptError("prompt is empty: describe the object, e.g. 'a red cube'")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise PromptError("prompt contains control characters (newlines, tabs, ...); use one plain line of text")
    return text


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available; use 'cpu' or 'auto'")
    return device


def resolve_guidance(config: Config, device: torch.device) -> GuidanceSpec:
    """The spec of the model a run with `config` uses on `device` (config.guidance, or "auto"'s choice there)."""
    return registry.get(registry.resolve_name(config.guidance, device))


def resolve(prompt, config: Config) -> RunPlan:
    """Check everything cheap (no model is loaded) and fix the run; raises PromptError,
    UnknownPromptError (the model's vocabulary) or ValueError (the config, the device)."""
    prompt = check_prompt(prompt)
    config.check()
    device = resolve_device(config.device)
    spec = resolve_guidance(config, device)
    spec.check_prompt(prompt)
    adapted = copy.deepcopy(config)
    spec.adapt(adapted, prompt)
    adapted = adapted.filled()  # what the model left unset takes the stages' own values
    adapted.coarse.seed = adapted.refine.seed = adapted.seed  # the run's seed drives every stage
    adapted.check()
    return RunPlan(prompt=prompt, device=device, guidance=spec, config=adapted, refine_config=refine_view(adapted))


def refine_view(config: Config) -> Config:
    """A resolved config as the refine stage sees it: its cameras' pose jitter times `refine.camera_jitter`, and
    its light's spread `refine.light_jitter`. The config itself when that changes nothing; otherwise a copy,
    whose guidance model may differ (the primitives prior's library follows the cameras and the light)."""
    scale, light = config.refine.camera_jitter, config.refine.light_jitter
    scaled = scale is not None and scale != 1.0
    relit = light is not None and light != config.camera.light_jitter
    if not (scaled or relit):
        return config
    view = copy.deepcopy(config)
    if scaled:
        view.camera = scale_pose_jitter(view.camera, scale)
    if relit:
        view.camera.light_jitter = light
    return view


def plan_payload(plan: RunPlan) -> dict:
    """The plan as plain data (prompt, model name, resolved config), to cross into another process (a ZeroGPU
    call pickles its arguments): `plan_from_payload` rebuilds it there without adapting the config again."""
    from stages.config import to_dict

    config = to_dict(plan.config)
    config["guidance"] = plan.guidance_name
    return {"prompt": plan.prompt, "guidance": plan.guidance_name, "config": config}


def plan_from_payload(data: dict, device: str | None = None) -> RunPlan:
    """The plan of `plan_payload(...)`, on `device` (None = the config's own device setting, resolved where this runs)."""
    from stages.config import from_dict

    config = from_dict(data["config"])
    config.check()
    spec = registry.get(data["guidance"])
    return RunPlan(prompt=check_prompt(data["prompt"]), device=resolve_device(device or config.device), guidance=spec,
                   config=config, refine_config=refine_view(config))

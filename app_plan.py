"""From the page's fields to a run's plan: the device and guidance model this server offers, its preset
menu, its model ids, and the checks of every input before a run joins the line.

Plain functions that raise `ValueError` naming what to change; `app.build_plan` turns those into the
page's error.
"""
from __future__ import annotations

import torch

from app_gpu import on_zerogpu
from app_support import check_model_id, int_setting
from guidance import registry
from stages.config import MAX_SEED, PRESETS, apply_overrides, preset
from stages.gpu_budget import GPU_PRESETS, ZEROGPU_CALL_CAP, ZEROGPU_PRESET, check_fits, preset_label
from stages.plan import RunPlan, check_prompt, resolve, resolve_device, resolve_guidance

__all__ = [
    "ADVANCED_LIMITS", "active_device", "default_guidance", "default_preset", "model_id_placeholder",
    "plan_from_inputs", "preset_choices", "preset_info", "server_model_ids",
]

ADVANCED_LIMITS = {  # name: (low, high) accepted from the UI and the API; 0 (or None) = the preset's value
    "coarse_iters": (0, 20000),
    "refine_iters": (0, 20000),
    "texture_size": (0, 4096),
}


def active_device() -> str:
    return resolve_device("auto").type


def default_guidance() -> str:
    return registry.resolve_name(registry.AUTO, torch.device(active_device()))


def default_preset() -> str:
    if on_zerogpu():
        return ZEROGPU_PRESET
    return "quick" if active_device() == "cpu" else "standard"


def preset_choices(guidance: str) -> list:
    """The preset menu: GPU presets marked; on ZeroGPU each with its projected GPU time (and whether it fits)."""
    if on_zerogpu():
        return [(preset_label(name, guidance), name) if name in GPU_PRESETS else name for name in PRESETS]
    return [(f"{name} (GPU)" if name in GPU_PRESETS else name, name) for name in PRESETS]


def preset_info(device: str) -> str | None:
    if on_zerogpu():
        return f"GPU time of a run here; one GPU call may last {ZEROGPU_CALL_CAP} s"
    return "fast, standard and high need a GPU" if device == "cpu" else None


def server_model_ids(values: list[str], overrides: list[str], env: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The server's model id per family from `--model-id [FAMILY=]ID` values, a `--set model_id=...` (obeyed as
    one, not left for each run to overwrite) and DREAMLIFT_MODEL_ID; and the other overrides. A bare id is for
    stable-diffusion. ValueError names a bad value or a family that takes no model id."""
    model_ids = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "model_id" and "=" in o]
    rest = [o for o in overrides if o.split("=", 1)[0].strip() != "model_id"]
    ids = {}
    for value in ([env] if env and env.strip() else []) + list(values) + model_ids:
        family, sep, model_id = value.partition("=")
        if not sep or family.strip() not in registry.names():
            family, model_id = "stable-diffusion", value  # a bare id (a hub id or a path may hold "=")
        family, model_id = family.strip(), model_id.strip()
        if not registry.get(family).takes_model_id:
            with_ids = ", ".join(n for n in registry.names() if registry.get(n).takes_model_id)
            raise ValueError(f"--model-id: {family} has no weights, so it takes no model id (families with one: {with_ids})")
        if not model_id or len(model_id) > 300 or any(ord(c) < 32 for c in model_id):
            raise ValueError(f"--model-id expects [FAMILY=]ID with a one-line id, got {value!r}")
        ids[family] = model_id
    return ids, rest


def model_id_placeholder(model_ids: dict[str, str]) -> str:
    if not model_ids:
        return "empty = the guidance model's default"
    return "empty = this server's: " + ", ".join(f"{family} {model_id}" for family, model_id in model_ids.items())


def plan_from_inputs(
    prompt, preset_name, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id,
    overrides: list[str],  # the server's --set overrides, applied to every run
    model_ids: dict[str, str],  # the server's model id per guidance family
) -> RunPlan:
    """The run's plan from the page's (or the API's) fields; ValueError naming what to change."""
    config = apply_overrides(preset(preset_name), overrides)  # preset() names a bad preset
    if preset_name in GPU_PRESETS and resolve_device(config.device).type == "cpu" and not on_zerogpu():
        raise ValueError(f"{preset_name} is a GPU preset (hours of work on this server, which has no GPU): "
                         "choose quick in the Preset menu")
    config.seed = int_setting("seed", seed, 0, MAX_SEED)
    config.guidance, config.stop_after = guidance, stop_after
    advanced = {"coarse_iters": coarse_iters, "refine_iters": refine_iters, "texture_size": texture_size}
    for name, value in advanced.items():
        advanced[name] = 0 if value is None else int_setting(name, value, *ADVANCED_LIMITS[name])
    config.coarse.iters = advanced["coarse_iters"] or config.coarse.iters
    config.refine.iters = advanced["refine_iters"] or config.refine.iters
    if 0 < advanced["texture_size"] < 64:
        raise ValueError(f"texture_size must be 0 (the preset's) or in [64, 4096], got {advanced['texture_size']}")
    config.export.texture_size = advanced["texture_size"] or config.export.texture_size
    # The prompt, the config (guidance and stop_after included), the device, the model id, the model's vocabulary.
    check_prompt(prompt)
    config.check()
    spec = resolve_guidance(config, resolve_device(config.device))
    config.model_id = check_model_id(model_id, spec) or model_ids.get(spec.name)
    plan = resolve(prompt, config)
    if on_zerogpu():  # every GPU call must fit the host's cap: refused here, before any GPU time is taken
        check_fits(plan.config, plan.guidance_name)
    return plan

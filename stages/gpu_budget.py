"""What a run asks of a ZeroGPU Space: the seconds each GPU call requests, whether a run fits, and the rates
this host measured.

On ZeroGPU each `@spaces.GPU` call asks up front for a duration that must stay under the per-call cap and
is charged to the visitor's daily quota; a run makes one call per SDS stage (`app_gpu.hosted_events`).
A call asks for the upper end of `stages.gpu_cost`'s estimate (its steps at this host's measured rate,
`CALIBRATION`, plus its start and the model load, times the model's uncertainty); a run with a call over
the cap is refused before any GPU time is taken, naming the preset that fits.
"""
from __future__ import annotations

import dataclasses
import math

from stages.gpu_cost import CARDS, UNCERTAINTY, run_gpu_seconds, stage_calls

ZEROGPU_CALL_CAP = 300  # seconds one ZeroGPU call may ask for (signed-in visitors; anonymous ones get less)
ZEROGPU_QUOTAS = {"anonymous visitor": 120, "free account": 210, "PRO account": 1500}  # daily GPU seconds (documented)
CALIBRATION: dict[tuple[str, str], float] = {}  # (guidance, stage) -> this host's measured / modelled s per step
CALIBRATION_RANGE = (0.5, 4.0)  # a ratio outside is clipped: one odd call does not set the requests
CALIBRATION_MIN_STEPS = 5  # steps a call must report for its rate to count
ZEROGPU_PRESET = "fast"  # the default preset on a ZeroGPU Space: sized so that one run fits an anonymous quota
GPU_PRESETS = ("fast", "standard", "high")  # presets sized for a GPU (hours on a CPU)
# GPU-cost factors per guidance model against Stable Diffusion 2.1 base: (diffusion model, VAE in the loop).
# DeepFloyd IF stage I (4.3 B parameters, 64 px pixels, no VAE) runs its UNet about 2.5x as long per image.
MODEL_COST = {"stable-diffusion": (1.0, True), "deepfloyd-if": (2.5, False), "primitives": (0.05, False)}


def _card(guidance: str):
    card = CARDS["zerogpu"]
    factor, latent = MODEL_COST.get(guidance, (1.0, True))
    return dataclasses.replace(card, unet_image=card.unet_image * factor), latent


def call_requests(config, guidance: str) -> list[tuple[str, int]]:
    """(stage, seconds asked for) of each GPU call a run of `config` makes on ZeroGPU: the model's steps times
    this host's measured ratio (`CALIBRATION`), plus the call's start and model load, times the margin."""
    card, latent = _card(guidance)
    requests = []
    for call in stage_calls(config, card, latent):
        ratio = CALIBRATION.get((guidance, call.stage), 1.0)
        requests.append((call.stage, math.ceil(UNCERTAINTY * (call.steps * ratio + call.overhead))))
    return requests


def modelled_step_seconds(config, guidance: str, stage: str) -> float:
    card, latent = _card(guidance)
    call = next(c for c in stage_calls(config, card, latent) if c.stage == stage)
    return call.steps / max(getattr(config, stage).iters, 1)


def calibrate(guidance: str, stage: str, config, steps: list[tuple[int, float]]) -> float | None:
    """Learn this host's seconds per step of `stage` against the model's from a call's (step, arrival time)
    reports (the first two, warm-up, left out); the next requests use the ratio. Returns it, or None when
    the call reported too few steps to tell."""
    steps = [(n, t) for n, t in steps if n >= 2]
    if len(steps) < 2 or steps[-1][0] - steps[0][0] < CALIBRATION_MIN_STEPS:
        return None
    measured = (steps[-1][1] - steps[0][1]) / (steps[-1][0] - steps[0][0])
    low, high = CALIBRATION_RANGE
    ratio = min(max(measured / modelled_step_seconds(config, guidance, stage), low), high)
    CALIBRATION[(guidance, stage)] = ratio
    return ratio


def projected_seconds(config, guidance: str) -> float:
    """The run's GPU seconds on ZeroGPU (central estimate, model loads left out)."""
    card, latent = _card(guidance)
    return run_gpu_seconds(config, card, latent)


def request_seconds(payload: dict, run_dir: str, stage: str, first: bool) -> int:
    """`duration` of a stage call (spaces.GPU evaluates it with the call's own arguments): never over the cap."""
    from stages.config import from_dict

    requests = dict(call_requests(from_dict(payload["config"]), payload["guidance"]))
    return min(requests.get(stage, ZEROGPU_CALL_CAP), ZEROGPU_CALL_CAP)


def check_fits(config, guidance: str) -> None:
    """ValueError naming the preset that fits when a call of this run would ask ZeroGPU for more than the cap."""
    requests = call_requests(config, guidance)
    over = [(stage, s) for stage, s in requests if s > ZEROGPU_CALL_CAP]
    if not over:
        return
    stage, seconds = max(over, key=lambda item: item[1])
    raise ValueError(
        f"this run does not fit a ZeroGPU Space: its {stage} stage would ask for {seconds} s of GPU time in one call "
        f"(the limit is {ZEROGPU_CALL_CAP} s per call; the whole {config.preset} run projects to "
        f"{_minutes(projected_seconds(config, guidance))} of GPU); choose the '{ZEROGPU_PRESET}' preset "
        f"(about {_minutes(projected_seconds(_preset(ZEROGPU_PRESET, config), guidance))}) or fewer steps")


def _preset(name: str, like=None):
    from stages.config import preset

    config = preset(name)
    if like is not None:
        config.stop_after = like.stop_after
    return config


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def preset_label(name: str, guidance: str) -> str:
    """The preset menu's label on ZeroGPU: the projected GPU time, and why a preset cannot run."""
    config = _preset(name)
    seconds = projected_seconds(config, guidance)
    worst = max(s for _, s in call_requests(config, guidance))
    fits = worst <= ZEROGPU_CALL_CAP
    return f"{name} (~{_minutes(seconds)} GPU" + (")" if fits else ", too long here)")

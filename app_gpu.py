"""Where the app's runs get their GPU: in this process, or on a ZeroGPU Space, one GPU call per SDS stage.

On ZeroGPU (`SPACES_ZERO_GPU=true`, set by Hugging Face) each `@spaces.GPU` call runs in a forked worker
process: its arguments and each value it yields are pickled, it asks up front for a duration (seconds) that
must stay under the per-call cap and is charged to the visitor's daily quota, and CUDA exists only inside it.
So a run there is a chain of calls that share nothing but plain data and the run folder:

    coarse (GPU call) -> coarse.pt -> refine (GPU call) -> refine.pt -> export (this process, on the CPU)

Each call gets the resolved plan as plain data (`stages.plan.plan_payload`) and the run folder's path,
starts from the folder's checkpoints, and yields the pipeline's progress events; a failure or a cancel
comes back as an event (the host would reduce an exception to its class name). A cancel reaches the
worker as a file in the run folder (`stages.runs.request_stop`), which the stage loops check each step.
Each call asks for the upper end of `stages.gpu_cost`'s estimate; a run with a call over the cap is
refused before any GPU time is taken, naming the preset that fits.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

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


def on_zerogpu() -> bool:
    """Whether this server runs on a ZeroGPU Space (the variable the `spaces` package reads)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


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


def stage_call(payload: dict, run_dir: str, stage: str, first: bool):
    """One SDS stage of a run, in whatever process the host gives it (a ZeroGPU worker): its progress
    events, and at the end a "paused" event, or one "cancelled" / "failed" event with the message."""
    from stages.common import Cancelled
    from stages.pipeline import ProgressEvent, run_plan
    from stages.plan import plan_from_payload

    try:
        plan = plan_from_payload(payload)
        yield from run_plan(plan, run_dir=run_dir, resume=not first, stages=(stage,))
    except Cancelled as exc:
        yield ProgressEvent(stage="cancelled", message=str(exc), run_dir=run_dir)
    except Exception as exc:  # noqa: BLE001 - the host would keep only the class name
        yield ProgressEvent(stage="failed", message=" ".join(str(exc).split()) or type(exc).__name__, run_dir=run_dir)


def _decorate(fn):
    try:
        import spaces
    except Exception:  # pragma: no cover - spaces missing or broken: no ZeroGPU
        return fn
    return spaces.GPU(duration=request_seconds)(fn)


gpu_stage_call = _decorate(stage_call)  # the same function where `spaces` is a no-op (not on ZeroGPU)


def hosted_events(plan, run_dir: str, should_stop):
    """A run as ZeroGPU needs it: a GPU call per SDS stage, then the export in this process on the CPU.
    Yields the pipeline's events; raises Cancelled on a cancel and RuntimeError with the message on a failure."""
    from stages.common import Cancelled, check_stop
    from stages.pipeline import run_plan
    from stages.plan import plan_from_payload, plan_payload
    from stages.runs import fail_record, load_record

    start = time.perf_counter()
    payload = plan_payload(plan)
    calls = [stage for stage, _ in call_requests(plan.config, plan.guidance_name)]
    for i, stage in enumerate(calls):
        check_stop(should_stop, stage, 0)
        steps: list[tuple[int, float]] = []  # (step, arrival) of the call's step reports: its rate on this host
        try:
            for event in gpu_stage_call(payload, run_dir, stage, i == 0):
                if event.stage == stage and event.total and event.step:
                    steps.append((event.step, time.perf_counter()))
                if event.stage == "cancelled":
                    raise Cancelled(event.message)
                if event.stage == "failed":
                    raise RuntimeError(event.message)
                if event.stage != "paused":
                    event.elapsed = time.perf_counter() - start  # the run's time, not the call's
                    yield event
        except (Cancelled, RuntimeError):
            raise
        except Exception as exc:  # the host ended the call (past its request, a worker error): say so in run.json
            message = f"the {stage} stage's GPU call was ended by the host ({' '.join(str(exc).split()) or type(exc).__name__})"
            try:
                record = load_record(run_dir)
                if record.get("status") == "running":
                    fail_record(record, Path(run_dir), "failed", message)
            except (OSError, ValueError):
                pass
            raise RuntimeError(message) from exc
        finally:
            calibrate(plan.guidance_name, stage, plan.config, steps)
    check_stop(should_stop, "export", 0)
    for event in run_plan(plan_from_payload(payload, device="cpu"), run_dir=run_dir, resume=True, stages=("export",),
                          should_stop=should_stop):
        event.elapsed = time.perf_counter() - start
        yield event

"""What every stage shares: progress events, cancellation, errors, timing and input checks."""
from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor


@dataclass
class StepEvent:
    """One report of a stage's progress, sent to the caller's callback."""

    stage: str  # "coarse", "refine" or "export"
    step: int  # steps done so far (1-based after the first step)
    total: int  # steps the stage will take
    loss: float | None = None  # the step's total loss
    preview: np.ndarray | None = None  # [H, W, 3] uint8 image, when one was rendered this step
    message: str = ""  # a short human-readable line
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent per part of the step
    model: str | None = None  # path of an intermediate GLB written this step (`stages.live_models`), for the viewer
    model_label: str = ""  # what that model is: "coarse surface", "refine step 200 (vertex colours)"


Callback = Callable[[StepEvent], None]
StopCheck = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked the run to stop (the app's Cancel button)."""


class StageError(RuntimeError):
    """A stage failed at a known step; the message names the stage, the step and the cause."""

    def __init__(self, stage: str, step: int | None, cause: str):
        where = f"{stage} stage failed" + (f" at step {step}" if step is not None else "")
        super().__init__(f"{where}: {cause}")
        self.stage, self.step, self.cause = stage, step, cause


def check_stop(should_stop: StopCheck | None, stage: str, step: int) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled(f"{stage} stage cancelled at step {step}")


def to_uint8(image: Tensor) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> [H, W, 3] uint8."""
    return (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def clock(device: torch.device) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def check_stage_inputs(prompt, config, camera, device) -> torch.device:
    """What every stage's `run` checks first: a non-empty prompt, its config and the cameras."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    config.check()
    camera.check()
    return torch.device(device)


def release_free_memory(device: torch.device | None = None) -> None:
    """Collect garbage and hand freed memory back: glibc's heap pages to the OS (malloc_trim),
    CUDA's cached blocks to the driver. A long-lived server then stays near its size after one
    run, and an RSS rise in the benchmarks measures the stage that follows."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

"""What every stage shares: progress events, cancellation, and turning tensors into preview images."""
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


def image_grid(images: Tensor, columns: int | None = None) -> np.ndarray:
    """[N, H, W, 3] float in [0, 1] -> one [rows*H, columns*W, 3] uint8 mosaic."""
    n, h, w, c = images.shape
    columns = columns or n
    rows = (n + columns - 1) // columns
    canvas = torch.ones(rows * h, columns * w, c, dtype=images.dtype, device=images.device)
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return to_uint8(canvas)


def colour_and_shape(
    rgb: Tensor,  # [V, H, W, 3] in [0, 1]
    normal: Tensor,  # [V, H, W, 3] world normals, any length (0 off the object)
    alpha: Tensor,  # [V, H, W, 1] coverage in [0, 1]
) -> np.ndarray:  # [2H, V*W, 3] uint8
    """Orbit views as a person judges them: colour in the top row, shape below it (normals as colours,
    (n + 1) / 2, over white, as the reference implementations' validation images show them)."""
    n = torch.nn.functional.normalize(normal.to(rgb.dtype), dim=-1)
    shape = (n + 1) / 2 * alpha + (1 - alpha)
    return image_grid(torch.cat([rgb, shape]), columns=rgb.shape[0])


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


class NonFiniteSteps:
    """Steps skipped because the SDS gradient, the loss or a parameter gradient was NaN or inf
    (an fp16 overflow now and then is survivable); `limit` of them in a row end the stage."""

    def __init__(self, stage: str, limit: int):
        self.stage, self.limit = stage, limit
        self.skipped = 0  # steps skipped in all
        self.in_a_row = 0  # skipped since the last good step

    def skip(self, step: int, total: int, reason: Exception, optimizer: torch.optim.Optimizer,
             callback: Callback | None) -> None:
        """Drop the step's gradients (no update), count it (`step` is 1-based) and report it; raises
        StageError once `limit` came in a row."""
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise StageError(self.stage, step, f"{reason}; {self.in_a_row} steps in a row were not finite "
                                               "(lower the learning rates or the guidance scale, or set model_dtype=bf16/fp32)") from reason
        if callback is not None:
            callback(StepEvent(stage=self.stage, step=step, total=total,
                               message=f"{self.stage} step {step}/{total} skipped: {reason}"))

    def good(self) -> None:
        self.in_a_row = 0

    def finish(self, total: int) -> None:
        """At the end of the stage: StageError when not one of its `total` steps was finite (a stage
        shorter than `limit` would otherwise hand on an untrained result)."""
        if total > 0 and self.skipped == total:
            raise StageError(self.stage, total, f"all {total} steps were not finite (lower the learning "
                                                "rates or the guidance scale, or set model_dtype=bf16/fp32)")


def backward_finite(loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
    """loss.backward(); NonFiniteError when the loss or any parameter gradient is NaN or inf
    (the gradients are checked in one reduction, one device sync)."""
    from guidance.sds import NonFiniteError

    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is not finite ({float(loss)})")
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        raise NonFiniteError("non-finite parameter gradients")

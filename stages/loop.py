"""The SDS training loop both stages run: `run_loop(stage, config, optimizer, step, preview, ...)`.

Each step: the stop check, zero_grad, the stage's step function (renders and builds the loss of step
i), backward with the non-finite check, the optimizer step, then the report: a preview every
`preview_every` steps and at the end, an intermediate model every `model_every` steps, and one
`StepEvent`. A step whose loss or gradients are NaN or inf is skipped (`NonFiniteSteps`).

`should_stop` is the one stop check: the pipeline's covers the caller's flag and the run folder's
`STOP_FILE` (`stages.runs.stop_requested`), so a cancel from another process lands within a step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from guidance.sds import NonFiniteError
from stages.common import Callback, StageError, StepEvent, StopCheck, check_stop, clock

# Instant-NGP's Adam for hash grids, used for every SDS parameter group.
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-15  # table entries that rays rarely reach get tiny gradients; a larger eps would hold them still


def adam(groups: list[dict]) -> torch.optim.Adam:
    """The SDS stages' optimizer over their parameter groups (each with its own "lr")."""
    return torch.optim.Adam(groups, betas=ADAM_BETAS, eps=ADAM_EPS)


class Timer:
    """Seconds per named part of one step: `mark(part)` adds the time since the last mark (or `start`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = {}
        self.start()

    def start(self) -> None:
        self.last = clock(self.device)

    def mark(self, part: str) -> None:
        now = clock(self.device)
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


@dataclass
class Step:
    """What a stage's step function hands the loop for step i."""

    loss: Tensor  # the total loss to minimise (a scalar with a graph to the parameters)
    message: Callable[[float], str]  # the step's event line, given its loss value
    finish_grads: Callable[[], None] | None = None  # gradient work after backward (may raise NonFiniteError)
    view: Any = None  # what the step rendered, for the preview and model functions (refine: its mesh)


@dataclass
class LoopResult:
    loss: float  # the last finite step's loss (NaN when none was)
    totals: dict[str, float]  # seconds per timing part, summed over the finite steps
    previews: list[np.ndarray] = field(default_factory=list)  # [H, W, 3] uint8 mosaics, in order
    preview_seconds: float = 0.0  # spent on previews, not training
    model_seconds: float = 0.0  # spent on intermediate models
    nonfinite_skipped: int = 0  # steps skipped for NaN / inf


def run_loop(
    stage: str,  # "coarse" or "refine": named in events and errors
    config,  # the stage's config: iters, preview_every, max_nonfinite_steps
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    step: Callable[[int, Timer], Step],  # builds step i's loss; marks its own timing parts on the Timer
    preview: Callable[[Step], np.ndarray],  # the current result's mosaic
    parts: tuple[str, ...],  # the timing parts, in order: the step function's, then "backward" and `update_part`
    callback: Callback | None = None,
    should_stop: StopCheck | None = None,
    after_update: Callable[[int], None] | None = None,  # after the optimizer step of step i (inside its timing)
    model: Callable[[int, Step], tuple[str, str]] | None = None,  # step i -> an intermediate model (path, label)
    model_every: int = 0,  # steps between intermediate models (0 = none; never at the last step)
    update_part: str = "optimizer",  # the timing part of the optimizer step and `after_update`
) -> LoopResult:
    """Train for `config.iters` steps; see the module docstring. Raises Cancelled on a stop, StageError
    when `config.max_nonfinite_steps` steps in a row (or all steps) were not finite."""
    iters = config.iters
    result = LoopResult(loss=float("nan"), totals=dict.fromkeys(parts, 0.0))
    nonfinite = NonFiniteSteps(stage, config.max_nonfinite_steps)
    for i in range(iters):
        check_stop(should_stop, stage, i)
        timer = Timer(device)
        optimizer.zero_grad(set_to_none=True)
        try:
            out = step(i, timer)
            backward_finite(out.loss, optimizer)
            if out.finish_grads is not None:
                out.finish_grads()
        except NonFiniteError as exc:  # skip the step: no update
            nonfinite.skip(i + 1, iters, exc, optimizer, callback)
            continue
        nonfinite.good()
        timer.mark("backward")
        optimizer.step()
        if after_update is not None:
            after_update(i)
        timer.mark(update_part)
        for key, seconds in timer.parts.items():
            result.totals[key] += seconds
        result.loss = float(out.loss.detach())

        last = i == iters - 1
        image = path = None
        label = ""
        if last or (config.preview_every > 0 and (i + 1) % config.preview_every == 0):
            t = clock(device)
            image = preview(out)
            result.preview_seconds += clock(device) - t
            result.previews.append(image)
        if model is not None and not last and model_every > 0 and (i + 1) % model_every == 0:
            t = clock(device)  # the last step's result is handed on right after: no model of it here
            path, label = model(i, out)
            result.model_seconds += clock(device) - t
        if callback is not None:
            callback(StepEvent(stage=stage, step=i + 1, total=iters, loss=result.loss, preview=image,
                               message=out.message(result.loss), timings=timer.parts, model=path, model_label=label))
    nonfinite.finish(iters)
    result.nonfinite_skipped = nonfinite.skipped
    return result


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
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss is not finite ({float(loss.detach())})")
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        raise NonFiniteError("non-finite parameter gradients")

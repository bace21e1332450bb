"""The pipeline: prompt -> guidance -> coarse NeRF -> DMTet refine -> export, as one generator of events.

`generate(prompt, config)` runs every stage in-process, in a worker thread, and yields
`ProgressEvent`s (stage, step, total, loss, preview, message, and at the end the output
paths). Closing the generator (or `should_stop()` returning True) cancels the run within a
step. The run is checked and fixed once, by `stages.plan.resolve`; it runs on its device's one
worker thread with the guidance model `stages.workers` keeps (runs on a device never overlap).
Each run writes only inside its own folder (`stages.runs`): the export files, `run.json` and a
checkpoint after each stage, from which `resume` continues.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from stages import coarse as coarse_stage
from stages import export as export_stage
from stages import refine as refine_stage
from stages.common import Cancelled, StageError, StepEvent, check_stop, release_free_memory
from stages.config import STAGES, Config, to_dict
from stages.live_models import LiveModels
from stages.run_facts import device_facts, guidance_facts, peak_memory, reset_peak_memory
from stages.plan import RunPlan, resolve
from stages.runs import (
    CHECKPOINTS, RunRecord, has_checkpoint, load_coarse_checkpoint, load_refine_checkpoint,
    new_run_dir, package_versions, save_coarse_checkpoint, save_refine_checkpoint, stop_requested,
)
from stages.workers import count_pending, device_worker, guidance_for, guidance_loaded, stage_config


@dataclass
class ProgressEvent:
    stage: str  # "setup", "coarse", "refine", "export" or "done"
    step: int = 0  # steps done in this stage
    total: int = 0  # steps of this stage
    loss: float | None = None  # the step's loss
    preview: np.ndarray | None = None  # [H, W, 3] uint8, when the stage rendered one
    message: str = ""  # a human-readable status line
    elapsed: float = 0.0  # seconds since the run started
    stage_eta: float | None = None  # estimated seconds left in this stage
    run_dir: str = ""  # the run's folder
    paths: dict | None = None  # the output files, in the final "done" event
    model: str | None = None  # an intermediate GLB for the viewer (coarse surface, refine mesh), when one was written
    model_label: str = ""  # what that model is, e.g. "coarse surface"


def generate(
    prompt: str,
    config: Config,
    out_root: str | os.PathLike = "outputs",
    run_dir: str | os.PathLike | None = None,
    should_stop=None,
    resume: bool = False,
    close_wait: float = 30.0,
) -> Iterator[ProgressEvent]:
    """Run the pipeline, yielding progress events; see the module docstring.

    Input errors (prompt, config, vocabulary, device) are raised before anything is written.
    A failure in a stage is re-raised after run.json records it; a cancel raises Cancelled.
    `close_wait`: seconds that closing the generator early waits for the worker to stop (the
    app, whose event loop closes it, passes a short one; the next run waits for the device anyway).
    """
    # 1. Check inputs before touching the disk.
    yield from run_plan(resolve(prompt, config), out_root, run_dir, should_stop, resume, close_wait)


def run_plan(
    plan: RunPlan,
    out_root: str | os.PathLike = "outputs",
    run_dir: str | os.PathLike | None = None,
    should_stop=None,
    resume: bool = False,
    close_wait: float = 30.0,
    stages: tuple[str, ...] | None = None,
) -> Iterator[ProgressEvent]:
    """`generate` for a plan that `resolve` made (a caller that resolved it already).

    `stages`: the stages this call may run (None = all that are left). A host that gives each stage
    its own process (ZeroGPU: one GPU call per SDS stage, the export outside) calls it once per stage
    with `resume=True`; each call starts from the run folder's checkpoints and ends with a "paused"
    event until the export has run. Writing `STOP_FILE` into the run folder cancels the run in any process.
    """
    # 1. The run's folder: checked (resume) before anything is written.
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir, the folder of the run to continue")
        RunRecord.load(run_dir)  # raises when run_dir is not a run folder
    run_path = Path(run_dir) if run_dir is not None else new_run_dir(out_root, plan.prompt, plan.config.seed)
    run_path.mkdir(parents=True, exist_ok=True)

    # 2. Run the stages on the device's worker thread; hand its events to the caller as they come.
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def stopped() -> bool:
        return stop.is_set() or (should_stop is not None and should_stop()) or stop_requested(run_path)

    device = plan.device
    if count_pending(device, +1):
        events.put(ProgressEvent(stage="setup", message=f"waiting for the previous run on {device} to stop",
                                 run_dir=str(run_path)))
    try:
        task = device_worker(device).submit(_worker, plan, run_path, events, stopped, resume, stages)
    except RuntimeError:  # the interpreter is shutting down
        count_pending(device, -1)
        raise
    try:
        while True:
            try:
                item = events.get(timeout=1.0)
            except queue.Empty:
                if task.done() and events.empty():  # cannot happen unless _worker itself is broken
                    raise RuntimeError("the run's worker ended without a result") from task.exception()
                continue
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item
    finally:
        stop.set()  # the consumer went away (cancel) or the run ended
        futures.wait([task], timeout=close_wait)


def _worker(plan: RunPlan, run_path: Path, events: queue.Queue, stopped, resume: bool, stages=None) -> None:
    """Run on the device's worker thread; every outcome ends in `events` (None, or an exception)."""
    start = time.perf_counter()
    record = RunRecord()
    state = {"stage": "setup", "stage_start": time.perf_counter()}

    def emit(event: ProgressEvent) -> None:
        event.elapsed = time.perf_counter() - start
        event.run_dir = str(run_path)
        events.put(event)

    try:
        config = plan.config
        if resume:
            record = RunRecord.load(run_path)
        record.prompt, record.seed, record.preset = plan.prompt, config.seed, config.preset
        record.guidance, record.model_id, record.config = plan.guidance_name, config.model_id, to_dict(config)
        record.packages, record.status, record.ended_at = package_versions(), "running", None
        if stages != ("export",):  # where it trains (a host's export-only call runs on the CPU: not recorded)
            record.device = str(plan.device)
            record.device_facts = device_facts(plan.device, config.refine.backend)
        if stages is None:  # epoch seconds: when the run got the device (a host's later stage calls keep the first)
            record.started_at = None
        record.save(run_path)
        check_stop(stopped, "setup", 0)  # cancelled while it waited for the device
        record.started_at = record.started_at or time.time()
        paths = _run_stages(plan, run_path, record, state, emit, stopped, stages)
        if paths is None:  # this call's stages are done; a later call runs the rest
            record.stage_calls += 1
            record.save(run_path)
            emit(ProgressEvent(stage="paused", message=f"{', '.join(record.finished_stages)} finished"))
            events.put(None)
            return
        total = time.perf_counter() - start if stages is None else time.time() - record.started_at
        record.status, record.outputs, record.total_seconds, record.ended_at = "finished", paths, total, time.time()
        record.save(run_path)
        emit(ProgressEvent(stage="done", message=f"done in {total:.0f} s", paths=paths))
        events.put(None)
    except Cancelled as exc:
        record.end(run_path, "cancelled", str(exc))
        events.put(_detached(exc))
    except BaseException as exc:  # recorded in run.json, then handed to the consumer
        trace = traceback.format_exc()
        exc = _explain(exc, state["stage"])
        record.end(run_path, "failed", str(exc), trace)
        events.put(_detached(exc))
    finally:
        # The stages' tensors died with _run_stages' frame (and the detached tracebacks): hand their memory back.
        release_free_memory(plan.device)
        count_pending(plan.device, -1)


def _run_stages(plan: RunPlan, run_path: Path, record: RunRecord, state: dict, emit, stopped, stages=None) -> dict | None:
    """Train and export; returns the output paths, or None when `stages` (those this call may run; None =
    all) left the export to a later call. Checkpoints and run.json are written after each stage."""
    prompt, config, device = plan.prompt, plan.config, plan.device
    allowed = set(STAGES if stages is None else stages)
    unknown = allowed - set(STAGES)
    if unknown:
        raise ValueError(f"stages must be among {list(STAGES)}, got {sorted(unknown)}")

    def on_step(e: StepEvent) -> None:
        spent = time.perf_counter() - state["stage_start"]
        eta = spent / e.step * (e.total - e.step) if e.step else None
        emit(ProgressEvent(stage=e.stage, step=e.step, total=e.total, loss=e.loss, preview=e.preview,
                           message=e.message, stage_eta=eta, model=e.model, model_label=e.model_label))

    def guidance_model(stage: str):
        seen = stage_config(plan, stage)  # the refine stage's cameras may differ, and with them its model
        if stage == "coarse" or not guidance_loaded(plan, stage):
            why = "for the refine stage's cameras" if seen is not config else f"on {device}"
            emit(ProgressEvent(stage="setup" if stage == "coarse" else stage,
                               message=f"loading the {plan.guidance_name} guidance model {why}"))
        model = guidance_for(plan, stage)
        record.guidance_facts[stage] = guidance_facts(model, seen)
        check_stop(stopped, "setup", 0)  # loading can take a while; a cancel may have come meanwhile
        reset_peak_memory(device)
        return model

    def not_here(stage: str):
        return StageError(stage, None, f"the {stage} stage is not finished, and this call may run only "
                                       f"{sorted(allowed)}; run the stages in order")

    # Stage 1: coarse NeRF.
    if has_checkpoint(record, run_path, "coarse"):
        field = load_coarse_checkpoint(run_path / CHECKPOINTS["coarse"], device)
        if "coarse" in allowed:
            emit(ProgressEvent(stage="coarse", message="coarse stage restored from its checkpoint"))
    elif "coarse" not in allowed:
        raise not_here("coarse")
    else:
        guidance = guidance_model("coarse")
        state.update(stage="coarse", stage_start=time.perf_counter())
        result = coarse_stage.run(guidance, prompt, config.coarse, config.camera, device, on_step, stopped,
                                  live=LiveModels.for_run(run_path, config.refine))
        field = result.field
        save_coarse_checkpoint(field, run_path)
        record.peak_memory["coarse"] = peak_memory(device)
        _finish_stage(record, "coarse", state, run_path, result.stats)
        if not allowed & {"refine", "export"}:
            return None

    # Stage 2: DMTet refine (or the coarse field's mesh when stopping after stage 1).
    if config.stop_after == "coarse":
        if "export" not in allowed:
            return None
        mesh, color_field = coarse_stage.surface_mesh(field, config.refine, device), field
    elif has_checkpoint(record, run_path, "refine"):
        mesh, color_field = load_refine_checkpoint(run_path / CHECKPOINTS["refine"], device)
        if "refine" in allowed:
            emit(ProgressEvent(stage="refine", message="refine stage restored from its checkpoint"))
    elif "refine" not in allowed:
        raise not_here("refine")
    else:
        guidance = guidance_model("refine")
        state.update(stage="refine", stage_start=time.perf_counter())
        check_stop(stopped, "refine", 0)
        result = refine_stage.run(field, guidance, prompt, config.refine, plan.refine_config.camera, device, on_step,
                                  stopped, live=LiveModels.for_run(run_path, config.refine))
        mesh, color_field = (result.vertices, result.faces), result.color_field
        save_refine_checkpoint(result.vertices, result.faces, color_field, run_path)
        record.peak_memory["refine"] = peak_memory(device)
        _finish_stage(record, "refine", state, run_path, result.stats)
    if mesh[1].shape[0] == 0:
        raise StageError(state["stage"], 0, "the result has no surface (empty mesh); try another seed or more steps")
    if "export" not in allowed:
        return None

    # Stage 3: export.
    state.update(stage="export", stage_start=time.perf_counter())

    def albedo(points):
        with torch.no_grad():
            return color_field.albedo(points)

    exported = export_stage.export(mesh[0], mesh[1], albedo, run_path, config.export, on_step, stopped)
    _finish_stage(record, "export", state, run_path, {"timings": exported.timings, "faces": exported.num_faces,
                                                       "dropped_shells": exported.dropped_shells,
                                                       "short_edges": exported.short_edges})
    return {k: str(v) for k, v in exported.paths.items() if v is not None}


def _detached(exc: BaseException) -> BaseException:
    """The exception with no tracebacks along its chain: their frames would keep the run's tensors
    alive in the consumer (run.json keeps the traceback text)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += [e.__cause__, e.__context__]
    return exc


def _explain(exc: BaseException, stage: str) -> BaseException:
    """Runtime failures get the stage's name and, for out-of-memory, the settings to lower."""
    from guidance import GuidanceLoadError

    if isinstance(exc, (StageError, GuidanceLoadError, ValueError, KeyboardInterrupt, SystemExit)):
        return exc
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        hint = {
            "coarse": "lower coarse.resolution, coarse.batch_size or set coarse.volume.chunk_size (e.g. 4096)",
            "refine": "lower refine.resolution, refine.batch_size or refine.grid_resolution, or set refine.chunk_size",
            "export": "lower export.texture_size or export.target_faces",
        }.get(stage, "use a smaller preset")
        return StageError(stage, None, f"out of memory; {hint}, or use the 'quick' preset")
    if isinstance(exc, RuntimeError):
        return StageError(stage, None, text)
    return exc


def _finish_stage(record: RunRecord, stage: str, state: dict, run_path: Path, stats: dict) -> None:
    record.finish_stage(stage, time.perf_counter() - state["stage_start"], stats)
    record.save(run_path)


def run_to_completion(prompt: str, config: Config, **kwargs) -> ProgressEvent:
    """Drain `generate` and return its final event (scripts and tests)."""
    last = None
    for event in generate(prompt, config, **kwargs):
        last = event
    return last

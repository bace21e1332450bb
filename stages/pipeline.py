"""The pipeline: prompt -> guidance -> coarse NeRF -> DMTet refine -> export, as one generator of events.

`generate(prompt, config)` runs every stage in-process, in a worker thread, and yields
`ProgressEvent`s (stage, step, total, loss, preview, message, and at the end the output
paths). Closing the generator (or `should_stop()` returning True) cancels the run within a
step. Each device has one long-lived worker thread: runs there never overlap (a run waits
until the previous one has stopped), and the memory one run frees is reused by the next
(a fresh thread per run would leave it fragmented over the allocator's per-thread arenas).
Each run writes only inside its own folder: the export files, `run.json` and a checkpoint
after each stage, from which `resume` continues.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import queue
import threading
import time
import traceback
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from stages import coarse as coarse_stage
from stages import export as export_stage
from stages import refine as refine_stage
from stages.common import Cancelled, StageError, StepEvent, check_stop, release_free_memory
from stages.config import Config, adapt_to_guidance, from_dict, to_dict
from stages.runs import RUN_FILE, new_run_dir, save_atomic, slugify, write_json_atomic  # noqa: F401 (slugify re-exported)

MAX_PROMPT_CHARS = 300
CHECKPOINTS = {"coarse": "coarse.pt", "refine": "refine.pt"}
_PACKAGES = ("torch", "diffusers", "transformers", "gradio", "trimesh", "xatlas", "numpy")


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


class PromptError(ValueError):
    """The prompt cannot be used; the message says why."""


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


def check_inputs(prompt, config: Config) -> tuple[str, torch.device, str]:
    """(prompt stripped, device, guidance name), or PromptError / UnknownPromptError / ValueError.

    Cheap (no model is loaded): the app calls it before a run joins the queue, the command
    line before a batch starts, `generate` before it writes anything.
    """
    prompt = check_prompt(prompt)
    config.check()
    device = resolve_device(config.device)
    guidance_name = resolve_guidance_name(config.guidance, device)
    if guidance_name == "primitives":
        from guidance.primitive_shapes import parse_prompt

        parse_prompt(prompt)  # raises UnknownPromptError listing the vocabulary
    return prompt, device, guidance_name


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


def resolve_guidance_name(name: str, device: torch.device) -> str:
    if name == "auto":
        return "stable-diffusion" if device.type == "cuda" else "primitives"
    return name


_GUIDANCE_CACHE: dict[tuple, object] = {}
_GUIDANCE_LOCK = threading.Lock()
_DEVICE_WORKERS: dict[str, ThreadPoolExecutor] = {}  # one worker thread per device: its runs, one at a time
_PENDING_RUNS: dict[str, int] = {}  # runs handed to a device's worker and not yet ended
_RUNS_LOCK = threading.Lock()


def _device_worker(device: torch.device) -> ThreadPoolExecutor:
    with _RUNS_LOCK:
        key = str(device)
        if key not in _DEVICE_WORKERS:
            _DEVICE_WORKERS[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dreamlift-{key}")
        return _DEVICE_WORKERS[key]


def _count_pending(device: torch.device, change: int) -> int:
    """Add `change` to the device's pending runs; returns the count before."""
    with _RUNS_LOCK:
        before = _PENDING_RUNS.get(str(device), 0)
        _PENDING_RUNS[str(device)] = before + change
        return before


def get_guidance(config: Config, name: str, device: torch.device):
    """Load (once per process, one model kept) the guidance model the config asks for."""
    import guidance

    if name == "primitives":
        key = (name, str(device), config.prior_resolution, config.prior_renders_per_view, repr(config.camera),
               config.coarse.volume.ambient)
        kwargs = dict(
            resolution=config.prior_resolution, renders_per_view=config.prior_renders_per_view,
            camera=config.camera, ambient=config.coarse.volume.ambient,
        )
    else:
        key = (name, str(device), config.model_id)
        kwargs = {"model_id": config.model_id} if config.model_id else {}
    with _GUIDANCE_LOCK:
        if key not in _GUIDANCE_CACHE:
            _GUIDANCE_CACHE.clear()  # keep one model in memory
            _GUIDANCE_CACHE[key] = guidance.load(name, device=device, **kwargs)
        model = _GUIDANCE_CACHE[key]
    if name == "primitives":  # one library serves every background level: no reload between prompts
        model = model.with_background(config.prior_background)
    return model


def package_versions() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


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
    prompt, device, guidance_name = check_inputs(prompt, config)
    adapt_to_guidance(config, guidance_name, prompt)
    config.coarse.seed = config.refine.seed = config.seed  # the run's seed drives every stage
    config.check()
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs run_dir, the folder of the run to continue")
        _load_record(Path(run_dir))  # raises when run_dir is not a run folder
    run_path = Path(run_dir) if run_dir is not None else new_run_dir(out_root, prompt, config.seed)
    run_path.mkdir(parents=True, exist_ok=True)

    # 2. Run the stages on the device's worker thread; hand its events to the caller as they come.
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def stopped() -> bool:
        return stop.is_set() or (should_stop is not None and should_stop())

    if _count_pending(device, +1):
        events.put(ProgressEvent(stage="setup", message=f"waiting for the previous run on {device} to stop",
                                 run_dir=str(run_path)))
    try:
        task = _device_worker(device).submit(
            _worker, prompt, config, device, guidance_name, run_path, events, stopped, resume)
    except RuntimeError:  # the interpreter is shutting down
        _count_pending(device, -1)
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


def _worker(prompt, config, device, guidance_name, run_path: Path, events: queue.Queue, stopped, resume: bool) -> None:
    """Run on the device's worker thread; every outcome ends in `events` (None, or an exception)."""
    start = time.perf_counter()
    record: dict = {}
    state = {"stage": "setup", "stage_start": time.perf_counter()}

    def emit(event: ProgressEvent) -> None:
        event.elapsed = time.perf_counter() - start
        event.run_dir = str(run_path)
        events.put(event)

    try:
        record.update(_load_record(run_path) if resume else {})
        record.update(
            prompt=prompt, seed=config.seed, preset=config.preset, guidance=guidance_name, device=str(device),
            model_id=config.model_id, config=to_dict(config), packages=package_versions(), status="running",
            started_at=None, ended_at=None,  # epoch seconds: when the run got the device, when it stopped
        )
        record.setdefault("stage_seconds", {})
        record.setdefault("finished_stages", [])
        write_json_atomic(run_path / RUN_FILE, record)
        check_stop(stopped, "setup", 0)  # cancelled while it waited for the device
        record["started_at"] = time.time()
        paths = _run_stages(prompt, config, device, guidance_name, run_path, record, state, emit, stopped)
        record.update(status="finished", outputs=paths, total_seconds=time.perf_counter() - start, ended_at=time.time())
        write_json_atomic(run_path / RUN_FILE, record)
        emit(ProgressEvent(stage="done", message=f"done in {time.perf_counter() - start:.0f} s", paths=paths))
        events.put(None)
    except Cancelled as exc:
        _fail(record, run_path, "cancelled", str(exc))
        events.put(_detached(exc))
    except BaseException as exc:  # recorded in run.json, then handed to the consumer
        trace = traceback.format_exc()
        exc = _explain(exc, state["stage"])
        _fail(record, run_path, "failed", str(exc), trace)
        events.put(_detached(exc))
    finally:
        # The stages' tensors died with _run_stages' frame (and the detached tracebacks): hand their memory back.
        release_free_memory(device)
        _count_pending(device, -1)


def _run_stages(prompt, config, device, guidance_name, run_path: Path, record: dict, state: dict, emit, stopped) -> dict:
    """Train and export; returns the output paths. Checkpoints and run.json are written after each stage."""

    def on_step(e: StepEvent) -> None:
        spent = time.perf_counter() - state["stage_start"]
        eta = spent / e.step * (e.total - e.step) if e.step else None
        emit(ProgressEvent(stage=e.stage, step=e.step, total=e.total, loss=e.loss, preview=e.preview,
                           message=e.message, stage_eta=eta))

    emit(ProgressEvent(stage="setup", message=f"loading the {guidance_name} guidance model on {device}"))
    guidance = get_guidance(config, guidance_name, device)
    check_stop(stopped, "setup", 0)  # loading can take a while; a cancel may have come meanwhile

    # Stage 1: coarse NeRF.
    if "coarse" in record["finished_stages"] and (run_path / CHECKPOINTS["coarse"]).exists():
        field = _load_field(run_path / CHECKPOINTS["coarse"], device)
        emit(ProgressEvent(stage="coarse", message="coarse stage restored from its checkpoint"))
    else:
        state.update(stage="coarse", stage_start=time.perf_counter())
        result = coarse_stage.run(guidance, prompt, config.coarse, config.camera, device, on_step, stopped)
        field = result.field
        save_atomic({"field": field.state_dict(), "field_config": dataclasses.asdict(field.config)},
                    run_path / CHECKPOINTS["coarse"])
        _finish_stage(record, "coarse", state, run_path, result.stats)

    # Stage 2: DMTet refine (or the coarse field's mesh when stopping after stage 1).
    if config.stop_after == "coarse":
        from geometry.dmtet import extract_mesh

        mesh = extract_mesh(field, config.refine.grid_resolution, config.refine.threshold, device=device,
                            opacity=config.refine.surface_opacity)
        color_field = field
    elif "refine" in record["finished_stages"] and (run_path / CHECKPOINTS["refine"]).exists():
        mesh, color_field = _load_refine(run_path / CHECKPOINTS["refine"], device)
        emit(ProgressEvent(stage="refine", message="refine stage restored from its checkpoint"))
    else:
        state.update(stage="refine", stage_start=time.perf_counter())
        result = refine_stage.run(field, guidance, prompt, config.refine, config.camera, device, on_step, stopped)
        mesh, color_field = (result.vertices, result.faces), result.color_field
        save_atomic({"vertices": result.vertices.cpu(), "faces": result.faces.cpu(),
                     "color_field": color_field.state_dict(),
                     "field_config": dataclasses.asdict(color_field.config)}, run_path / CHECKPOINTS["refine"])
        _finish_stage(record, "refine", state, run_path, result.stats)
    if mesh[1].shape[0] == 0:
        raise StageError(state["stage"], 0, "the result has no surface (empty mesh); try another seed or more steps")

    # Stage 3: export.
    state.update(stage="export", stage_start=time.perf_counter())

    def albedo(points):
        with torch.no_grad():
            return color_field.albedo(points)

    exported = export_stage.export(mesh[0], mesh[1], albedo, run_path, config.export, on_step, stopped)
    _finish_stage(record, "export", state, run_path, {"timings": exported.timings, "faces": exported.num_faces})
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


def _finish_stage(record: dict, stage: str, state: dict, run_path: Path, stats: dict) -> None:
    record["stage_seconds"][stage] = time.perf_counter() - state["stage_start"]
    if stage not in record["finished_stages"]:
        record["finished_stages"].append(stage)
    record.setdefault("stage_stats", {})[stage] = stats
    if "nonfinite_skipped" in stats:  # fp16 overflows survived, per stage
        record.setdefault("nonfinite_skipped", {})[stage] = stats["nonfinite_skipped"]
    write_json_atomic(run_path / RUN_FILE, record)


def _fail(record: dict, run_path: Path, status: str, message: str, trace: str = "") -> None:
    record.update(status=status, error=message, ended_at=time.time())
    if trace:
        record["traceback"] = trace
    try:
        write_json_atomic(run_path / RUN_FILE, record)
    except OSError:
        pass


def _load_record(run_path: Path) -> dict:
    path = run_path / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_path} has no {RUN_FILE}: it is not a DreamLift run folder")
    return json.loads(path.read_text())


def _load_field(path: Path, device: torch.device):
    from geometry.nerf import FieldConfig, NeRFField

    data = torch.load(path, map_location=device, weights_only=True)
    field = NeRFField(FieldConfig(**data["field_config"])).to(device)
    field.load_state_dict(data["field"])
    field.eval()
    for p in field.parameters():
        p.requires_grad_(False)
    return field


def _load_refine(path: Path, device: torch.device):
    from geometry.nerf import FieldConfig, NeRFField

    data = torch.load(path, map_location=device, weights_only=True)
    color_field = NeRFField(FieldConfig(**data["field_config"])).to(device)
    color_field.load_state_dict(data["color_field"])
    color_field.eval()
    return (data["vertices"].to(device), data["faces"].to(device)), color_field


def load_run_config(run_dir: str | os.PathLike) -> tuple[str, Config]:
    """The prompt and config of an earlier run (for --resume)."""
    record = _load_record(Path(run_dir))
    return record["prompt"], from_dict(record["config"])


def run_to_completion(prompt: str, config: Config, **kwargs) -> ProgressEvent:
    """Drain `generate` and return its final event (scripts and tests)."""
    last = None
    for event in generate(prompt, config, **kwargs):
        last = event
    return last

"""What a process keeps between runs: one worker thread per device, and the guidance model last loaded.

Each device has one long-lived worker thread: runs there never overlap (a run waits until the
previous one has stopped), and the memory one run frees is reused by the next (a fresh thread per
run would leave it fragmented over the allocator's per-thread arenas). One guidance model is kept
in memory (`guidance_for`; two for the primitives prior, whose refine stage has a library of its
own): the next run with the same model and settings reuses it.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from guidance.registry import GuidanceSpec
from stages.plan import RunPlan

_GUIDANCE_CACHE: dict[tuple, object] = {}  # cache key -> model, least recently used first; one spec's, at most its `kept`
_GUIDANCE_LOCK = threading.Lock()
_DEVICE_WORKERS: dict[str, ThreadPoolExecutor] = {}  # one worker thread per device: its runs, one at a time
_PENDING_RUNS: dict[str, int] = {}  # runs handed to a device's worker and not yet ended
_RUNS_LOCK = threading.Lock()


def guidance_loaded(plan: RunPlan, stage: str = "coarse") -> bool:
    """Whether the model `guidance_for(plan, stage)` returns is in memory already (no load)."""
    with _GUIDANCE_LOCK:
        return plan.guidance.cache_key(stage_config(plan, stage), plan.device) in _GUIDANCE_CACHE


def guidance_for(plan: RunPlan, stage: str = "coarse"):
    """The plan's guidance model for `stage`, loaded once per process (`kept_guidance`), as that stage sees it."""
    return kept_guidance(plan.guidance, stage_config(plan, stage), plan.device)


def stage_config(plan: RunPlan, stage: str):
    """The plan's config as `stage` sees it: the refine stage has cameras of its own (`RunPlan.refine_config`)."""
    return plan.refine_config if stage == "refine" else plan.config


def kept_guidance(spec: GuidanceSpec, config, device: torch.device):
    """The model of `spec` for an adapted config on `device`, loaded once per process (up to `spec.kept` stay in memory)
    (benchmarks that drive a stage themselves; a run asks with its plan: `guidance_for`)."""
    key = spec.cache_key(config, device)
    with _GUIDANCE_LOCK:
        if key in _GUIDANCE_CACHE:
            model = _GUIDANCE_CACHE.pop(key)  # re-inserted below: the most recently used comes last
        else:
            # Keep models of one spec only, at most `spec.kept` of them (the least recently used goes).
            for other in [k for k in _GUIDANCE_CACHE if k[0] != spec.name]:
                del _GUIDANCE_CACHE[other]
            while len(_GUIDANCE_CACHE) >= max(spec.kept, 1):
                del _GUIDANCE_CACHE[next(iter(_GUIDANCE_CACHE))]
            model = spec.load(config, device)
        _GUIDANCE_CACHE[key] = model
    return spec.for_run(model, config)


def forget_guidance() -> None:
    """Drop the kept model (its memory goes with the last run that holds it)."""
    with _GUIDANCE_LOCK:
        _GUIDANCE_CACHE.clear()


def device_worker(device: torch.device) -> ThreadPoolExecutor:
    """The device's one worker thread."""
    with _RUNS_LOCK:
        key = str(device)
        if key not in _DEVICE_WORKERS:
            _DEVICE_WORKERS[key] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dreamlift-{key}")
        return _DEVICE_WORKERS[key]


def count_pending(device: torch.device, change: int) -> int:
    """Add `change` to the device's pending runs; returns the count before."""
    with _RUNS_LOCK:
        before = _PENDING_RUNS.get(str(device), 0)
        _PENDING_RUNS[str(device)] = before + change
        return before


def _after_fork_in_child() -> None:
    """A forked process (a ZeroGPU call's worker) inherits these tables but not the threads behind them:
    a worker thread of the parent would never serve it, and a lock held by another thread would never open."""
    global _GUIDANCE_LOCK, _RUNS_LOCK
    _GUIDANCE_LOCK, _RUNS_LOCK = threading.Lock(), threading.Lock()
    _DEVICE_WORKERS.clear()
    _PENDING_RUNS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)

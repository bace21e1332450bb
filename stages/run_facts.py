"""What run.json records about the hardware and the guidance model a run used, so that two runs'
figures can be compared: the effective CFG scales, the model's precision, revision and load time,
the GPU, its CUDA and driver versions, the rasterizer backend, and peak memory.

Plain dicts of JSON types; None where a fact does not apply (no GPU, a local folder has no revision).
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import sys

import torch

GB = 2**30


def guidance_facts(model, config) -> dict:
    """The guidance model as the run used it: `model` (a loaded guidance, or the run's view of one) and
    the run's adapted `stages.config.Config`."""
    dtype = getattr(model, "dtype", None)
    return {
        "model_id": getattr(model, "model_id", None),
        "model_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "model_dtype_setting": config.model_dtype,
        "model_revision": getattr(model, "revision", None),  # the hub commit; None for a local folder or no weights
        "load_seconds": getattr(model, "load_seconds", None),  # None: built in memory (primitives, benchmarks)
        "guidance_scale": {stage: cfg_scales(getattr(config, stage).sds, model) for stage in ("coarse", "refine")},
    }


def cfg_scales(sds_config, model) -> dict:
    """The CFG scale a stage's SDS loss uses at its start and end, and its texture's (None: the same)."""
    start = sds_config.guidance_scale if sds_config.guidance_scale is not None else model.default_guidance_scale
    end = sds_config.guidance_scale_end if sds_config.guidance_scale_end is not None else start
    return {"start": float(start), "end": float(end), "texture": sds_config.texture_guidance_scale}


def device_facts(device: torch.device | str, raster_backend: str = "auto") -> dict:
    """The device a run trained on: the GPU's name, the CUDA runtime and NVIDIA driver versions (None
    on the CPU), the rasterizer backend `raster_backend` ("auto": refine.backend's default) resolves
    to there, and the peak memory so far (`peak_memory`)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "driver": driver_version() if cuda else None,
        "raster_backend": resolved_raster_backend(raster_backend, device),
        "peak_memory": peak_memory(device),
    }


def resolved_raster_backend(backend: str, device: torch.device) -> str | None:
    """The backend `renderers.rasterizer.Rasterizer.make(backend, device)` resolves to, as the refine
    stage makes it (None: it would refuse)."""
    from renderers.rasterizer import resolve_backend

    try:
        return resolve_backend(backend, device)
    except (RuntimeError, ValueError):  # nvdiffrast asked for where it is missing: the refine stage says why
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version (e.g. "550.54.15") from nvidia-smi; None when it cannot be asked."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a stage's peak from now (CUDA only: a process's peak RSS cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> dict:
    """Absolute peaks in GB since the last `reset_peak_memory`: on CUDA the tensors' (`allocated`) and the
    caching allocator's (`reserved`, what the card must hold); elsewhere the process's peak RSS so far."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"allocated_gb": round(torch.cuda.max_memory_allocated(device) / GB, 3),
                "reserved_gb": round(torch.cuda.max_memory_reserved(device) / GB, 3)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # kB on Linux, bytes on macOS
    return {"process_rss_gb": round(rss_bytes / GB, 3)}

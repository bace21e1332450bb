"""Frozen 2D diffusion priors and the SDS loss that distils them into 3D.

`load(name, device)` builds one of the guidance models of `guidance.registry`; `guidance.sds.SDSLoss`
turns any of them into a loss. Heavy packages (diffusers, transformers) are imported
inside the loaders, so importing this package is cheap.
"""
from __future__ import annotations

import torch

from guidance.hub import (
    DEFAULT_IF_MODEL_ID,
    DEFAULT_SD_MODEL_ID,
    REMOVED_SD_MODEL_ID,
    GuidanceLoadError,
)

__all__ = [
    "DEFAULT_IF_MODEL_ID",
    "DEFAULT_SD_MODEL_ID",
    "REMOVED_SD_MODEL_ID",
    "GuidanceLoadError",
    "load",
]


def load(
    name: str,  # a registered model's name: `guidance.registry.names()`
    device: torch.device | str,
    dtype: torch.dtype | None = None,  # None: fp16 on CUDA, fp32 elsewhere (hub models); fp32 for the prior
    model_id: str | None = None,  # hub id or local folder; None = the model's default id
    **kwargs,  # passed on to the model's constructor
):
    """Build the guidance model `name` on `device` (see `guidance.registry`)."""
    from guidance import registry

    return registry.get(name).build(device, dtype=dtype, model_id=model_id, **kwargs)

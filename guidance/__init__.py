"""Frozen 2D diffusion priors and the SDS loss that distils them into 3D.

`load(name, device)` builds one of the guidance models; `guidance.sds.SDSLoss`
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

GUIDANCE_NAMES = ("primitives", "stable-diffusion", "deepfloyd-if")  # the names `load` accepts

__all__ = [
    "DEFAULT_IF_MODEL_ID",
    "DEFAULT_SD_MODEL_ID",
    "GUIDANCE_NAMES",
    "REMOVED_SD_MODEL_ID",
    "GuidanceLoadError",
    "load",
]


def load(
    name: str,  # one of GUIDANCE_NAMES
    device: torch.device | str,
    dtype: torch.dtype | None = None,  # None: fp16 on CUDA, fp32 elsewhere (hub models); fp32 for the prior
    model_id: str | None = None,  # hub id or local folder; None = the model's default id
    **kwargs,  # passed on to the model's constructor
):
    """Build the guidance model `name` on `device`."""
    if name == "primitives":
        from guidance.primitives import PrimitivesPrior

        if model_id is not None:
            raise ValueError(f"model_id must be None for the primitives prior (it has no weights), got {model_id!r}")
        return PrimitivesPrior(device=device, dtype=dtype if dtype is not None else torch.float32, **kwargs)
    elif name == "stable-diffusion":
        from guidance.stable_diffusion import StableDiffusionGuidance

        return StableDiffusionGuidance(model_id or DEFAULT_SD_MODEL_ID, device=device, dtype=dtype, **kwargs)
    elif name == "deepfloyd-if":
        from guidance.deepfloyd_if import DeepFloydIFGuidance

        return DeepFloydIFGuidance(model_id or DEFAULT_IF_MODEL_ID, device=device, dtype=dtype, **kwargs)
    raise ValueError(f"guidance name must be one of {list(GUIDANCE_NAMES)}, got {name!r}")

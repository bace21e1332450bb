"""The colour behind the object in the SDS stages' training renders, and the check of its setting."""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("white", "random", "learned")  # or a fixed (r, g, b) in [0, 1]


class Background(torch.nn.Module):
    """Fixed white, a random solid colour per image (white in eval mode), one learned colour, or a
    fixed (r, g, b). "learned" has a parameter, `logit`, for the stage's optimizer."""

    def __init__(self, mode: str | tuple):
        super().__init__()
        self.mode = mode if isinstance(mode, str) else "fixed"
        self.color = None if isinstance(mode, str) else torch.tensor([float(c) for c in mode])  # [3]
        self.logit = torch.nn.Parameter(torch.zeros(3)) if mode == "learned" else None

    def forward(self, batch: int, generator: torch.Generator | None, device) -> Tensor:  # -> [B, 3] float32
        if self.mode == "white":
            return torch.ones(batch, 3, device=device)
        if self.mode == "fixed":
            return self.color.to(device).expand(batch, 3)
        if self.mode == "random" and self.training:
            return torch.rand(batch, 3, generator=generator).to(device)  # drawn on the CPU: the same on any device
        if self.mode == "random":
            return torch.ones(batch, 3, device=device)
        return torch.sigmoid(self.logit).expand(batch, 3)


def check_background(value, name: str, modes: tuple[str, ...] = MODES) -> None:
    """ValueError naming `name` unless `value` is one of `modes` or an (r, g, b) in [0, 1]."""
    if isinstance(value, str):
        if value not in modes:
            raise ValueError(f"{name} must be one of {list(modes)} or an (r, g, b), got {value!r}")
    elif len(value) != 3 or not all(0.0 <= float(c) <= 1.0 for c in value):
        raise ValueError(f"{name} must be one of {list(modes)} or 3 values in [0, 1], got {value!r}")

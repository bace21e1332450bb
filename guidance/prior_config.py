"""The primitives prior's settings as a run's config holds them (`Config.prior`, `--set prior.resolution=32`).

Kept apart from `guidance.primitives` so that reading a config does not import the prior itself.
"""
from __future__ import annotations

from dataclasses import dataclass

FLAT_KEYS = ("resolution", "renders_per_view", "flat_share", "elevation_sigma", "background")  # once `prior_<key>` in run.json


@dataclass
class PriorConfig:
    resolution: int = 64  # image side of its libraries, px
    renders_per_view: int = 96  # renders per shape and view word
    flat_share: float = 0.0  # share of those renders left unshaded (albedo only)
    elevation_sigma: float | None = None  # its camera-elevation kernel's width, degrees; None = automatic (0.5 at 96 renders); 0 = the text alone
    background: float = 1.0  # grey level behind its objects (set from the prompt by the spec's adapt)

    def check(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or not 16 <= self.resolution <= 256:
            raise ValueError(f"prior.resolution must be an integer in [16, 256], got {self.resolution!r}")
        if isinstance(self.renders_per_view, bool) or not isinstance(self.renders_per_view, int) \
                or not 1 <= self.renders_per_view <= 1024:
            raise ValueError(f"prior.renders_per_view must be an integer in [1, 1024], got {self.renders_per_view!r}")
        if not _is_number(self.flat_share) or not 0.0 <= self.flat_share <= 1.0:
            raise ValueError(f"prior.flat_share must be a share in [0, 1], got {self.flat_share!r}")
        if self.elevation_sigma is not None and (not _is_number(self.elevation_sigma)
                                                 or not 0.0 <= self.elevation_sigma <= 90.0):
            raise ValueError(f"prior.elevation_sigma must be a number of degrees in [0, 90], got {self.elevation_sigma!r}")
        if not _is_number(self.background) or not 0.0 <= self.background <= 1.0:
            raise ValueError(f"prior.background must be a grey level in [0, 1], got {self.background!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

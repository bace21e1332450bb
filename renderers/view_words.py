"""The view words a camera is prompted with ("front", "side", "back", "overhead"; DreamFusion's view-dependent
prompting), and their elevation-band forms ("low front", "high back") for a model that tells the bands apart.

Azimuth 0 looks at the object's front from +x (`renderers.cameras`' frames).
"""
from __future__ import annotations

import math

__all__ = ["ALL_VIEW_WORDS", "BANDED_VIEWS", "VIEW_WORDS", "banded_view_word", "view_word", "view_words_of",
           "wrap_degrees"]

VIEW_WORDS = ("front", "side", "back", "overhead")
BANDED_VIEWS = ("front", "side", "back")  # the view words with elevation-band forms, "low <word>" and "high <word>"
ALL_VIEW_WORDS = VIEW_WORDS + tuple(f"{band} {word}" for band in ("low", "high") for word in BANDED_VIEWS)


def view_word(elevation: float, azimuth: float) -> str:
    """The view word of one camera: overhead above 60 degrees, else by azimuth."""
    if elevation > 60.0:
        return "overhead"
    az = wrap_degrees(azimuth)
    if abs(az) < 45.0:
        return "front"
    if abs(az) > 135.0:
        return "back"
    return "side"


def banded_view_word(word: str, elevation: float, bands: tuple[float, float] | None) -> str:
    """`word`, or its elevation-band form for a guidance model that tells elevation bands apart
    (`view_words_of`): "low <word>" for a front, side or back camera under bands[0] degrees, "high
    <word>" for one at bands[1] degrees or more. `bands` None: the word itself."""
    if bands is None or word not in BANDED_VIEWS:
        return word
    low, high = bands
    if elevation < low:
        return f"low {word}"
    if elevation >= high:
        return f"high {word}"
    return word


def view_words_of(bands: tuple[float, float] | None) -> tuple[str, ...]:
    """Every view word a model with elevation bands `bands` (None: none) is prompted with."""
    return VIEW_WORDS if bands is None else ALL_VIEW_WORDS


def wrap_degrees(angle: float) -> float:
    """Wrap an angle to (-180, 180]."""
    a = math.fmod(angle, 360.0)
    if a <= -180.0:
        a += 360.0
    elif a > 180.0:
        a -= 360.0
    return a

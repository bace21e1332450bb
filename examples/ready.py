"""The ready-made results of the app's example prompts (built by `python -m examples.build`), as the app reads them."""
from __future__ import annotations

import json
from pathlib import Path

from stages.runs import slugify

RESULTS = Path(__file__).resolve().parent / "results"  # one folder per example prompt
FILES = ("model.glb", "preview.png", "turntable.mp4", "facts.json")  # what a usable result holds (model.zip optional)


def slug(prompt: str) -> str:
    return slugify(prompt)


def load(prompt: str, guidance: str, root: Path = RESULTS) -> dict | None:
    """The ready-made result of `prompt` made with `guidance`: {"facts", "glb", "preview", "turntable", "zip"?, "strip"?}; else None."""
    folder = root / slug(prompt or "")
    if not all((folder / name).is_file() for name in FILES):
        return None
    try:
        facts = json.loads((folder / "facts.json").read_text())
    except (OSError, ValueError):
        return None
    if facts.get("prompt") != prompt.strip() or facts.get("guidance") != guidance:
        return None
    found = {"facts": facts, "glb": str(folder / "model.glb"), "preview": str(folder / "preview.png"),
             "turntable": str(folder / "turntable.mp4")}
    for key, name in (("zip", "model.zip"), ("strip", "strip.png")):
        if (folder / name).is_file():
            found[key] = str(folder / name)
    return found

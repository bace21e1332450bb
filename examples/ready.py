"""The ready-made results of the app's example prompts (built by `python -m examples.build`), as the app reads them."""
from __future__ import annotations

import json
import os
from pathlib import Path

from stages.runs import slugify

# One folder per example prompt; DREAMLIFT_EXAMPLES_DIR points the app at another (the tests' tiny results).
RESULTS = Path(os.environ.get("DREAMLIFT_EXAMPLES_DIR") or Path(__file__).resolve().parent / "results")
FILES = ("model.glb", "preview.png", "turntable.mp4", "facts.json")  # what a usable result holds (model.zip optional)


def slug(prompt: str) -> str:
    return slugify(prompt)


def load(prompt: str, guidance: str, root: Path | None = None) -> dict | None:
    """The ready-made result of `prompt` made with `guidance`: {"facts", "glb", "preview", "turntable", "zip"?, "strip"?}; else None."""
    folder = (RESULTS if root is None else root) / slug(prompt or "")
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

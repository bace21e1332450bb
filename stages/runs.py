"""Run folders: where each run writes, how names are made safe, atomic writes, pruning old runs."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import torch

RUN_FILE = "run.json"


def slugify(prompt: str, limit: int = 40) -> str:
    """A file-name-safe slug of the prompt: lowercase ASCII letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].strip("-") or "run"


def new_run_dir(out_root: str | os.PathLike, prompt: str, seed: int) -> Path:
    """A fresh folder under out_root: <time>-<slug>-s<seed>-<random>; never an existing one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_root) / f"{stamp}-{slugify(prompt)}-s{seed}-{secrets.token_hex(3)}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def list_runs(out_root: str | os.PathLike) -> list[Path]:
    """Run folders (those holding a run.json) under out_root, oldest first."""
    root = Path(out_root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / RUN_FILE).exists()]
    return sorted(runs, key=lambda p: (p / RUN_FILE).stat().st_mtime)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def prune_runs(out_root: str | os.PathLike, keep: int | None = None, max_bytes: int | None = None) -> list[Path]:
    """Delete the oldest run folders until at most `keep` remain and they take at most `max_bytes`.

    Only folders directly under out_root that hold a run.json and are not still running are removed.
    Returns the removed folders.
    """
    runs = [p for p in list_runs(out_root) if _status(p) != "running"]
    removed = []
    if keep is not None:
        while len(runs) > keep:
            removed.append(runs.pop(0))
    if max_bytes is not None:
        sizes = {p: folder_bytes(p) for p in runs}
        while runs and sum(sizes[p] for p in runs) > max_bytes:
            removed.append(runs.pop(0))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / RUN_FILE).read_text()).get("status")
    except (OSError, ValueError):
        return None

"""Run folders: where each run writes, how names are made safe, atomic writes, pruning old runs,
and what a run leaves there: its record (`run.json`, read and written only as a `RunRecord`) and a
checkpoint after each stage, which `load_coarse_checkpoint` / `load_refine_checkpoint` read back (resume, bench)."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

RUN_FILE = "run.json"
STOP_FILE = "stop-requested"  # written into a run folder to cancel it: the stage loops of any process check for it
CHECKPOINTS = {"coarse": "coarse.pt", "refine": "refine.pt"}  # stage -> its checkpoint in the run folder
_PACKAGES = ("torch", "diffusers", "transformers", "gradio", "trimesh", "xatlas", "numpy")  # versions kept in run.json


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


def request_stop(run_dir: str | os.PathLike) -> None:
    """Ask the run in `run_dir` to stop, wherever it trains (this process or a forked GPU worker)."""
    path = Path(run_dir)
    if path.is_dir():
        (path / STOP_FILE).touch()


def stop_requested(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / STOP_FILE).exists()


def clear_stop(run_dir: str | os.PathLike) -> None:
    """Forget an earlier cancel (a run that is resumed on purpose)."""
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


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
    record = RunRecord.read(run)
    return record.status if record is not None else None


# --------------------------------------------------------------------------- run.json
def package_versions() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@dataclass
class RunRecord:
    """A run's `run.json`: what it ran, how each stage went and how it ended; the file's one reader and writer.

    Files of other versions load: a key they lack takes its default here, a key this version does not
    know is kept in `extra` and written back as it was."""

    prompt: str = ""  # the checked prompt
    seed: int = 0  # the run's seed
    preset: str | None = None  # the preset the config started from
    guidance: str | None = None  # the guidance model's registry name ("auto" resolved)
    model_id: str | None = None  # its hub id or folder; None = the model's default
    config: dict = dataclasses.field(default_factory=dict)  # the resolved config (`stages.config.to_dict`)
    packages: dict = dataclasses.field(default_factory=dict)  # package -> version the run imported
    status: str | None = None  # "running", "finished", "failed" or "cancelled"
    started_at: float | None = None  # epoch seconds when the run got the device
    ended_at: float | None = None  # epoch seconds when it ended
    device: str | None = None  # where it trained
    device_facts: dict | None = None  # `stages.run_facts.device_facts`
    guidance_facts: dict = dataclasses.field(default_factory=dict)  # stage -> `stages.run_facts.guidance_facts`
    finished_stages: list = dataclasses.field(default_factory=list)  # stages done, in order (resume skips them)
    stage_seconds: dict = dataclasses.field(default_factory=dict)  # stage -> seconds it took
    stage_stats: dict = dataclasses.field(default_factory=dict)  # stage -> what the stage reported (timings, losses, faces)
    peak_memory: dict = dataclasses.field(default_factory=dict)  # stage -> `stages.run_facts.peak_memory` at its end
    nonfinite_skipped: dict = dataclasses.field(default_factory=dict)  # stage -> steps skipped for a non-finite loss or gradient
    stage_calls: int = 0  # calls that ran some stages and left the rest to a later one (a ZeroGPU run)
    outputs: dict = dataclasses.field(default_factory=dict)  # name -> path of the exported files
    total_seconds: float | None = None  # the whole run's seconds, when finished
    error: str | None = None  # why it failed or was cancelled
    traceback: str | None = None  # the failure's traceback text
    extra: dict = dataclasses.field(default_factory=dict)  # keys of another version, kept as they were

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        if not isinstance(data, dict):
            raise ValueError(f"{RUN_FILE} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunRecord:
        """A run folder's record; FileNotFoundError when it is not a run folder, ValueError when unreadable."""
        path = Path(run_dir) / RUN_FILE
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} has no {RUN_FILE}: it is not a DreamLift run folder")
        return cls.from_dict(json.loads(path.read_text()))

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> RunRecord | None:
        """`load`, or None when the folder has no readable record (listings skip such folders)."""
        try:
            return cls.load(run_dir)
        except (OSError, ValueError):
            return None

    def save(self, run_dir: str | os.PathLike) -> None:
        write_json_atomic(Path(run_dir) / RUN_FILE, self.to_dict())

    def finish_stage(self, stage: str, seconds: float, stats: dict) -> None:
        """Record a finished stage: its seconds and stats."""
        self.stage_seconds[stage] = seconds
        if stage not in self.finished_stages:
            self.finished_stages.append(stage)
        self.stage_stats[stage] = stats
        if "nonfinite_skipped" in stats:  # fp16 overflows survived, per stage
            self.nonfinite_skipped[stage] = stats["nonfinite_skipped"]

    def end(self, run_dir: str | os.PathLike, status: str, message: str, trace: str = "") -> None:
        """Record how a run ended ("failed", "cancelled"); a folder that cannot be written is left as it is."""
        self.status, self.error, self.ended_at = status, message, time.time()
        if trace:
            self.traceback = trace
        try:
            self.save(run_dir)
        except OSError:
            pass

    def run_config(self):
        """The resolved config as a `stages.config.Config` (old files' settings read as `from_dict` reads them)."""
        from stages.config import from_dict

        return from_dict(self.config)


def load_run_config(run_dir: str | os.PathLike):
    """The prompt and config of an earlier run (for --resume): (prompt, stages.config.Config)."""
    record = RunRecord.load(run_dir)
    return record.prompt, record.run_config()


# --------------------------------------------------------------------------- checkpoints
def has_checkpoint(record: RunRecord, run_path: Path, stage: str) -> bool:
    """Whether `stage` finished in this run and its checkpoint is there."""
    return stage in record.finished_stages and (run_path / CHECKPOINTS[stage]).exists()


def save_coarse_checkpoint(field, run_path: Path) -> None:
    save_atomic({"field": field.state_dict(), "field_config": dataclasses.asdict(field.config)},
                run_path / CHECKPOINTS["coarse"])


def save_refine_checkpoint(vertices, faces, color_field, run_path: Path) -> None:
    save_atomic({"vertices": vertices.cpu(), "faces": faces.cpu(), "color_field": color_field.state_dict(),
                 "field_config": dataclasses.asdict(color_field.config)}, run_path / CHECKPOINTS["refine"])


def load_coarse_checkpoint(path: Path, device: torch.device):
    """The coarse stage's NeRF field from its checkpoint, frozen, in eval mode."""
    from geometry.nerf import FieldConfig, NeRFField

    data = torch.load(path, map_location=device, weights_only=True)
    field = NeRFField(FieldConfig(**data["field_config"])).to(device)
    field.load_state_dict(data["field"])
    field.eval()
    for p in field.parameters():
        p.requires_grad_(False)
    return field


def load_refine_checkpoint(path: Path, device: torch.device):
    """((vertices [V, 3], faces [F, 3]), colour field) of the refine stage from its checkpoint."""
    from geometry.nerf import FieldConfig, NeRFField

    data = torch.load(path, map_location=device, weights_only=True)
    color_field = NeRFField(FieldConfig(**data["field_config"])).to(device)
    color_field.load_state_dict(data["color_field"])
    color_field.eval()
    return (data["vertices"].to(device), data["faces"].to(device)), color_field

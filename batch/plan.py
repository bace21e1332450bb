"""A batch's plan and its record, without Ray: the prompts of a file checked all at once, one run
per (prompt, seed) in the same folders as the serial `generate.py --prompts`, and `batch.json`.

`batch.json` (in the batch's output root) holds the batch's settings, so `--resume ROOT` can
continue it, and one entry per run: status (pending, running, finished, failed, cancelled),
seconds (the run itself, on its worker), wall_seconds (from hand-out to result, on the driver),
model_loaded / load_seconds (whether this run loaded the guidance model, and how long that took),
node and pid of the worker, attempts, error.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from stages.config import Config, from_dict, to_dict
from stages.runs import RunRecord, slugify, write_json_atomic

BATCH_FILE = "batch.json"
BATCH_VERSION = 1


@dataclass
class RunEntry:
    index: int  # position in the prompts file (among its prompts, from 0)
    prompt: str  # the prompt, stripped
    seed: int  # the run's seed
    run_dir: str  # folder name under the batch root, as the serial batch names it
    status: str = "pending"  # pending, running, finished, failed, cancelled
    seconds: float | None = None  # the run itself, measured on its worker
    wall_seconds: float | None = None  # hand-out to result, measured on the driver (adds Ray's scheduling)
    model_loaded: bool | None = None  # True when this run loaded the guidance model (a worker's first run)
    load_seconds: float | None = None  # seconds spent getting the guidance model (about 0 when kept)
    node: str | None = None  # the worker's host name and IP
    pid: int | None = None  # the worker's process id
    attempts: int = 0  # times handed to a worker (more than 1 after a worker died)
    error: str | None = None  # one line, when failed


@dataclass
class BatchPlan:
    root: Path  # the batch's output root (one run folder each under it)
    config: Config  # the settings every run starts from
    runs: list[RunEntry]
    prompts_file: str | None = None
    info: dict = field(default_factory=dict)  # cluster facts, filled in by the runner

    def todo(self) -> list[RunEntry]:
        """Runs still to do: everything not finished (a resumed batch skips its finished runs)."""
        return [r for r in self.runs if r.status != "finished"]

    def run_config(self, entry: RunEntry) -> Config:
        config = copy.deepcopy(self.config)
        config.seed = entry.seed
        return config

    def save(self, status: str) -> None:
        data = {
            "version": BATCH_VERSION, "status": status, "updated_at": time.time(),
            "prompts_file": self.prompts_file, "config": to_dict(self.config), **self.info,
            "counts": counts(self.runs), "runs": [asdict(r) for r in self.runs],
        }
        write_json_atomic(self.root / BATCH_FILE, data)


def counts(runs: list[RunEntry]) -> dict:
    out: dict[str, int] = {}
    for run in runs:
        out[run.status] = out.get(run.status, 0) + 1
    return out


def read_prompt_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each prompt line: blank lines and '#' comments skipped, nothing checked yet."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the prompts file {path}: {exc.strerror or exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"{path} holds no prompts (one per line)")
    return lines


def check_prompts(path: Path, lines: list[tuple[int, str]], config: Config, worker_device: str) -> list[str]:
    """The prompts, stripped; raises one ValueError that lists every bad line.

    `worker_device` ("cpu" or "cuda") is where the runs will execute, which decides the guidance
    model for `--guidance auto` (the driver itself may have no GPU), and so the vocabulary check.
    """
    from stages.plan import check_prompt, resolve_guidance

    config.check()
    spec = resolve_guidance(config, torch.device(worker_device))
    prompts, bad = [], []
    for number, line in lines:
        try:
            prompt = check_prompt(line)
            spec.check_prompt(prompt)
            prompts.append(prompt)
        except ValueError as exc:
            bad.append(f"line {number}: {' '.join(str(exc).split())}")
    if bad:
        raise ValueError(f"{path}: {len(bad)} bad prompt{'s' if len(bad) > 1 else ''}, no run started: "
                         + "; ".join(bad))
    return prompts


def new_plan(root: Path, prompts: list[str], config: Config, prompts_file: str | None = None) -> BatchPlan:
    """A fresh batch: one run per prompt at the config's seed, folders named as the serial batch names them."""
    if (root / BATCH_FILE).exists():
        raise ValueError(f"{root} already holds a batch ({BATCH_FILE}); continue it with --resume {root} --ray, "
                         "or choose another --out")
    runs = [RunEntry(index=i, prompt=p, seed=config.seed, run_dir=f"{i:03d}-{slugify(p)}")
            for i, p in enumerate(prompts)]
    return BatchPlan(root=root, config=copy.deepcopy(config), runs=runs, prompts_file=prompts_file)


def is_batch_dir(path: Path) -> bool:
    return (Path(path) / BATCH_FILE).is_file()


def load_plan(root: Path) -> BatchPlan:
    """The batch recorded in root/batch.json, for --resume. A run counts as finished only when its
    own run.json says so too; runs that were running when the batch stopped become pending again."""
    path = Path(root) / BATCH_FILE
    if not path.is_file():
        raise ValueError(f"{root} has no {BATCH_FILE}: it is not a batch folder")
    data = json.loads(path.read_text())
    if data.get("version") != BATCH_VERSION:
        raise ValueError(f"{path} has version {data.get('version')!r}; this DreamLift reads version {BATCH_VERSION}")
    known = RunEntry.__dataclass_fields__
    runs = [RunEntry(**{k: v for k, v in r.items() if k in known}) for r in data["runs"]]
    for run in runs:
        if run.status == "finished" and run_status(Path(root) / run.run_dir) != "finished":
            run.status = "pending"
        elif run.status != "finished":
            run.status, run.error = "pending", None
    return BatchPlan(root=Path(root), config=from_dict(data["config"]), runs=runs,
                     prompts_file=data.get("prompts_file"))


def run_status(run_dir: Path) -> str | None:
    """The status in a run folder's run.json, or None when it has none (or it cannot be read)."""
    record = RunRecord.read(run_dir)
    return record.status if record is not None else None

"""Benchmark runs that start from an earlier benchmark's coarse checkpoints.

A change to the refine stage or the export does not change the coarse field, so it can be measured on
the very same fields the earlier runs trained (a paired comparison, in about half the time): the new
run folder gets the earlier run's coarse.pt and a run.json that says the coarse stage is finished,
and the pipeline resumes from there. The earlier run must have been trained with the same settings for
everything the coarse stage reads; otherwise the run is refused with the settings that differ.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from stages.config import to_dict
from stages.runs import CHECKPOINTS, RunRecord

COARSE_INPUTS = ("guidance", "model_id", "model_dtype", "seed", "prior", "camera", "coarse")  # what the coarse stage reads


def differing_settings(earlier: dict, now: dict) -> list[str]:
    """Dotted names of the coarse stage's settings that differ between two resolved configs."""
    out = []

    def walk(a, b, name):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{name}.{key}" if name else key)
        elif a != b:
            out.append(name)

    for key in COARSE_INPUTS:
        walk(earlier.get(key), now.get(key), key)
    return out


def start_from_coarse(source: Path, run_dir: Path, plan) -> None:
    """Make `run_dir` a run whose coarse stage is `source`'s (a finished run folder of the same prompt
    and coarse settings as `plan`, a `stages.plan.RunPlan`); the pipeline then resumes from it."""
    earlier = RunRecord.load(source)
    checkpoint = source / CHECKPOINTS["coarse"]
    if "coarse" not in earlier.finished_stages or not checkpoint.exists():
        raise ValueError(f"{source} has no finished coarse stage to start from")
    if earlier.prompt != plan.prompt:
        raise ValueError(f"{source} is a run of {earlier.prompt!r}, not {plan.prompt!r}")
    now = json.loads(json.dumps(to_dict(plan.config)))  # as run.json holds it (lists, not tuples)
    differ = differing_settings(earlier.config, now)
    if differ:
        raise ValueError(f"{source}'s coarse stage was trained with other settings: {', '.join(differ)}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    shutil.copy2(checkpoint, run_dir / CHECKPOINTS["coarse"])
    record = RunRecord(prompt=earlier.prompt, seed=earlier.seed, preset=earlier.preset, guidance=earlier.guidance,
                       model_id=earlier.model_id, config=earlier.config, status="running")
    record.finish_stage("coarse", earlier.stage_seconds.get("coarse", 0.0), earlier.stage_stats.get("coarse", {}))
    record.guidance_facts = {k: v for k, v in earlier.guidance_facts.items() if k == "coarse"}
    record.peak_memory = {k: v for k, v in earlier.peak_memory.items() if k == "coarse"}
    record.save(run_dir)

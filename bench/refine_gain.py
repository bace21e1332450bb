"""What the refine stage adds: volumetric IoU before and after refinement, from finished runs.

For each run folder (made by `generate.py` or `bench.quality` with the primitives prior) it
reads the coarse checkpoint, extracts the mesh the refine stage starts from (the coarse
field's level set on the run's own refine grid: `geometry.level_set.extract_mesh`), reads the
refined mesh from the refine checkpoint, and compares both with the canonical primitive
(volumetric IoU, a cube at its best heading about z as in bench.quality; watertightness,
faces). Prints a table and writes JSON.

    python -m bench.refine_gain bench/out/quality            # every run folder under it
    python -m bench.refine_gain runs/a-green-cube-seed0 --json gain.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.shape_checks import aligned_volume_iou
from bench.speed import write_json
from geometry.level_set import LevelSetSettings, extract_mesh
from geometry.mesh_ops import is_watertight
from guidance.primitive_shapes import parse_prompt
from stages.runs import CHECKPOINTS, load_coarse_checkpoint, load_refine_checkpoint, load_run_config

VOLUME_RESOLUTION = 64  # voxels per axis of the IoU grid (bench.quality uses the same)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named, or found one level below a named folder, that have both checkpoints."""
    found = []
    for path in paths:
        candidates = [path] if (path / "run.json").exists() else sorted(p for p in path.iterdir() if (p / "run.json").exists())
        found += [p for p in candidates if all((p / name).exists() for name in CHECKPOINTS.values())]
    return found


def finished_runs(parser: argparse.ArgumentParser, paths: list[Path]) -> list[Path]:
    """`run_folders` of the command line's paths; a usage error when a path is not a folder or holds no finished run."""
    missing = [str(p) for p in paths if not p.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    folders = run_folders(paths)
    if not folders:
        parser.error("no finished runs (run.json, coarse.pt and refine.pt) under the given paths")
    return folders


def measure_run(run_dir: Path) -> dict:
    prompt, config = load_run_config(run_dir)
    _, shape, _ = parse_prompt(prompt)
    device = torch.device("cpu")
    field = load_coarse_checkpoint(run_dir / CHECKPOINTS["coarse"], device)
    before = extract_mesh(field, LevelSetSettings(config.refine.grid_resolution, config.refine.threshold,
                                                  opacity=config.refine.surface_opacity), device)
    after, _ = load_refine_checkpoint(run_dir / CHECKPOINTS["refine"], device)
    row = {"run": run_dir.name, "prompt": prompt, "seed": config.seed, "grid": config.refine.grid_resolution}
    for name, (verts, faces) in (("before", before), ("after", after)):
        row[f"iou_{name}"] = aligned_volume_iou(verts, faces, shape, VOLUME_RESOLUTION) if faces.shape[0] else 0.0
        row[f"faces_{name}"] = int(faces.shape[0])
        row[f"watertight_{name}"] = bool(faces.shape[0]) and is_watertight(faces)
    return row


def format_table(rows: list[dict]) -> str:
    head = f"{'prompt':<20}{'seed':>5}{'grid':>6}{'IoU before':>12}{'IoU after':>11}{'gain':>8}{'faces':>8}  watertight"
    lines = [head, "-" * len(head)]
    for r in rows:
        gain = r["iou_after"] - r["iou_before"]
        lines.append(f"{r['prompt']:<20}{r['seed']:>5}{r['grid']:>6}{r['iou_before']:>12.3f}{r['iou_after']:>11.3f}"
                     f"{gain:>+8.3f}{r['faces_after']:>8}  {r['watertight_after']}")
    if rows:
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("iou_before", "iou_after")}
        better = sum(r["iou_after"] >= r["iou_before"] for r in rows)
        lines += ["-" * len(head), f"{'mean':<31}{mean['iou_before']:>12.3f}{mean['iou_after']:>11.3f}"
                  f"{mean['iou_after'] - mean['iou_before']:>+8.3f}   refine not worse in {better}/{len(rows)} runs"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding run folders")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    rows = [measure_run(folder) for folder in finished_runs(parser, args.paths)]
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

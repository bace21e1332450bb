"""Which mesh level: the coarse fields of finished runs re-extracted at fixed opacity targets and
at the automatic one, each mesh's volumetric IoU against the canonical primitive (a cube at its best
heading about z, as in bench.quality).

`geometry.level_set.auto_threshold` picks the density level whose axis silhouettes match the rays
above an opacity target; the target is the field's own (`geometry.level_set.opacity_level`) unless
fixed. This re-extracts each run's coarse field on its refine grid at every target named and
at the automatic one, and prints one row per run with the means per shape.

    python -m bench.mesh_level bench/out/quality --opacities 0.5 0.8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.refine_gain import VOLUME_RESOLUTION, finished_runs
from bench.shape_checks import aligned_volume_iou
from bench.speed import write_json
from geometry.level_set import (
    LevelSetSettings,
    auto_threshold,
    extract_mesh,
    opacity_level,
    opacity_maps,
    probe_density,
)
from guidance.primitive_shapes import parse_prompt
from stages.runs import CHECKPOINTS, load_coarse_checkpoint, load_run_config


def measure_run(run_dir: Path, opacities: list[float]) -> dict:
    prompt, config = load_run_config(run_dir)
    _, shape, _ = parse_prompt(prompt)
    device = torch.device("cpu")
    field = load_coarse_checkpoint(run_dir / CHECKPOINTS["coarse"], device)
    density, _, cell = probe_density(field, device=device)
    row = {"run": run_dir.name, "prompt": prompt, "shape": shape, "seed": config.seed,
           "auto_opacity": opacity_level(opacity_maps(density, cell))}
    targets = {f"{o:g}": auto_threshold(density, cell, opacity=o) for o in opacities} | {"auto": auto_threshold(density, cell)}
    for name, level in targets.items():
        if level <= 0:
            row[f"iou_{name}"] = 0.0
            continue
        verts, faces = extract_mesh(field, LevelSetSettings(config.refine.grid_resolution, level), device)
        row[f"iou_{name}"] = aligned_volume_iou(verts, faces, shape, VOLUME_RESOLUTION) if faces.shape[0] else 0.0
    return row


def format_table(rows: list[dict], names: list[str]) -> str:
    head = f"{'prompt':<20}{'seed':>5}{'auto op.':>9}" + "".join(f"{'IoU ' + n:>11}" for n in names)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['prompt']:<20}{r['seed']:>5}{r['auto_opacity']:>9.2f}" + "".join(f"{r['iou_' + n]:>11.3f}" for n in names))
    groups = {"mean": rows} | {f"mean {s}": [r for r in rows if r["shape"] == s] for s in sorted({r["shape"] for r in rows})}
    lines.append("-" * len(head))
    for label, group in groups.items():
        if group:
            means = [sum(r["iou_" + n] for r in group) / len(group) for n in names]
            lines.append(f"{label:<34}" + "".join(f"{m:>11.3f}" for m in means))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run folders, or folders holding run folders")
    parser.add_argument("--opacities", nargs="*", type=float, default=[0.5, 0.8], help="fixed opacity targets to compare")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    bad = [o for o in args.opacities if not 0.0 < o < 1.0]
    if bad:
        parser.error(f"opacities must be in (0, 1), got {bad}")
    rows = []
    for folder in finished_runs(parser, args.paths):
        with torch.no_grad():
            rows.append(measure_run(folder, args.opacities))
        print(f"{folder.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.startswith("iou_")), flush=True)
    print(format_table(rows, [f"{o:g}" for o in args.opacities] + ["auto"]))
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The solid checks of `bench.solid_metrics` for finished run folders, as one table.

    python -m bench.solid_checks RUN_DIR [RUN_DIR ...] [--json OUT.json]
    python -m bench.solid_checks RUN_DIR --initial 0 2   # the refine stage's starting surface, per fill_tunnel

Each folder needs model.obj (+ its texture) and run.json (for the prompt, hence the shape and colour).
Also printed: the volumetric IoU against the primitive (at its best heading) and the colour error of the
baked texture, so that a cleaner solid can be checked for not costing shape or colour. With `--initial`,
the surface the refine stage starts from (marching tets on the DMTet made from the run's coarse.pt, with
the run's grid, no deformation) is measured instead, once per `refine.fill_tunnel` value given; its colour
error is that of the coarse field's mean albedo on that surface's vertices.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.evaluate import color_error
from bench.quality import load_export, mean_texture_color
from bench.shape_checks import aligned_volume_iou
from bench.solid_metrics import solid_checks
from guidance.primitive_shapes import parse_prompt
from stages.runs import RunRecord

VOLUME_RESOLUTION = 64  # as bench.quality
COLUMNS = (  # key, header, format
    ("shells", "shells", "d"), ("closed_shells", "closed", "d"), ("euler", "euler", "d"), ("euler_expected", "want", "d"),
    ("self_intersections", "self-x", "d"), ("cavity_share", "cavity", ".3f"), ("angle_p95", "ang p95", ".1f"),
    ("angle_max", "ang max", ".1f"), ("weld_pairs", "weld", "d"), ("base_pit", "base pit", ".3f"), ("base_bulge", "bulge", ".3f"),
    ("cap_pit", "cap pit", ".3f"), ("cap_bulge", "bulge", ".3f"), ("volume_iou", "vol IoU", ".3f"),
    ("color_error", "colour", ".3f"), ("dropped_shells", "dropped", "d"),
)


def measure_run(run_dir: Path) -> dict:
    record = RunRecord.load(run_dir)
    prompt = record.prompt
    color, shape, _ = parse_prompt(prompt)
    mesh = load_export(run_dir / "model.obj")
    return {
        "run": str(run_dir), "prompt": prompt, "shape": shape, **solid_checks(mesh, shape),
        "volume_iou": aligned_volume_iou(mesh["vertices"], mesh["faces"], shape, VOLUME_RESOLUTION),
        "color_error": color_error(torch.tensor(mean_texture_color(mesh)), color),
        "dropped_shells": record.stage_stats.get("export", {}).get("dropped_shells"),  # None in runs older than the shell check
    }


def measure_initial(run_dir: Path, tunnel: int) -> dict:
    """The solid checks of the refine stage's starting surface from the run's coarse checkpoint."""
    from geometry.level_set import LevelSetSettings, extract_mesh
    from geometry.visibility import camera_band
    from stages.config import from_dict
    from stages.runs import load_coarse_checkpoint

    record = RunRecord.load(run_dir)
    config = from_dict(record.config)
    refine = config.refine
    color, shape, _ = parse_prompt(record.prompt)
    field = load_coarse_checkpoint(run_dir / "coarse.pt", torch.device("cpu"))
    cameras = None if refine.fill_unseen == "off" else camera_band(config.camera, refine.fill_unseen == "cameras")
    settings = LevelSetSettings(refine.grid_resolution, refine.threshold, refine.grid_margin, refine.sdf_smoothing,
                                refine.surface_opacity, tunnel, cameras=cameras)
    verts, faces = extract_mesh(field, settings)
    mesh = {"vertices": verts.double().numpy(), "faces": faces.numpy()}
    with torch.no_grad():  # the colour the refine stage starts from: the field's albedo on that surface
        albedo = field.albedo(verts.float()).mean(0) if verts.shape[0] else None
    return {"run": f"{run_dir.name} tunnel {tunnel}", "prompt": record.prompt, "shape": shape,
            **solid_checks(mesh, shape), "volume_iou": aligned_volume_iou(mesh["vertices"], mesh["faces"], shape,
                                                                          VOLUME_RESOLUTION),
            "color_error": None if albedo is None else color_error(albedo, color)}


def format_table(rows: list[dict]) -> str:
    head = f"{'run':<28}" + "".join(f"{h:>9}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{'-':>9}" if r.get(k) is None else f"{r[k]:>9{spec}}" for k, _, spec in COLUMNS]
        lines.append(f"{Path(r['run']).name[:27]:<28}" + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--initial", type=int, nargs="+", default=None, metavar="TUNNEL",
                        help="measure the refine stage's starting surface from coarse.pt, per refine.fill_tunnel value")
    args = parser.parse_args(argv)
    needed = ("coarse.pt", "run.json") if args.initial else ("model.obj", "run.json")
    missing = [str(r) for r in args.runs if not all((r / name).exists() for name in needed)]
    if missing:
        print(f"error: no {' or '.join(needed)} in {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.initial:
        rows = [measure_initial(r, t) for r in args.runs for t in args.initial]
    else:
        rows = [measure_run(r) for r in args.runs]
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

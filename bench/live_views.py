"""What the live views cost: previews (colour + normals) and intermediate GLBs, against their stages' time.

One whole run of the `quick` preset ("a red cube", primitives prior, CPU) through `stages.pipeline`;
run.json records, per stage, its seconds and the seconds spent on previews and intermediate models
(`preview_seconds`, `model_seconds`). Then, from that run's checkpoints, each live view is timed
again on its own (median of `--repeats`): the coarse surface GLB, one refine-mesh GLB, one coarse
preview and one refine preview. The issue's bounds: a preview budget of 5 % of its stage's time
(all its previews together), an intermediate model at most 2 % of its stage's time (each).

Shorter runs (`--set coarse.iters=100`) are projected to the preset's step counts: the training
seconds per step of the run, times the preset's steps, plus the preset's previews and models at the
seconds they took in the run.

    python -m bench.live_views                  # writes bench/out/live_views.json
    python -m bench.live_views --set coarse.iters=100 --set refine.iters=100 --repeats 3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a red cube"


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn()."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(overrides: list[str], repeats: int) -> dict:
    from renderers.rasterizer import Rasterizer
    from stages.config import apply_overrides, preset
    from stages.live_models import LiveModels
    from stages.pipeline import generate
    from stages.previews import mesh_preview, nerf_preview
    from stages.runs import RunRecord, load_coarse_checkpoint, load_refine_checkpoint

    config = preset("quick")
    config.guidance, config.device = "primitives", "cpu"
    apply_overrides(config, overrides)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        models = []  # (stage, step, bytes) of every intermediate GLB, read when its event came

        start = time.perf_counter()
        for event in generate(PROMPT, config, run_dir=run_dir):
            if event.model:
                models.append((event.stage, event.step, Path(event.model).stat().st_size))
        total = time.perf_counter() - start
        left_over = sorted(p.name for p in Path(run_dir).glob("preview-*.glb"))
        record = RunRecord.load(run_dir)
        config = record.run_config()  # as the run resolved it (the model's backgrounds, ambient light)
        # Each live view again, on its own, from the checkpoints.
        field = load_coarse_checkpoint(Path(run_dir) / "coarse.pt", device)
        (verts, faces), color_field = load_refine_checkpoint(Path(run_dir) / "refine.pt", device)
        live = LiveModels.for_run(run_dir, config.refine)
        white = torch.ones(1, 3)
        rasterizer = Rasterizer.make(config.refine.backend, device)
        alone = {
            "coarse_model": timed(lambda: live.coarse_surface(field, device), repeats),
            "refine_model": timed(lambda: live.refine_mesh(verts, faces, color_field, 1), repeats),
            "coarse_preview": timed(lambda: nerf_preview(
                field, config.coarse.volume, config.coarse.preview_views, config.coarse.preview_resolution, white),
                repeats),
            "refine_preview": timed(lambda: mesh_preview(
                verts, faces, color_field, config.refine.preview_views, config.refine.preview_resolution,
                config.refine.ambient, rasterizer, device), repeats),
        }
    stats, seconds = record.stage_stats, record.stage_seconds
    full = preset("quick")
    projected = {}
    for s in ("coarse", "refine"):
        run_models = sum(m[0] == s for m in models)
        extras = stats[s]["preview_seconds"] + stats[s].get("model_seconds", 0.0)
        per_step = (seconds[s] - extras) / getattr(config, s).iters
        one_preview = stats[s]["preview_seconds"] / previews_of(config, s)
        one_model = stats[s].get("model_seconds", 0.0) / max(run_models, 1)
        full_models = 1 if s == "coarse" else len([k for k in range(1, full.refine.iters) if k % full.refine.model_every == 0])
        stage = per_step * getattr(full, s).iters + one_preview * previews_of(full, s) + one_model * full_models
        projected[s] = {"stage_seconds": stage, "previews": previews_of(full, s), "models": full_models,
                        "preview_share": one_preview * previews_of(full, s) / stage, "model_share_each": one_model / stage}
    return {
        "prompt": PROMPT, "preset": "quick", "overrides": overrides, "total_seconds": total,
        "stage_seconds": seconds, "torch_threads": torch.get_num_threads(),
        "previews": {s: {"count": previews_of(config, s),
                         "seconds": stats[s]["preview_seconds"], "share": stats[s]["preview_seconds"] / seconds[s]}
                     for s in ("coarse", "refine")},
        "models": [{"stage": s, "step": step, "bytes": size} for s, step, size in models],
        "model_seconds": {s: stats[s].get("model_seconds", 0.0) for s in ("coarse", "refine")},
        "model_share_each": {
            "coarse": stats["coarse"].get("model_seconds", 0.0) / seconds["coarse"],
            "refine": stats["refine"].get("model_seconds", 0.0) / max(sum(s == "refine" for s, _, _ in models), 1)
                      / seconds["refine"],
        },
        "alone_seconds": alone,
        "left_over_after_export": left_over,
        "projected_to_quick": projected,
    }


def previews_of(config, stage: str) -> int:
    """Previews a stage renders: every `preview_every` steps and at the end."""
    c = getattr(config, stage)
    every = [s for s in range(1, c.iters + 1) if c.preview_every and s % c.preview_every == 0]
    return len(set(every) | {c.iters})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=5, help="calls per live view timed on its own (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--out", default="bench/out/live_views.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args.overrides, args.repeats)
    for stage in ("coarse", "refine"):
        p = report["previews"][stage]
        print(f"{stage}: stage {report['stage_seconds'][stage]:.1f} s; {p['count']} previews {p['seconds']:.2f} s "
              f"({100 * p['share']:.1f} % of the stage; 5 % allowed); one alone {report['alone_seconds'][stage + '_preview']:.2f} s")
        print(f"{stage}: intermediate models {report['model_seconds'][stage]:.2f} s in the run, "
              f"{100 * report['model_share_each'][stage]:.2f} % of the stage each (2 % allowed); "
              f"one alone {report['alone_seconds'][stage + '_model']:.3f} s")
    for stage, p in report["projected_to_quick"].items():
        print(f"{stage} projected to the quick preset's steps: stage {p['stage_seconds']:.1f} s, {p['previews']} previews "
              f"{100 * p['preview_share']:.1f} %, {p['models']} models {100 * p['model_share_each']:.2f} % each")
    print("models: " + ", ".join(f"{m['stage']} step {m['step']} ({m['bytes'] / 1e3:.0f} kB)" for m in report["models"]))
    print(f"whole run {report['total_seconds']:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                             report["stage_seconds"].items())
          + f"); intermediate GLBs left after the export: {report['left_over_after_export'] or 'none'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

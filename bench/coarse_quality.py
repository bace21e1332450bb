"""The coarse stage alone, with the primitives prior: silhouette IoU and colour of the trained field.

Runs `stages.coarse.run` at a preset (adapted to the prior exactly as a run is) for each prompt
and seed, and measures the field with `bench.evaluate.evaluate_field`: silhouette IoU against
the true primitive over the 8 held-out views (alpha > 0.5), its worst view, and the mean albedo
on the object against the named colour. Prints one line per run and writes JSON.

    python -m bench.coarse_quality --prompts "a red sphere" "a green cube" --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bench.evaluate import evaluate_field
from bench.speed import check_threads, use_threads, write_json
from guidance import registry
from guidance.primitive_shapes import parse_prompt
from stages import coarse
from stages.config import PRESETS, apply_overrides, preset
from stages.workers import kept_guidance


def run_one(prompt: str, seed: int, preset_name: str, overrides: list[str]) -> dict:
    config = apply_overrides(preset(preset_name), overrides)
    registry.get("primitives").adapt(config, prompt)
    config.coarse.seed = seed
    prior = kept_guidance(registry.get("primitives"), config, torch.device("cpu"))  # one library for every prompt, cached
    color, shape, _ = parse_prompt(prompt)
    start = time.perf_counter()
    result = coarse.run(prior, prompt, config.coarse, config.camera)
    seconds = time.perf_counter() - start
    scores = evaluate_field(result.field, shape, color)
    return {"prompt": prompt, "seed": seed, "seconds": round(seconds, 1), **scores,
            "step_split_s": {k: round(v, 4) for k, v in result.stats.items() if k.endswith("_s_per_step")}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", default=["a red sphere", "a green cube"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--preset", default="quick", choices=PRESETS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, default=Path("bench/out/coarse_quality.json"))
    args = parser.parse_args(argv)
    check_threads(parser, args.threads)
    for prompt in args.prompts:
        parse_prompt(prompt)  # an unknown prompt is a usage error, raised before any run
    use_threads(args.threads)
    rows = []
    for prompt in args.prompts:
        for seed in args.seeds:
            row = run_one(prompt, seed, args.preset, args.overrides)
            rows.append(row)
            print(f"{prompt:<20} seed {seed}: silhouette IoU {row['silhouette_iou']:.3f} (worst view "
                  f"{row['silhouette_iou_min']:.3f}), colour error {row['color_error']:.3f}, albedo {row['mean_albedo']}, "
                  f"{row['seconds']:.0f} s; per step {row['step_split_s']}", flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much light is baked into a run's texture: brightness of upward versus downward faces.

A uniformly coloured prompt ("a brown cone") should bake the same albedo on every face; a
texture that learned the training light (from above) is brighter on faces whose normal points
up (+z in the training frame) than on faces pointing down. Reads a run folder's model.obj and
texture_kd.png; prints the area-weighted mean brightness (mean of R, G, B in [0, 1]) of faces
with normal z > 0.3 and < -0.3 and their ratio (1.0 = no baked light): `bench.shape_checks`,
which bench.quality also reports for every run.

    python -m bench.albedo_updown RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.quality import load_export
from bench.shape_checks import albedo_up_down


def up_down(run_dir: str) -> dict:
    result = albedo_up_down(load_export(Path(run_dir) / "model.obj"))
    return {"run": str(run_dir), "up": round(result["albedo_up"], 4), "down": round(result["albedo_down"], 4),
            "ratio": round(result["albedo_up_down"], 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    for run in args.runs:
        print(json.dumps(up_down(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How much light is baked into a run's texture: brightness of upward versus downward faces.

A uniformly coloured prompt ("a brown cone") should bake the same albedo on every face; a
texture that learned the training light (from above) is brighter on faces whose normal points
up (+z in the training frame) than on faces pointing down. Reads a run folder's model.obj and
texture_kd.png; prints the area-weighted mean brightness (mean of R, G, B in [0, 1]) of faces
with normal z > 0.3 and < -0.3 and their ratio (1.0 = no baked light).

    python -m bench.albedo_updown RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import trimesh

from stages.export import from_y_up


def face_brightness(run_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # per face: brightness, normal z, area
    mesh = trimesh.load(str(Path(run_dir) / "model.obj"), force="mesh", process=False)
    tex = np.asarray(mesh.visual.material.image.convert("RGB"), dtype=np.float64) / 255
    h, w = tex.shape[:2]
    uv = mesh.visual.uv[mesh.faces].mean(1)  # [F, 2], OBJ convention: v = 0 is the bottom row
    col = tex[np.clip(((1 - uv[:, 1]) * h).astype(int), 0, h - 1), np.clip((uv[:, 0] * w).astype(int), 0, w - 1)]
    normal_z = from_y_up(mesh.face_normals)[:, 2]
    return col.mean(1), normal_z, mesh.area_faces


def up_down(run_dir: str, cos: float = 0.3) -> dict:
    bright, nz, area = face_brightness(run_dir)
    up, down = nz > cos, nz < -cos
    mean_up = float(np.average(bright[up], weights=area[up])) if up.any() else float("nan")
    mean_down = float(np.average(bright[down], weights=area[down])) if down.any() else float("nan")
    return {"run": str(run_dir), "up": round(mean_up, 4), "down": round(mean_down, 4), "ratio": round(mean_up / mean_down, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    for run in args.runs:
        print(json.dumps(up_down(run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

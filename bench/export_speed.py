"""Speed of stages.export on bumpy, noisy meshes of about 20k, 100k and 250k faces.

Times the five export steps (clean + decimation, unwrap, bake, write, turntable) with the
default ExportConfig (meshes above target_faces are decimated first), plus the 100k mesh
without decimation to show what xatlas costs at full size. Reads every OBJ back into the
training frame and checks its face count. Prints a table and writes bench/out/export_speed.json.

    python -m bench.export_speed                       (from the repo root)
    python -m bench.export_speed --cases ico20k --no-turntable
"""

import argparse
import json
import math
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import trimesh
from torch import Tensor

from stages.export import ExportConfig, export, from_y_up

STEPS = ("clean", "unwrap", "bake", "write", "turntable")


def bumpy(vertices: np.ndarray, faces: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """Smooth bumps along the normals plus per-vertex noise of `noise` x the mean edge length."""
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    p, n = mesh.vertices, mesh.vertex_normals
    bumps = 0.04 * np.sin(7 * p[:, 0]) * np.cos(5 * p[:, 1]) + 0.03 * np.sin(9 * p[:, 2])
    jitter = noise * mesh.edges_unique_length.mean() * np.random.default_rng(seed).normal(size=len(p))
    return p + (bumps + jitter)[:, None] * n


def torus(faces: int, major: float = 0.4, minor: float = 0.18) -> tuple[np.ndarray, np.ndarray]:
    """Torus around z with about `faces` triangles."""
    n = max(3, round(math.sqrt(2 * faces)))  # segments around the ring; n / 2 around the tube
    m = max(3, round(faces / (2 * n)))
    a, b = np.meshgrid(np.arange(n) * 2 * math.pi / n, np.arange(m) * 2 * math.pi / m, indexing="ij")
    r = major + minor * np.cos(b)
    verts = np.stack([r * np.cos(a), r * np.sin(a), minor * np.sin(b)], -1).reshape(-1, 3)
    i, j = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
    v00, v10 = i * m + j, (i + 1) % n * m + j
    v01, v11 = i * m + (j + 1) % m, (i + 1) % n * m + (j + 1) % m
    tri = np.concatenate([np.stack([v00, v10, v11], -1), np.stack([v00, v11, v01], -1)]).reshape(-1, 3)
    return verts, tri


def colour_field(points: Tensor) -> Tensor:  # [N, 3] -> [N, 3] smooth colours in [0.1, 0.9]
    return 0.5 + 0.4 * torch.sin(4.0 * points + torch.tensor([0.0, 2.0, 4.0], dtype=points.dtype, device=points.device))


def make_mesh(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "ico20k":
        sphere = trimesh.creation.icosphere(subdivisions=5, radius=0.5)  # 20480 faces
        return bumpy(sphere.vertices, sphere.faces, 0.2), sphere.faces
    count = {"torus100k": 100_000, "torus100k_full": 100_000, "torus250k": 250_000}[name]
    v, f = torus(count)
    return bumpy(v, f, 0.2), f


def run_case(name: str, config: ExportConfig, device: torch.device) -> dict:
    vertices, faces = make_mesh(name)
    if name.endswith("_full"):
        config = replace(config, target_faces=0)
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        result = export(
            torch.tensor(vertices, dtype=torch.float32, device=device), torch.tensor(faces, device=device),
            colour_field, out_dir, config,
        )
        total = time.perf_counter() - t0
        back = trimesh.load(result.paths["obj"], force="mesh", process=False)
        back_vertices = from_y_up(back.vertices)  # the training frame again
        assert len(back.faces) == result.num_faces
        assert np.allclose(back_vertices.mean(0), vertices.mean(0), atol=0.05), "mesh moved on export"
        sizes = {key: Path(path).stat().st_size for key, path in result.paths.items() if path}
    return {
        "case": name,
        "input_faces": int(len(faces)),
        "output_faces": result.num_faces,
        "output_vertices": result.num_vertices,
        "seconds": {key: round(result.timings[key], 3) for key in STEPS},
        "without_turntable": round(sum(result.timings[k] for k in STEPS[:4]), 3),
        "total": round(total, 3),
        "bytes": sizes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["ico20k", "torus100k", "torus100k_full", "torus250k"])
    parser.add_argument("--texture-size", type=int, default=1024)
    parser.add_argument("--no-turntable", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/out/export_speed.json")
    args = parser.parse_args()

    config = ExportConfig(texture_size=args.texture_size, turntable=not args.no_turntable)
    device = torch.device(args.device)
    rows = [run_case(name, config, device) for name in args.cases]

    header = f"{'case':<16}{'faces in':>9}{'out':>8}" + "".join(f"{s:>10}" for s in STEPS) + f"{'no tt':>8}{'total':>8}"
    print(header)
    for row in rows:
        print(
            f"{row['case']:<16}{row['input_faces']:>9}{row['output_faces']:>8}"
            + "".join(f"{row['seconds'][s]:>10.2f}" for s in STEPS)
            + f"{row['without_turntable']:>8.2f}{row['total']:>8.2f}"
        )
    report = {
        "config": asdict(config),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

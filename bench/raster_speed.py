"""Speed of the pure-PyTorch rasterizer on a ~20k-face torus seen in perspective.

Times, per resolution: rasterize (forward), interpolate (forward), the backward of a
loss on the interpolated attribute w.r.t. pos_clip and attr, and antialias (forward and
backward). Prints a table and writes bench/out/raster_speed.json.

    python -m bench.raster_speed --res 256 512 --faces 20000 --repeats 3  (from the repo root)
"""

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import Tensor

from renderers.raster import antialias, interpolate, rasterize


def torus(faces: int, major: float = 0.45, minor: float = 0.2) -> tuple[Tensor, Tensor]:
    """Torus around z with about `faces` triangles: vertices [V, 3], tri [F, 3]."""
    n = max(3, round(math.sqrt(faces)))  # segments around the ring; n/2 around the tube
    m = max(3, round(faces / (2 * n)))
    a = torch.arange(n) * (2 * math.pi / n)
    b = torch.arange(m) * (2 * math.pi / m)
    A, Bt = torch.meshgrid(a, b, indexing="ij")
    r = major + minor * torch.cos(Bt)
    verts = torch.stack([r * torch.cos(A), r * torch.sin(A), minor * torch.sin(Bt)], -1).reshape(-1, 3)
    i, j = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
    v00, v10 = i * m + j, (i + 1) % n * m + j
    v01, v11 = i * m + (j + 1) % m, (i + 1) % n * m + (j + 1) % m
    tri = torch.cat([torch.stack([v00, v10, v11], -1), torch.stack([v00, v11, v01], -1)]).reshape(-1, 3)
    return verts, tri


def perspective_mvp(fovy_deg: float = 45.0, distance: float = 2.0, elevation_deg: float = 30.0) -> Tensor:
    """proj @ w2c [4, 4] for a camera on the x-z plane looking at the origin (y flipped)."""
    f = 1.0 / math.tan(math.radians(fovy_deg) / 2)
    near, far = 0.1, 10.0
    proj = torch.tensor([
        [f, 0, 0, 0],
        [0, -f, 0, 0],
        [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
        [0, 0, -1, 0],
    ])
    e = math.radians(elevation_deg)
    eye = torch.tensor([distance * math.cos(e), 0.0, distance * math.sin(e)])
    back = eye / eye.norm()
    right = torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back)
    right = right / right.norm()
    up = torch.linalg.cross(back, right)
    w2c = torch.eye(4)
    w2c[:3, :3] = torch.stack([right, up, back])
    w2c[:3, 3] = -w2c[:3, :3] @ eye
    return proj @ w2c


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (seconds) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_resolution(res: int, verts: Tensor, tri: Tensor, repeats: int) -> dict:
    mvp = perspective_mvp()
    pos = torch.cat([verts, torch.ones_like(verts[:, :1])], -1) @ mvp.T
    pos_clip = pos[None].clone().requires_grad_(True)  # [1, V, 4]
    attr = (verts[None] * 0.5 + 0.5).clone().requires_grad_(True)  # [1, V, 3] colours

    t_rast, rast = timed(lambda: rasterize(pos_clip, tri, (res, res)), repeats)
    t_interp, color = timed(lambda: interpolate(attr, rast, tri), repeats)

    def backward() -> None:
        r = rasterize(pos_clip, tri, (res, res))
        interpolate(attr, r, tri).square().mean().backward()

    t_fwd_bwd, _ = timed(backward, repeats)

    def aa() -> None:
        r = rasterize(pos_clip, tri, (res, res))
        c = interpolate(attr, r, tri)
        antialias(c, r, pos_clip, tri).square().mean().backward()

    t_aa_total, _ = timed(aa, repeats)
    t_aa_fwd, _ = timed(lambda: antialias(color.detach(), rast.detach(), pos_clip.detach(), tri), repeats)
    return {
        "resolution": res,
        "faces": int(tri.shape[0]),
        "covered_pixels": int((rast[..., 3] > 0).sum()),
        "rasterize_fwd_s": t_rast,
        "interpolate_fwd_s": t_interp,
        "rast_interp_fwd_bwd_s": t_fwd_bwd,
        "antialias_fwd_s": t_aa_fwd,
        "rast_interp_aa_fwd_bwd_s": t_aa_total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=[256, 512], help="square resolutions, px")
    parser.add_argument("--faces", type=int, default=20000, help="approximate triangle count")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    args = parser.parse_args()

    verts, tri = torus(args.faces)
    rows = [bench_resolution(r, verts, tri, args.repeats) for r in args.res]
    cols = list(rows[0])
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
    out = Path(__file__).parent / "out" / "raster_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

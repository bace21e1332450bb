"""Shape checks of an exported model against its primitive, beyond IoU: topology, flat bases, baked
light and texture use. Each takes `bench.quality.load_export`'s dict (training frame, +z up).

- genus: the welded mesh's parts, Euler number and, when closed, genus (parts - Euler / 2); a torus
  has genus 1, every other primitive 0;
- base gap: for shapes with a flat base (cube, cylinder, cone), the mean distance from the true base
  plane of the lowest 5 % of points sampled uniformly over the surface (area-weighted, so that a
  decimated flat base with few vertices counts for its area); 0 = a flat base in the right place;
- albedo up/down: the area-weighted mean texture brightness of faces facing up (normal z > 0.3) over
  those facing down (< -0.3); every prompt of the vocabulary is one colour, so 1.0 = no light baked in;
- fill: the share of the texture's texel centres that some triangle covers (`geometry.uv.texture_fill`).

Turning about z: no prompt names the object's heading, and the primitives prior cannot see it (each
view word spans 90 degrees or more of azimuth, as much as the cube's own symmetry), so a cube may come
out turned about z. `align_azimuth` turns it by the angle that matches the true cube best before
anything is measured; every other primitive is symmetric about z.
"""
from __future__ import annotations

import numpy as np
import torch
import trimesh

from geometry.mesh_ops import face_areas
from geometry.uv import texture_fill
from guidance.primitive_shapes import primitive_mesh
from renderers import raster

FLAT_BASE_SHAPES = ("cube", "cylinder", "cone")
EXPECTED_GENUS = {"torus": 1}  # every other shape: 0
BASE_SHARE = 0.05  # the lowest share of surface points that the base gap measures
BASE_SAMPLES = 20_000  # surface points of the base gap
FACING = 0.3  # |normal z| above which a face counts as facing up or down
AZIMUTH_PERIOD = {"cube": 90.0}  # degrees after which a shape looks the same turned about z; others: symmetric
AZIMUTH_STEP = 3.0  # degrees between the headings `align_azimuth` tries


def turned(mesh: dict, degrees: float) -> dict:
    """The mesh turned about z (vertices and corner normals)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return {**mesh, "vertices": mesh["vertices"] @ rotation.T, "corner_normals": mesh["corner_normals"] @ rotation.T}


def align_azimuth(mesh: dict, shape: str, score) -> tuple[dict, float]:
    """The mesh turned about z by the heading (a multiple of AZIMUTH_STEP within the shape's period)
    with the best `score(mesh)` (higher is better), and that angle; unchanged for symmetric shapes."""
    period = AZIMUTH_PERIOD.get(shape)
    if period is None:
        return mesh, 0.0
    angles = np.arange(0.0, period, AZIMUTH_STEP)
    best = max(angles, key=lambda a: score(turned(mesh, float(a))))
    return turned(mesh, float(best)), float(best)


def aligned_volume_iou(vertices, faces, shape: str, resolution: int) -> float:
    """Volumetric IoU with the primitive at the best heading (`align_azimuth`); vertices [V, 3], faces [F, 3]."""
    from geometry.metrics import volumetric_iou

    truth = primitive_mesh(shape)
    mesh = {"vertices": np.asarray(vertices, dtype=np.float64), "faces": np.asarray(faces),
            "corner_normals": np.zeros((len(faces), 3, 3))}
    mesh, _ = align_azimuth(mesh, shape, lambda m: volumetric_iou((m["vertices"], m["faces"]), truth, resolution))
    return volumetric_iou((mesh["vertices"], mesh["faces"]), truth, resolution)


def expected_genus(shape: str) -> int:
    return EXPECTED_GENUS.get(shape, 0)


def topology(mesh: dict) -> dict:
    """Parts, Euler number and genus of the mesh with its vertices welded by position (as an importer's
    merge by distance would); genus is None when the welded mesh is not closed."""
    welded = trimesh.Trimesh(mesh["vertices"], mesh["faces"], process=True)  # merges equal positions
    parts = len(welded.split(only_watertight=False))
    euler = int(welded.euler_number)
    closed = bool(welded.is_watertight)
    genus = (2 * parts - euler) // 2 if closed else None
    return {"parts": parts, "euler": euler, "closed": closed, "genus": genus}


def base_gap(mesh: dict, shape: str, seed: int = 0) -> float | None:
    """Mean |z - z_base| of the lowest BASE_SHARE of uniform surface samples; None for shapes without a flat base."""
    if shape not in FLAT_BASE_SHAPES:
        return None
    z_base = float(primitive_mesh(shape).vertices[:, 2].min())
    v, f = mesh["vertices"], mesh["faces"]
    area = face_areas(v, f)
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), size=BASE_SAMPLES, p=area / area.sum())
    r1, r2 = rng.random(BASE_SAMPLES), rng.random(BASE_SAMPLES)
    s = np.sqrt(r1)
    corners = v[f[face]]  # [N, 3, 3]
    z = (1 - s) * corners[:, 0, 2] + s * (1 - r2) * corners[:, 1, 2] + s * r2 * corners[:, 2, 2]
    lowest = np.sort(z)[: max(1, int(BASE_SHARE * BASE_SAMPLES))]
    return float(np.abs(lowest - z_base).mean())


def face_colors(mesh: dict) -> np.ndarray:
    """The texture sampled (bilinearly) at each face's centroid UV: [F, 3] in [0, 1]."""
    uv = torch.tensor(mesh["uv"][mesh["faces"]].mean(1), dtype=torch.float32)  # [F, 2]
    tex = torch.tensor(mesh["texture"])[None]  # [1, T, T, 3], row 0 = v 0
    return raster.texture(tex, uv[None, :, None, :], boundary="clamp")[0, :, 0].double().numpy()


def albedo_up_down(mesh: dict) -> dict:
    """Area-weighted mean brightness (mean of R, G, B) of faces facing up and down, and their ratio."""
    v, f = mesh["vertices"], mesh["faces"]
    normal = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    normal_z = normal[:, 2] / np.maximum(np.linalg.norm(normal, axis=1), 1e-20)
    bright, area = face_colors(mesh).mean(1), face_areas(v, f)
    up, down = normal_z > FACING, normal_z < -FACING
    mean_up = float(np.average(bright[up], weights=area[up])) if area[up].sum() > 0 else float("nan")
    mean_down = float(np.average(bright[down], weights=area[down])) if area[down].sum() > 0 else float("nan")
    return {"albedo_up": mean_up, "albedo_down": mean_down, "albedo_up_down": mean_up / mean_down}


def fill(mesh: dict) -> float:
    """Share of the texture's texel centres covered by a triangle in UV space."""
    return texture_fill(mesh["uv"], mesh["faces"], mesh["texture"].shape[0])


def shape_checks(mesh: dict, shape: str) -> dict:
    """Every check above for one exported model of `shape`, and the solid checks of `bench.solid_metrics`."""
    from bench.solid_metrics import solid_checks

    topo = topology(mesh)
    return {**solid_checks(mesh, shape), **topo, "genus_ok": topo["genus"] == expected_genus(shape),
            "base_gap": base_gap(mesh, shape), **albedo_up_down(mesh), "fill": fill(mesh)}


# --------------------------------------------------------------------------- the table of bench.quality
def _cell(value, spec: str, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    sign, spec = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
    return f"{value:>{sign}{width}{spec}}"


def format_shape_table(rows: list[dict]) -> str:
    """Per run: genus (expected), base gap, albedo up/down, texture fill and the refine stage's
    volumetric IoU gain; then per shape: the means, and how many runs have the right genus."""
    head = (f"{'prompt':<18}{'seed':>5}{'parts':>6}{'genus':>6}{'want':>5}{'base gap':>9}{'up/down':>8}{'fill':>6}"
            f"{'IoU start':>10}{'IoU refined':>12}{'gain':>8}")
    lines = [head, "-" * len(head)]
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        lines.append(f"{r['prompt']:<18}{r['seed']:>5}{r['parts']:>6}{_cell(r['genus'], 'd', 6)}{r['genus_expected']:>5}"
                     f"{_cell(r['base_gap'], '.3f', 9)}{r['albedo_up_down']:>8.3f}{r['fill']:>6.2f}"
                     f"{_cell(r.get('iou_start'), '.3f', 10)}{_cell(r.get('iou_refined'), '.3f', 12)}"
                     f"{_cell(r.get('refine_gain'), '+.3f', 8)}")
    lines += ["-" * len(head), "per shape: right genus / runs, mean base gap, mean |up/down - 1|, mean fill, mean gain"]
    for shape in dict.fromkeys(r["shape"] for r in ok):
        group = [r for r in ok if r["shape"] == shape]
        gaps = [r["base_gap"] for r in group if r["base_gap"] is not None]
        gains = [r["refine_gain"] for r in group if r.get("refine_gain") is not None]
        lines.append(
            f"  {shape:<9} genus {sum(r['genus_ok'] for r in group)}/{len(group)}"
            f"  base gap {_cell(float(np.mean(gaps)) if gaps else None, '.3f', 6)}"
            f"  |up/down - 1| {np.mean([abs(r['albedo_up_down'] - 1) for r in group]):.3f}"
            f"  fill {np.mean([r['fill'] for r in group]):.2f}"
            f"  gain {_cell(float(np.mean(gains)) if gains else None, '+.3f', 7)}")
    return "\n".join(lines)

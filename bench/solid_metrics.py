"""Is the export one clean solid? Checks that look inside the object and at what cameras barely see.
Each takes `bench.quality.load_export`'s dict (training frame, +z up); the mesh is welded
by position first, as an importer's merge by distance would.

- shells: connected pieces, and how many of them are closed;
- self-intersections: pairs of faces that share no vertex and cross each other;
- flat faces (base, cap): the surface's lowest (base) or highest (cap) point along vertical lines over
  the inner FLAT_INNER of the face's true footprint (a square one in the object's own heading), against the face's true plane (as `base_gap`):
  `pit` is how far the deepest point lies inside it, `bulge` how far the farthest point sticks out;
  a line that misses the mesh (a hole) counts as a pit as deep as the object is tall;
- cavity share: 1 - mesh volume / filled volume, on a CAVITY_RESOLUTION^3 occupancy grid whose
  enclosed empty cells are filled (a tunnel narrower than a cell does not open a cavity);
- Euler number against the shape's own (torus 0, every other shape 2);
- angles between adjacent faces: 95th percentile and maximum, degrees;
- weld pairs: distinct vertex positions closer than WELD_DISTANCE, which an importer's merge by distance
  joins without looking (each such weld can fold or pinch the surface).
"""
from __future__ import annotations

import numpy as np
import torch
import trimesh
from scipy import ndimage

from geometry.metrics import occupancy_grid

FLAT_FACES = {  # shape -> (face, true level z, footprint kind, footprint half size)
    "cube": (("base", -0.4, "square", 0.4), ("cap", 0.4, "square", 0.4)),
    "cylinder": (("base", -0.4, "disc", 0.4), ("cap", 0.4, "disc", 0.4)),
    "cone": (("base", -0.45, "disc", 0.45),),
}
EXPECTED_EULER = {"torus": 0}  # every other shape: 2
FLAT_INNER = 0.8  # share of the footprint's half size measured (the rims are rounded on purpose)
FLAT_RESOLUTION = 128  # px of the orthographic view from below / above
CAVITY_RESOLUTION = 96  # cells per axis of the cavity share's grid over [-1, 1]^3
WELD_DISTANCE = 1e-4  # Blender's default merge distance


def welded(mesh: dict) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh["vertices"], mesh["faces"], process=True)


def expected_euler(shape: str) -> int:
    return EXPECTED_EULER.get(shape, 2)


def shell_counts(solid: trimesh.Trimesh) -> dict:
    pieces = solid.split(only_watertight=False)
    return {"shells": len(pieces), "closed_shells": sum(bool(p.is_watertight) for p in pieces)}


def adjacent_angles(solid: trimesh.Trimesh) -> dict:
    """95th percentile and maximum angle between the normals of faces sharing an edge, degrees."""
    angles = np.degrees(solid.face_adjacency_angles)
    if len(angles) == 0:
        return {"angle_p95": None, "angle_max": None}
    return {"angle_p95": float(np.percentile(angles, 95)), "angle_max": float(angles.max())}


def _candidate_pairs(lo: np.ndarray, hi: np.ndarray, cell: float) -> np.ndarray:  # [P, 2], i < j
    """Pairs of boxes that share a cell of a uniform grid and overlap."""
    first, last = np.floor(lo / cell).astype(np.int64), np.floor(hi / cell).astype(np.int64)
    span = last - first + 1  # [F, 3]
    count = span.prod(1)
    owner = np.repeat(np.arange(len(lo)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    sx, sy = span[owner, 1] * span[owner, 2], span[owner, 2]
    ijk = first[owner] + np.stack([local // sx, local % sx // sy, local % sy], 1)
    ijk -= ijk.min(0)
    dims = ijk.max(0) + 1
    key = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    order = np.argsort(key, kind="stable")
    key, owner = key[order], owner[order]
    pairs = []
    for d in range(1, len(key)):
        same = key[d:] == key[:-d]
        if not same.any():
            break
        pairs.append(np.stack([owner[:-d][same], owner[d:][same]], 1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)
    overlap = ((lo[pairs[:, 0]] <= hi[pairs[:, 1]]) & (lo[pairs[:, 1]] <= hi[pairs[:, 0]])).all(1)
    return pairs[overlap]


def _edges_cross(tri_a: np.ndarray, tri_b: np.ndarray, eps: float = 1e-9) -> np.ndarray:  # [P, 3, 3] x2 -> [P]
    """Whether an edge of each triangle a passes strictly through the matching triangle b (Moller-Trumbore)."""
    hit = np.zeros(len(tri_a), dtype=bool)
    e1, e2 = tri_b[:, 1] - tri_b[:, 0], tri_b[:, 2] - tri_b[:, 0]
    for i, j in ((0, 1), (1, 2), (2, 0)):
        origin, direction = tri_a[:, i], tri_a[:, j] - tri_a[:, i]
        p = np.cross(direction, e2)
        det = (e1 * p).sum(1)
        ok = np.abs(det) > eps * np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1) * np.linalg.norm(direction, axis=1)
        inv = 1.0 / np.where(ok, det, 1.0)
        s = origin - tri_b[:, 0]
        u = (s * p).sum(1) * inv
        q = np.cross(s, e1)
        v = (direction * q).sum(1) * inv
        t = (e2 * q).sum(1) * inv
        hit |= ok & (u > eps) & (v > eps) & (u + v < 1 - eps) & (t > eps) & (t < 1 - eps)
    return hit


def self_intersections(solid: trimesh.Trimesh) -> int:
    """Pairs of faces that share no vertex and whose triangles cross (coplanar touching is not counted)."""
    v, f = np.asarray(solid.vertices), np.asarray(solid.faces)
    if len(f) < 2:
        return 0
    tri = v[f]  # [F, 3, 3]
    lo, hi = tri.min(1), tri.max(1)
    edge = np.median(np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1))
    pairs = _candidate_pairs(lo, hi, max(2.0 * float(edge), 1e-9))
    shared = (f[pairs[:, 0], :, None] == f[pairs[:, 1], None, :]).any((1, 2))
    pairs = pairs[~shared]
    a, b = tri[pairs[:, 0]], tri[pairs[:, 1]]
    return int((_edges_cross(a, b) | _edges_cross(b, a)).sum())


def _extreme_heights(solid: trimesh.Trimesh, centre: np.ndarray, half: float, from_below: bool) -> np.ndarray:
    """[R, R] lowest (from below) or highest surface z per pixel of an orthographic view over the
    square of side 2 * half around centre (x, y); NaN where the view sees no surface."""
    from renderers import raster

    v = torch.tensor(np.asarray(solid.vertices), dtype=torch.float64)
    z_lo, z_hi = float(v[:, 2].min()), float(v[:, 2].max())
    depth = (v[:, 2] - (z_lo + z_hi) / 2) / max(z_hi - z_lo, 1e-9) * 1.8  # in (-1, 1): the nearest wins
    depth = depth if from_below else -depth
    x = (v[:, 0] - centre[0]) / half
    y = (v[:, 1] - centre[1]) / half
    clip = torch.stack([x, y, depth, torch.ones_like(x)], 1)[None].float()
    faces = torch.tensor(np.asarray(solid.faces), dtype=torch.long)
    r = FLAT_RESOLUTION
    rast = raster.rasterize(clip, faces, (r, r))
    z = raster.interpolate(v[:, 2:3].float(), rast, faces)[0, ..., 0].double().numpy()
    return np.where(rast[0, ..., 3].numpy() > 0, z, np.nan)


def square_heading(solid: trimesh.Trimesh) -> trimesh.Trimesh:
    """The mesh turned about z so that its smallest-area bounding rectangle seen from above is axis-aligned
    (a square footprint is measured in the object's own heading, which SDS leaves free)."""
    v = np.asarray(solid.vertices)
    transform, _ = trimesh.bounds.oriented_bounds_2D(v[:, :2])
    turned = v.copy()
    turned[:, :2] = v[:, :2] @ transform[:2, :2].T
    return trimesh.Trimesh(turned, np.asarray(solid.faces), process=False)


def flat_faces(solid: trimesh.Trimesh, shape: str) -> dict:
    """Per flat face of the shape: `{face}_pit` and `{face}_bulge` (see the module docstring); {} for other shapes."""
    out = {}
    if any(kind == "square" for _, _, kind, _ in FLAT_FACES.get(shape, ())):
        solid = square_heading(solid)
    v = np.asarray(solid.vertices)
    centre = (v.min(0) + v.max(0)) / 2
    height = float(v[:, 2].max() - v[:, 2].min())
    for face, level, kind, half in FLAT_FACES.get(shape, ()):
        heights = _extreme_heights(solid, centre, half, from_below=face == "base")
        r = FLAT_RESOLUTION
        px = (np.arange(r) + 0.5) / r * 2 - 1  # pixel centres in units of `half`
        yy, xx = np.meshgrid(px, px, indexing="ij")  # the image's rows run along y
        area = (np.maximum(np.abs(xx), np.abs(yy)) if kind == "square" else np.hypot(xx, yy)) <= FLAT_INNER
        h = heights[area]
        seen = h[~np.isnan(h)]
        if len(seen) == 0:
            out.update({f"{face}_pit": height, f"{face}_bulge": 0.0})
            continue
        inward = (seen - level) if face == "base" else (level - seen)  # > 0: caved in
        pit = height if np.isnan(h).any() else float(max(inward.max(), 0.0))
        out.update({f"{face}_pit": pit, f"{face}_bulge": float(max(-inward.min(), 0.0))})
    return out


def cavity_share(mesh: dict) -> float:
    """1 - (cells inside the mesh) / (cells inside once enclosed empty cells are filled)."""
    inside = occupancy_grid((mesh["vertices"], mesh["faces"]), CAVITY_RESOLUTION).numpy()
    filled = ndimage.binary_fill_holes(inside)
    return float(1.0 - inside.sum() / max(int(filled.sum()), 1))


def weld_pairs(mesh: dict) -> int:
    """Pairs of distinct vertex positions closer than WELD_DISTANCE."""
    from scipy.spatial import cKDTree

    positions = np.unique(np.asarray(mesh["vertices"], dtype=np.float64), axis=0)
    return len(cKDTree(positions).query_pairs(WELD_DISTANCE))


def solid_checks(mesh: dict, shape: str) -> dict:
    """Every check above for one exported model of `shape`."""
    solid = welded(mesh)
    euler = int(solid.euler_number)
    return {
        **shell_counts(solid), "self_intersections": self_intersections(solid), **flat_faces(solid, shape),
        "cavity_share": cavity_share(mesh), "euler": euler, "euler_expected": expected_euler(shape),
        "euler_ok": euler == expected_euler(shape), **adjacent_angles(solid), "weld_pairs": weld_pairs(mesh),
    }


# --------------------------------------------------------------------------- the benchmark's table
BARS = {  # check -> the largest value a clean solid may have
    "cavity_share": 0.02, "angle_p95": 20.0, "pit_max": 0.03, "self_intersections": 0, "weld_pairs": 0,
}


def flat_extremes(checks: dict) -> dict:
    """The deepest pit and the largest bulge over the shape's flat faces (None without flat faces)."""
    pits = [v for k, v in checks.items() if k.endswith("_pit")]
    bulges = [v for k, v in checks.items() if k.endswith("_bulge")]
    return {"pit_max": max(pits) if pits else None, "bulge_max": max(bulges) if bulges else None}


def benchmark_checks(mesh: dict, shape: str) -> dict:
    """`solid_checks` plus `flat_extremes` and whether every bar is met (`clean`)."""
    checks = solid_checks(mesh, shape)
    checks.update(flat_extremes(checks))
    checks["clean"] = bool(
        checks["shells"] == 1 and checks["euler_ok"] and all(
            checks.get(k) is None or checks[k] <= bar for k, bar in BARS.items()))
    return checks


def _cell(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_solid_table(rows: list[dict]) -> str:
    """Per finished run (rows with a "solid" dict of `benchmark_checks`): shells, Euler number against the
    shape's, self-intersecting pairs, cavity share, adjacent-face angle p95, the deepest pit and largest
    bulge over its flat faces; then how many runs meet each bar."""
    head = (f"{'prompt':<18}{'seed':>5}{'shells':>7}{'euler':>6}{'want':>5}{'self-x':>7}{'cavity':>8}{'ang p95':>8}"
            f"{'ang max':>8}{'pit':>7}{'bulge':>7}{'weld':>5}{'clean':>6}")
    lines = [head, "-" * len(head)]
    done = [r for r in rows if r.get("status") == "ok" and r.get("solid")]
    for r in done:
        s = r["solid"]
        lines.append(f"{r['prompt']:<18}{r['seed']:>5}{s['shells']:>7}{s['euler']:>6}{s['euler_expected']:>5}"
                     f"{s['self_intersections']:>7}{s['cavity_share']:>8.3f}{_cell(s['angle_p95'], '.1f', 8)}"
                     f"{_cell(s['angle_max'], '.1f', 8)}{_cell(s['pit_max'], '.3f', 7)}{_cell(s['bulge_max'], '.3f', 7)}"
                     f"{_cell(s.get('weld_pairs'), 'd', 5)}{'yes' if s['clean'] else 'NO':>6}")
    summary = solid_summary(rows)
    if summary["runs"]:
        lines += ["-" * len(head), "runs meeting each bar: " + ", ".join(
            f"{name} {count}/{summary['runs']}" for name, count in summary["meeting"].items())]
    return "\n".join(lines)


def solid_summary(rows: list[dict]) -> dict:
    """Over the finished rows with solid checks: how many meet each bar, and the worst value of each check."""
    solids = [r["solid"] for r in rows if r.get("status") == "ok" and r.get("solid")]
    meeting = {
        "one shell": sum(s["shells"] == 1 for s in solids),
        "euler": sum(bool(s["euler_ok"]) for s in solids),
        **{f"{k} <= {bar:g}": sum(s.get(k) is None or s[k] <= bar for s in solids) for k, bar in BARS.items()},
        "all": sum(bool(s["clean"]) for s in solids),
    }
    worst = {}
    for k in ("shells", "self_intersections", "cavity_share", "angle_p95", "angle_max", "pit_max", "bulge_max",
              "weld_pairs"):
        values = [s[k] for s in solids if s.get(k) is not None]
        worst[k] = max(values) if values else None
    return {"runs": len(solids), "meeting": meeting, "worst": worst}

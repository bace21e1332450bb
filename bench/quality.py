"""Quality benchmark: prompts of the primitives prior through the whole pipeline, measured against the true shapes.

For each prompt and seed, `stages.pipeline.run_to_completion` trains and exports a model with
the offline primitives prior. The exported model.obj is read back with trimesh, rotated back
into the +z-up training frame (`stages.export.from_y_up`) and compared with the canonical primitive:

- silhouette IoU over the 8 held-out views of `bench.evaluate` (the project rasterizer);
- volumetric IoU and symmetric Chamfer distance (`geometry.metrics`, world units);
- colour error: the area-weighted mean texture colour over the surface (the texture sampled at
  the face centroids' UVs) against the prompt's colour, as a Euclidean RGB distance (0 .. 1.73);
- retrieval, in the spirit of DreamFusion's CLIP R-Precision: Lambertian renders of the textured
  mesh on the prior's background from the held-out views (the prior's own library style), each classified by
  `PrimitivesPrior.classify` among all 60 prompts of the vocabulary; the score is the share of
  renders classified as their own prompt (chance: 1/60). The same protocol applied to the true
  primitive gives its ceiling ("retrieval_reference"): at low prior resolutions the true cube
  itself passes for a sphere from some views;
- the exported face count, the seconds per stage (run.json's stage_seconds) and the solid checks (`bench.solid_metrics`).

A bad result is a number, not a failure. A run that crashes becomes an error row, and the script
exits with 1 after the table; otherwise it exits with 0.

    python -m bench.quality                                  # 12 prompts (6 shapes x red, blue), seeds 0 1
    python -m bench.quality --quick                          # CI smoke: 2 prompts, tiny settings, seed 0
    python -m bench.quality --prompts "a red cube" --seeds 0 --set coarse.iters=300
    python -m bench.quality --both    # then the text-only prior (view words only), which stands for the real path
    python -m bench.quality --coarse-from bench/out/quality --out bench/out/quality-b   # same coarse fields, paired
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from torch import Tensor

from bench.evaluate import color_error, held_out_cameras, iou, mesh_silhouettes, primitive_silhouettes
from bench.shape_checks import align_azimuth, expected_genus, face_colors, format_shape_table, shape_checks
from bench.solid_metrics import benchmark_checks, format_solid_table, solid_summary
from bench.speed import check_threads, in_worker_thread, machine_info, use_threads
from geometry.mesh_ops import face_areas
from geometry.metrics import chamfer_distance, volumetric_iou
from guidance.primitive_shapes import COLORS, SHAPES, parse_prompt, primitive_mesh, prompt_text
from renderers import mesh as mesh_renderer
from renderers.cameras import Cameras
from renderers.rasterizer import Rasterizer
from renderers.view_words import banded_view_word, view_word
from stages.config import PRESETS, apply_overrides, preset
from stages.export import from_y_up
from stages.runs import RunRecord, slugify

BENCH_COLORS = ("red", "blue")  # the default prompts: every shape in these colours
QUICK_PROMPTS = ("a red cube", "a blue sphere")
QUICK_OVERRIDES = (  # --quick: a CPU smoke run of a couple of minutes, not a quality figure
    "prior.resolution=32", "prior.renders_per_view=24",
    "coarse.iters=60", "coarse.resolution=32", "coarse.preview_every=0", "coarse.volume.num_samples=24",
    "refine.iters=10", "refine.resolution=32", "refine.grid_resolution=24", "refine.preview_every=0",
    "export.texture_size=128", "export.turntable=false",
)
SILHOUETTE_RESOLUTION = 64  # px of the held-out silhouettes
VOLUME_RESOLUTION = 64  # grid samples per axis of the volumetric IoU
CHAMFER_POINTS = 10_000  # surface samples per mesh of the Chamfer distance
METRICS = ("silhouette_iou", "volume_iou", "chamfer", "color_error", "retrieval", "retrieval_reference", "faces")


def default_prompts() -> list[str]:
    return [prompt_text(color, shape) for shape in SHAPES for color in BENCH_COLORS]


# --------------------------------------------------------------------------- reading the export
def load_export(obj_path: str | Path) -> dict:
    """The exported mesh in the training frame: vertices [V, 3], faces [F, 3], uv [V, 2], the texture
    [T, T, 3] float (row 0 = v 0) and per-corner normals [F, 3, 3] for shading (see `corner_normals`)."""
    mesh = trimesh.load(obj_path, force="mesh", process=False)
    vertices = from_y_up(np.asarray(mesh.vertices, dtype=np.float64))
    faces = np.asarray(mesh.faces, dtype=np.int64)
    image = np.asarray(mesh.visual.material.image.convert("RGB"), dtype=np.float32) / 255.0
    return {
        "vertices": vertices, "faces": faces, "uv": np.asarray(mesh.visual.uv, dtype=np.float64),
        "texture": np.ascontiguousarray(image[::-1]),  # the PNG's bottom row is v = 0
        "corner_normals": corner_normals(vertices, faces),
    }


def corner_normals(
    vertices: np.ndarray,  # [V, 3]
    faces: np.ndarray,  # [F, 3]
    max_angle: float = 20.0,  # degrees: faces meeting at a larger angle are not smoothed together
) -> np.ndarray:  # [F, 3, 3] unit normal of each face corner
    """Smooth normals that keep sharp edges, like the prior's library (trimesh's smooth_shaded): each
    corner averages the area-weighted normals of the faces around its vertex that lie within
    `max_angle` of its own face. Vertices are welded by position first (xatlas splits them at seams)."""
    _, weld = np.unique(vertices.round(6), axis=0, return_inverse=True)
    corner_vertex = weld.reshape(-1)[faces].reshape(-1)  # [3F]
    corner_face = np.repeat(np.arange(len(faces)), 3)
    v = vertices[faces]
    area_normal = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # [F, 3], length = twice the area
    unit = area_normal / np.maximum(np.linalg.norm(area_normal, axis=1, keepdims=True), 1e-20)
    # Every ordered pair of corners that share a welded vertex.
    order = np.argsort(corner_vertex, kind="stable")
    counts = np.bincount(corner_vertex)
    starts = np.cumsum(counts) - counts
    degree = counts[corner_vertex[order]]
    src = np.repeat(order, degree)
    local = np.arange(degree.sum()) - np.repeat(np.cumsum(degree) - degree, degree)
    dst = order[np.repeat(starts[corner_vertex[order]], degree) + local]
    keep = (unit[corner_face[src]] * unit[corner_face[dst]]).sum(1) >= np.cos(np.radians(max_angle))
    normals = np.zeros((len(corner_vertex), 3))
    np.add.at(normals, src[keep], area_normal[corner_face[dst[keep]]])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-20)
    return normals.reshape(-1, 3, 3)


def mean_texture_color(mesh: dict) -> np.ndarray:
    """Area-weighted mean of the texture sampled at each face's centroid UV: [3] in [0, 1]."""
    area = face_areas(mesh["vertices"], mesh["faces"])
    return (face_colors(mesh) * area[:, None]).sum(0) / max(area.sum(), 1e-20)


def render_textured(
    mesh: dict,  # from load_export
    cameras: Cameras,  # light at the camera (cameras_from_angles)
    ambient: float,  # ambient share of the Lambertian shading
    supersample: int = 1,  # cameras' resolution / output resolution
    background: float = 1.0,  # grey level behind the mesh (the prior's `background`)
) -> Tensor:  # [B, H / supersample, W / supersample, 3] in [0, 1]
    """Lambertian renders of the textured mesh over a grey level, as the primitives prior's library is made."""
    device, f = cameras.mvp.device, mesh["faces"]
    # One vertex per face corner, so that each corner carries its own normal.
    corners = np.concatenate([mesh["vertices"][f], mesh["corner_normals"], mesh["uv"][f]], -1).reshape(-1, 8)
    attrs = torch.tensor(corners, dtype=torch.float32, device=device)  # [3F, 8]
    faces, texture = torch.arange(3 * len(f), device=device).view(-1, 3), torch.tensor(mesh["texture"], device=device)
    image = mesh_renderer.render_textured(attrs[:, :3], faces, attrs[:, 6:], attrs[:, 3:6], texture, cameras, ambient,
                                          background=background, antialiased=False, rasterizer=Rasterizer.make("torch"))
    if supersample > 1:
        image = F.avg_pool2d(image.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    return image.clamp(0.0, 1.0)


def primitive_as_export(shape: str, color: str) -> dict:
    """The canonical primitive in `load_export`'s form, with a uniform texture of the named colour."""
    truth = primitive_mesh(shape)
    vertices, faces = np.asarray(truth.vertices, dtype=np.float64), np.asarray(truth.faces, dtype=np.int64)
    return {
        "vertices": vertices, "faces": faces, "uv": np.full((len(vertices), 2), 0.5),
        "texture": np.tile(np.asarray(COLORS[color], dtype=np.float32), (2, 2, 1)),
        "corner_normals": corner_normals(vertices, faces),
    }


# --------------------------------------------------------------------------- measuring one run
def retrieval(mesh: dict, prior) -> list[str]:
    """What `prior.classify` sees in Lambertian renders of `mesh` from the 8 held-out views, at the
    prior's resolution and supersampled like its library."""
    size, ss = prior.resolution, prior.library_config.supersample
    cams = held_out_cameras(size * ss)
    renders = render_textured(mesh, cams, prior.library_config.ambient, ss, prior.background)
    words = [banded_view_word(view_word(float(e), float(a)), float(e), prior.view_bands)
             for e, a in zip(cams.elevation, cams.azimuth)]
    return prior.classify(renders, words)


def measure(obj_path: str | Path, prompt: str, prior) -> dict:
    """Every metric of one exported model against its prompt's primitive; `prior` is a PrimitivesPrior."""
    color, shape, _ = parse_prompt(prompt)
    truth = primitive_mesh(shape)
    mesh, heading = align_azimuth(load_export(obj_path), shape,
                                  lambda m: volumetric_iou((m["vertices"], m["faces"]), truth, VOLUME_RESOLUTION))
    solid = (mesh["vertices"], mesh["faces"])

    # 1. Silhouettes over the held-out views.
    cams = held_out_cameras(SILHOUETTE_RESOLUTION)
    masks = mesh_silhouettes(torch.tensor(mesh["vertices"], dtype=torch.float32), torch.tensor(mesh["faces"]), cams)
    true_masks = primitive_silhouettes(shape, cams)
    per_view = [iou(masks[i], true_masks[i]) for i in range(len(cams))]

    mean_color = mean_texture_color(mesh)  # 2. Colour of the baked texture.

    # 3. Retrieval among every prompt of the vocabulary, and the same for the true primitive (the
    #    protocol's ceiling: at low prior resolutions even the true cube passes for a sphere from some views).
    canonical = prompt_text(color, shape)
    retrieved = retrieval(mesh, prior)
    reference = retrieval(primitive_as_export(shape, color), prior)

    return {
        "silhouette_iou": float(np.mean(per_view)),
        "silhouette_iou_min": float(np.min(per_view)),
        "volume_iou": volumetric_iou(solid, truth, VOLUME_RESOLUTION),
        "heading": heading,  # degrees the mesh was turned about z to match the primitive (bench.shape_checks)
        "chamfer": chamfer_distance(solid, truth, CHAMFER_POINTS),
        "mean_color": [round(float(c), 4) for c in mean_color],
        "color_error": color_error(torch.tensor(mean_color), color),
        "retrieval": sum(r == canonical for r in retrieved) / len(retrieved),
        "retrieved": retrieved,
        "retrieval_reference": sum(r == canonical for r in reference) / len(reference),
        "faces": int(len(mesh["faces"])), "solid": benchmark_checks(mesh, shape),  # one clean solid (bench.solid_metrics)
        # 4. Topology, flat base, baked light and texture fill (bench.shape_checks).
        "shape": shape, "genus_expected": expected_genus(shape), **shape_checks(mesh, shape),
    }


def run_one(prompt: str, seed: int, base_config, out_dir: Path, coarse_from: Path | None = None) -> dict:
    """Run the pipeline for one prompt and seed, then measure it; a crash becomes an error row.
    With `coarse_from`, the run starts from that folder's run of the same name (`bench.coarse_reuse`)."""
    from bench.refine_gain import measure_run
    from stages.pipeline import run_to_completion
    from stages.plan import resolve
    from stages.runs import CHECKPOINTS
    from stages.workers import guidance_for

    row = {"prompt": prompt, "seed": seed, "status": "ok"}
    run_dir = out_dir / f"{slugify(prompt)}-seed{seed}"
    row["run_dir"] = str(run_dir)
    try:
        config = copy.deepcopy(base_config)
        config.seed = config.coarse.seed = config.refine.seed = seed  # the stages read their own seeds too
        start = time.perf_counter()
        if coarse_from is not None:
            from bench.coarse_reuse import start_from_coarse

            start_from_coarse(coarse_from / run_dir.name, run_dir, resolve(prompt, config))
        done = run_to_completion(prompt, config, run_dir=run_dir, resume=coarse_from is not None)
        record = RunRecord.load(run_dir)
        row["stage_seconds"] = {k: round(v, 2) for k, v in record.stage_seconds.items()}
        row["total_seconds"] = round(time.perf_counter() - start, 2)
        t0 = time.perf_counter()
        prior = guidance_for(resolve(prompt, config))  # the run's own, cached
        row.update(in_worker_thread(measure, done.paths["obj"], prompt, prior))  # see in_worker_thread
        if (run_dir / CHECKPOINTS["refine"]).exists():  # the refine stage's gain (not with stop_after=coarse)
            gain = measure_run(run_dir)
            row.update(iou_start=gain["iou_before"], iou_refined=gain["iou_after"],
                       refine_gain=gain["iou_after"] - gain["iou_before"])
        row["measure_seconds"] = round(time.perf_counter() - t0, 2)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as an error row
        row.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    return row


# --------------------------------------------------------------------------- summary and output
def summarize(rows: list[dict]) -> dict:
    """Means of every metric over the finished rows, per prompt (over seeds) and overall. Every row
    has 8 retrieval renders, so the mean retrieval is also the share over all renders."""
    ok = [r for r in rows if r["status"] == "ok"]

    def means(group: list[dict]) -> dict:
        if not group:
            return {}
        out = {m: float(np.mean([r[m] for r in group])) for m in METRICS}
        out["stage_seconds"] = {s: float(np.mean([r["stage_seconds"][s] for r in group])) for s in group[0]["stage_seconds"]}
        return out

    per_prompt = {p: means([r for r in ok if r["prompt"] == p]) for p in dict.fromkeys(r["prompt"] for r in rows)}
    return {"runs": len(rows), "finished": len(ok), "errors": len(rows) - len(ok), "per_prompt": per_prompt,
            "overall": means(ok), "solid": solid_summary(rows)}


def _cells(m: dict) -> str:
    s = m["stage_seconds"]
    return (f"{m['silhouette_iou']:>9.3f}{m['volume_iou']:>9.3f}{m['chamfer']:>9.4f}{m['color_error']:>8.3f}"
            f"{m['retrieval']:>6.2f}{m['retrieval_reference']:>6.2f}{m['faces']:>8.0f}"
            + "".join(f"{s.get(stage, float('nan')):>10.1f}" for stage in ("coarse", "refine", "export")))


def format_table(rows: list[dict], summary: dict) -> str:
    head = (f"{'prompt':<18}{'seed':>5}{'sil IoU':>9}{'vol IoU':>9}{'chamfer':>9}{'colour':>8}{'R@1':>6}{'ref':>6}"
            f"{'faces':>8}{'coarse s':>10}{'refine s':>10}{'export s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"{r['prompt']:<18}{r['seed']:>5}" + _cells(r))
        else:
            lines.append(f"{r['prompt']:<18}{r['seed']:>5}  ERROR {r['error'][:90]}")
    if summary["overall"]:
        lines += ["-" * len(head), f"{'mean':<18}{'':>5}" + _cells(summary["overall"])]
    n = len(SHAPES) * len(COLORS)
    lines.append(f"{summary['finished']}/{summary['runs']} runs finished. R@1: share of the 8 held-out renders classified "
                 f"as their own prompt among all {n} (chance {1 / n:.3f}); ref: the same for the true primitive.")
    return "\n".join(lines + (["", format_solid_table(rows)] if any(r.get("solid") for r in rows) else []))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", nargs="+", help="prompts of the primitives vocabulary (default: 6 shapes x red, blue)")
    parser.add_argument("--preset", default="quick", choices=PRESETS)
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 (--quick: 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. coarse.iters=300 (repeatable; after --quick's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 prompts, tiny settings, one seed")
    parser.add_argument("--out", type=Path, default=Path("bench/out/quality"), help="folder of the runs")
    parser.add_argument("--json", type=Path, help="report path (default: --out with .json, bench/out/quality.json)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--coarse-from", type=Path, metavar="RUNS",
                        help="start each run from the coarse stage of the run of the same name in this folder "
                             "(an earlier --out, whose text-only runs are in RUNS-text-only as --out's; the coarse settings "
                             "must match): refine and export changes measured on the same coarse fields")
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--text-only", action="store_true",
                         help="the prior without its elevation kernel (prior.elevation_sigma=0), into --out + '-text-only'")
    variant.add_argument("--both", action="store_true", help="the default runs, then the text-only ones; both tables")
    args = parser.parse_args(argv)
    check_threads(parser, args.threads)
    return args


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str], Path, Path]]:
    """(name, heading, overrides, runs folder, report path) per variant; text-only's sigma=0 follows every --set."""
    overrides = (list(QUICK_OVERRIDES) if args.quick else []) + args.overrides
    json_path = args.json or args.out.with_suffix(".json")
    default = ("default", "the prior with its camera-elevation kernel", overrides, args.out, json_path)
    text_only = ("text-only", "the prior sees the view words only, as a text-to-image model sees only the text: "
                 "this table stands for the real (text-to-image) path", [*overrides, "prior.elevation_sigma=0"],
                 args.out.with_name(args.out.name + "-text-only"), json_path.with_stem(json_path.stem + "-text-only"))
    return [default, text_only] if args.both else [text_only] if args.text_only else [default]


def coarse_source(coarse_from: Path | None, variant: str) -> Path | None:
    """Where a variant's runs take their coarse stage from (the text-only runs' folder is named as `variants`)."""
    if coarse_from is None or variant == "default":
        return coarse_from
    return coarse_from.with_name(coarse_from.name + "-text-only")


def main(argv=None) -> int:
    args = parse_args(argv)
    use_threads(args.threads)
    prompts = args.prompts or (list(QUICK_PROMPTS) if args.quick else default_prompts())
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    for prompt in prompts:
        parse_prompt(prompt)  # an unknown prompt is a usage error, raised before any run
    tables, errors = [], 0
    for name, heading, overrides, out_dir, json_path in variants(args):
        config = preset(args.preset)
        config.guidance = "primitives"
        apply_overrides(config, overrides)
        rows = []
        for prompt in prompts:
            for seed in seeds:
                print(f"[quality] {name}: {prompt!r} seed {seed} ...", flush=True)
                rows.append(run_one(prompt, seed, config, out_dir, coarse_source(args.coarse_from, name)))
                if rows[-1]["status"] != "ok":
                    print(f"[quality]   error: {rows[-1]['error']}", file=sys.stderr, flush=True)
        summary = summarize(rows)
        report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "preset": args.preset,
                  "quick": args.quick, "variant": name, "overrides": overrides,
                  "coarse_from": None if args.coarse_from is None else str(args.coarse_from), "seeds": seeds, "prompts": prompts,
                  "summary": summary, "rows": rows}
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str))
        tables.append(f"== {name}: {heading} ==\n{format_table(rows, summary)}\n\n{format_shape_table(rows)}"
                      f"\nwrote {json_path}")
        errors += summary["errors"]
    print("\n\n".join(tables))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

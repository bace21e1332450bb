"""What real clients make of a run's exports: Blender (headless) and Assimp read model.obj and model.glb.

    python -m bench.client_checks RUN_DIR [RUN_DIR ...] [--json OUT.json]

Per file, Blender (`blender -b --factory-startup --python-expr ...`, Debian's package) imports it into an empty
scene and reports the mesh objects, their vertices and faces, and through bmesh: non-manifold edges, boundary
edges and whether every piece is closed, before and after merging vertices by distance (glTF splits vertices
at UV seams, so only the merged mesh can be closed); the number of loose parts after the merge; and the same
after a merge at Blender's own default distance (1e-4), which a user's first clean-up applies. `assimp info`
reports its meshes, vertices and faces. A client that is not installed gives None for its figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

FILES = ("model.obj", "model.glb")
MERGE_DISTANCE = 1e-6  # world units, as the exporter's own weld
BLENDER_MERGE = 1e-4  # Blender's default "Merge by Distance": what a user's first clean-up does
TIMEOUT = 300  # seconds per client call

# Runs inside Blender: import sys.argv[-1] into an empty scene, print one JSON line of figures.
BLENDER_SCRIPT = f"""
import bmesh, bpy, json, sys
path = sys.argv[-1]
bpy.ops.wm.read_factory_settings(use_empty=True)
if path.endswith(".obj"):
    bpy.ops.wm.obj_import(filepath=path)
else:
    import numpy
    if not hasattr(numpy, "bool"):  # Debian's Blender 3.4 glTF importer still says numpy.bool (gone in numpy 1.24)
        numpy.bool = bool
    bpy.ops.import_scene.gltf(filepath=path)
meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
def figures(bm):
    bad = sum(not e.is_manifold for e in bm.edges)
    boundary = sum(e.is_boundary for e in bm.edges)
    return {{"vertices": len(bm.verts), "faces": len(bm.faces), "non_manifold_edges": bad, "boundary_edges": boundary}}
out = {{"objects": len(bpy.context.scene.objects), "mesh_objects": len(meshes), "raw": [], "merged": []}}
for o in meshes:
    bm = bmesh.new()
    bm.from_mesh(o.data)
    out["raw"].append(figures(bm))
    bmesh.ops.remove_doubles(bm, verts=bm.verts, dist={MERGE_DISTANCE})
    bm.verts.index_update()
    merged = figures(bm)
    seen, parts = set(), 0
    for v in bm.verts:
        if v.index in seen:
            continue
        parts += 1
        stack = [v]
        seen.add(v.index)
        while stack:
            u = stack.pop()
            for e in u.link_edges:
                w = e.other_vert(u)
                if w.index not in seen:
                    seen.add(w.index)
                    stack.append(w)
    merged["parts"] = parts
    merged["manifold"] = merged["non_manifold_edges"] == 0
    bmesh.ops.remove_doubles(bm, verts=bm.verts, dist={BLENDER_MERGE})
    merged["at_blender_default"] = figures(bm)
    out["merged"].append(merged)
    bm.free()
print("CLIENT_CHECKS " + json.dumps(out))
"""


def _system_env() -> dict:
    """This environment without a pyenv interpreter's paths: Blender's own Python then finds the system's
    packages (its glTF importer needs numpy) rather than this interpreter's prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYENV", "_PYENV", "PYTHONHOME", "PYTHONPATH"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".pyenv" not in p)
    return env


def blender_figures(path: Path) -> dict | None:
    """Blender's import of one file (see the module docstring); None without Blender."""
    if shutil.which("blender") is None:
        return None
    done = subprocess.run(["blender", "-b", "--factory-startup", "--python-expr", BLENDER_SCRIPT, "--", str(path)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=_system_env())
    line = next((x for x in done.stdout.splitlines() if x.startswith("CLIENT_CHECKS ")), None)
    if line is None:
        return {"error": (done.stderr or done.stdout)[-500:]}
    return json.loads(line.split(" ", 1)[1])


def assimp_figures(path: Path) -> dict | None:
    """`assimp info`'s meshes, vertices and faces of one file; None without Assimp."""
    if shutil.which("assimp") is None:
        return None
    done = subprocess.run(["assimp", "info", str(path)], capture_output=True, text=True, timeout=TIMEOUT)
    out = {"ok": done.returncode == 0}
    for key, label in (("meshes", "Meshes"), ("vertices", "Vertices"), ("faces", "Faces")):
        match = re.search(rf"^{label}:\s+(\d+)", done.stdout, flags=re.MULTILINE)
        out[key] = int(match.group(1)) if match else None
    return out


def check_run(run_dir: Path) -> list[dict]:
    return [{"run": str(run_dir), "file": name, "blender": blender_figures(run_dir / name),
             "assimp": assimp_figures(run_dir / name)} for name in FILES if (run_dir / name).exists()]


def format_rows(rows: list[dict]) -> str:
    head = (f"{'run':<22}{'file':<11}{'objects':>8}{'verts':>8}{'faces':>8}{'merged v':>9}{'parts':>6}"
            f"{'non-man':>8}{'boundary':>9}{'1e-4 v/f/nm':>18}{'assimp m/v/f':>20}")
    lines = [head, "-" * len(head)]
    for r in rows:
        b, a = r["blender"] or {}, r["assimp"] or {}
        raw, merged = (b.get("raw") or [{}])[0], (b.get("merged") or [{}])[0]
        cells = [b.get("mesh_objects"), raw.get("vertices"), raw.get("faces"), merged.get("vertices"),
                 merged.get("parts"), merged.get("non_manifold_edges"), merged.get("boundary_edges")]
        widths = (8, 8, 8, 9, 6, 8, 9)
        text = "".join(f"{'-' if c is None else c:>{w}}" for c, w in zip(cells, widths))
        loose = merged.get("at_blender_default") or {}
        coarse = f"{loose.get('vertices')}/{loose.get('faces')}/{loose.get('non_manifold_edges')}" if loose else "-"
        assimp = f"{a.get('meshes')}/{a.get('vertices')}/{a.get('faces')}" if a else "-"
        lines.append(f"{Path(r['run']).name[:21]:<22}{r['file']:<11}{text}{coarse:>18}{assimp:>20}")
        if "error" in b:
            lines.append(f"  blender error: {b['error'][-200:]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (model.obj, model.glb)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in check_run(run)]
    if not rows:
        print("error: no model.obj or model.glb in the given folders", file=sys.stderr)
        return 2
    print(format_rows(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

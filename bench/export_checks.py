"""Do the exported files work in other tools? Texture fill, parts and genus on import, GLB validity.

Exports marching-tetrahedra meshes of a sphere, a cube and a torus (analytic SDFs on the
refine stage's `quick` grid, 48 cells, as a refined mesh would come) with the `quick`
export settings, then checks each run folder as a user's tools would see it:
- fill: fraction of the texture's texel centres covered by a triangle;
- OBJ: parts and open edges when imported by trimesh (process=False, vertices merged by
  position only), its Euler number, and `assimp info` (meshes, vertices) when installed;
- GLB: the Khronos glTF validator's errors and warnings when its npm package is installed
  (`--validator DIR`, the folder holding node_modules/gltf-validator), else a structural check;
- zip entry modes, and whether turntable.mp4 is fast-start (moov before mdat).
Prints a table and writes bench/out/export_checks.json.

    python -m bench.export_checks                                  (from the repo root)
    python -m bench.export_checks --validator /tmp/gltf --shapes torus
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import trimesh

from geometry.tets import make_tet_grid, marching_tets
from stages.config import preset
from stages.export import export

SHAPES = ("sphere", "cube", "torus")
EULER = {"sphere": 2, "cube": 2, "torus": 0}  # V - E + F of a closed surface of genus 0 / 1


def shape_sdf(name: str, points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N], < 0 inside
    x, y, z = points.unbind(-1)
    if name == "sphere":
        return points.norm(dim=-1) - 0.5
    if name == "cube":
        return (points.abs() - 0.4).amax(-1)
    if name == "torus":
        return torch.sqrt((torch.sqrt(x**2 + y**2) - 0.42) ** 2 + z**2) - 0.16
    raise ValueError(f"shape must be one of {SHAPES}, got {name!r}")


def shape_mesh(name: str, grid: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    verts, tets = make_tet_grid(grid, (-0.7,) * 3, (0.7,) * 3)
    return marching_tets(verts, tets, shape_sdf(name, verts))


def colour_field(points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N, 3] in [0.1, 0.9]
    return 0.5 + 0.4 * torch.sin(4.0 * points + torch.tensor([0.0, 2.0, 4.0], dtype=points.dtype))


def obj_import(path: str) -> dict:
    """How a tool that merges by position (not by UV) sees the OBJ: parts, open edges, Euler number."""
    mesh = trimesh.load(path, force="mesh", process=False)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    parts = mesh.split(only_watertight=False)
    return {"obj_parts": len(parts), "obj_watertight": bool(mesh.is_watertight), "obj_euler": int(mesh.euler_number),
            "obj_open_edges": int((np.bincount(mesh.edges_unique_inverse) == 1).sum())}


def glb_json(path: str) -> dict:
    data = Path(path).read_bytes()
    length, kind = struct.unpack_from("<II", data, 12)
    assert kind == 0x4E4F534A, "the first GLB chunk is not JSON"
    return json.loads(data[20 : 20 + length])


def glb_structure(path: str) -> dict:
    gltf = glb_json(path)
    prim = gltf["meshes"][0]["primitives"][0]
    views = gltf["bufferViews"]
    targets = {name: views[gltf["accessors"][index]["bufferView"]].get("target") for name, index in prim["attributes"].items()}
    targets["indices"] = views[gltf["accessors"][prim["indices"]]["bufferView"]].get("target")
    material = gltf["materials"][prim["material"]]
    return {"glb_targets": targets, "glb_material": material.get("name"), "glb_image": gltf["images"][0].get("name"),
            "glb_double_sided": material.get("doubleSided", False)}


def gltf_validate(path: str, validator_dir: str) -> dict:
    script = (
        "const v = require('gltf-validator'); const fs = require('fs');"
        "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[1])))"
        ".then(r => console.log(JSON.stringify(r.issues))).catch(e => { console.error(e); process.exit(1); });"
    )
    out = subprocess.run(["node", "-e", script, path], cwd=validator_dir, capture_output=True, text=True, check=True)
    issues = json.loads(out.stdout)
    codes = sorted({m["code"] for m in issues["messages"]})
    return {"gltf_errors": issues["numErrors"], "gltf_warnings": issues["numWarnings"], "gltf_infos": issues["numInfos"], "gltf_codes": codes}


def assimp_info(path: str) -> dict:
    if shutil.which("assimp") is None:
        return {}
    out = subprocess.run(["assimp", "info", path], capture_output=True, text=True).stdout
    found = re.findall(r"^(Meshes|Vertices|Faces):\s+(\d+)", out, flags=re.MULTILINE)
    return {f"assimp_{key.lower()}": int(value) for key, value in found}


def zip_modes(path: str) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted({oct(info.external_attr >> 16 & 0o777) for info in archive.infolist()})


def mp4_atoms(path: str) -> list[str]:
    """Top-level MP4 box types in file order."""
    data, atoms, pos = Path(path).read_bytes(), [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size == 1:
            size = struct.unpack_from(">Q", data, pos + 8)[0]
        atoms.append(kind.decode("latin-1"))
        if size < 8:
            break
        pos += size
    return atoms


def check_shape(name: str, out_dir: str, validator: str | None) -> dict:
    config = preset("quick").export
    config.turntable_frames, config.turntable_resolution = 8, 64  # the video's layout, not its look, is checked
    verts, faces = shape_mesh(name)
    result = export(verts, faces, colour_field, out_dir, config)
    atoms = mp4_atoms(result.paths["turntable"])
    row = {"shape": name, "faces": result.num_faces, "vertices_welded": result.num_vertices,
           "vertices_uv": result.num_uv_vertices, "fill": round(result.texture_fill, 3), "watertight": result.watertight,
           "euler_expected": EULER[name], **obj_import(result.paths["obj"]), **assimp_info(result.paths["obj"]),
           **glb_structure(result.paths["glb"]), "zip_modes": zip_modes(result.paths["zip"]),
           "mp4_faststart": atoms.index("moov") < atoms.index("mdat"), "unwrap_s": round(result.timings["unwrap"], 2)}
    if validator:
        row.update(gltf_validate(result.paths["glb"], validator))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--validator", help="folder with node_modules/gltf-validator (npm install gltf-validator)")
    parser.add_argument("--keep", help="write the run folders here instead of a temporary folder")
    parser.add_argument("--out", default="bench/out/export_checks.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        for name in args.shapes:
            rows.append(check_shape(name, str(root / name), args.validator))
    columns = ("shape", "faces", "vertices_welded", "vertices_uv", "fill", "obj_parts", "obj_open_edges", "obj_euler",
               "euler_expected", "assimp_meshes", "assimp_vertices", "glb_double_sided", "gltf_errors", "gltf_warnings",
               "zip_modes", "mp4_faststart", "unwrap_s")
    print("  ".join(columns))
    for row in rows:
        print("  ".join(str(row.get(c, "-")) for c in columns))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The exported files' encoders: OBJ + MTL, GLB, zip and MP4, all as bytes or one file each.

What tools expect of them, and how each writer meets it:
- OBJ: positions welded (one `v` per surface point) with separate `vt` indices, so the mesh
  imports as one closed part (Blender, Assimp, trimesh after merging by position) while the
  texture keeps its seams; normals are per welded vertex, shared across UV seams.
- GLB: glTF gives a vertex one texture coordinate, so vertices are split along UV seams
  (normals stay the welded ones). Buffer views name their targets, the material and image are
  named like the OBJ's, and a closed mesh is single-sided. Checked with the Khronos glTF
  validator (bench/export_checks.py --validator).
- zip: entries are regular files with mode 0644 (Python's default, 0600, hides them from
  other users after unzip).
- MP4: `-movflags +faststart` puts the moov atom before mdat, so a browser plays it while
  it downloads.
"""
from __future__ import annotations

import io
import json
import struct
import time
import zipfile

import numpy as np

MATERIAL_NAME = "material_0"  # the OBJ's `usemtl` and the GLB's material name
OBJ_NAME, MTL_NAME, TEXTURE_NAME = "model.obj", "model.mtl", "texture_kd.png"
TEXTURE_STEM = TEXTURE_NAME.rsplit(".", 1)[0]  # the GLB image's name
ZIP_MODE = 0o644  # permission bits of each zip entry

# glTF enums
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_FLOAT, _UNSIGNED_INT = 5126, 5125
_LINEAR, _LINEAR_MIPMAP_LINEAR, _TRIANGLES = 9729, 9987, 4


def obj_text(
    positions: np.ndarray,  # [V, 3] welded, Y-up
    normals: np.ndarray,  # [V, 3] unit, per welded vertex
    uv: np.ndarray,  # [V', 2] per unwrapped vertex, OBJ convention (v = 0 is the image's bottom row)
    vmapping: np.ndarray,  # [V'] welded vertex of each unwrapped vertex
    faces: np.ndarray,  # [F, 3] into the unwrapped vertices
) -> bytes:
    """`f v/vt/vn` with v and vn indexing the welded vertices and vt the unwrapped ones."""
    corners = np.stack([vmapping[faces], faces, vmapping[faces]], axis=-1) + 1  # [F, 3, 3] 1-based
    buf = io.StringIO()
    buf.write(f"# DreamLift export, Y-up\nmtllib {MTL_NAME}\no model\nusemtl {MATERIAL_NAME}\n")
    np.savetxt(buf, positions, fmt="v %.6f %.6f %.6f")
    np.savetxt(buf, uv, fmt="vt %.6f %.6f")
    np.savetxt(buf, normals, fmt="vn %.5f %.5f %.5f")
    np.savetxt(buf, corners.reshape(-1, 9), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    return buf.getvalue().encode()


def mtl_text() -> bytes:
    return (
        f"newmtl {MATERIAL_NAME}\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nd 1.0\nillum 1\n"
        f"map_Kd {TEXTURE_NAME}\n"
    ).encode()


def _padded(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def glb_bytes(
    positions: np.ndarray,  # [N, 3] Y-up, split along UV seams
    normals: np.ndarray,  # [N, 3] unit
    uv: np.ndarray,  # [N, 2] OBJ convention (v = 0 at the bottom); flipped here for glTF
    faces: np.ndarray,  # [F, 3] into N
    png: bytes,  # the texture, encoded
    double_sided: bool,  # False for a closed mesh: back faces are never seen
) -> bytes:
    """A binary glTF 2.0 file: one node, one mesh, one textured PBR material (metallic 0,
    roughness 1), the PNG embedded in the binary chunk."""
    texcoord = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)  # glTF puts v = 0 on the image's top row
    arrays = [  # (bytes, target, accessor or None)
        (np.ascontiguousarray(positions, "<f4").tobytes(), _ARRAY_BUFFER, dict(
            componentType=_FLOAT, count=len(positions), type="VEC3",
            min=positions.min(0).astype(np.float32).tolist(), max=positions.max(0).astype(np.float32).tolist())),
        (np.ascontiguousarray(normals, "<f4").tobytes(), _ARRAY_BUFFER, dict(componentType=_FLOAT, count=len(normals), type="VEC3")),
        (np.ascontiguousarray(texcoord, "<f4").tobytes(), _ARRAY_BUFFER, dict(componentType=_FLOAT, count=len(texcoord), type="VEC2")),
        (np.ascontiguousarray(faces, "<u4").tobytes(), _ELEMENT_ARRAY_BUFFER, dict(componentType=_UNSIGNED_INT, count=faces.size, type="SCALAR")),
        (png, None, None),
    ]
    blob, views, accessors = b"", [], []
    for data, target, accessor in arrays:
        view = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        if accessor is not None:
            accessors.append({"bufferView": len(views), **accessor})
        views.append(view)
        blob += _padded(data, b"\0")
    gltf = {
        "asset": {"version": "2.0", "generator": "DreamLift"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [{"name": "model", "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3, "material": 0, "mode": _TRIANGLES,
        }]}],
        "materials": [{
            "name": MATERIAL_NAME,
            "pbrMetallicRoughness": {"baseColorTexture": {"index": 0}, "metallicFactor": 0.0, "roughnessFactor": 1.0},
            "doubleSided": bool(double_sided),
        }],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR}],
        "images": [{"name": TEXTURE_STEM, "bufferView": 4, "mimeType": "image/png"}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(blob)}],
    }
    text = _padded(json.dumps(gltf, separators=(",", ":")).encode(), b" ")
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(blob), 0x004E4942) + blob
    return struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deflated zip of regular files with mode ZIP_MODE, stamped with the current time."""
    buf = io.BytesIO()
    stamp = time.localtime()[:6]
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.create_system = 3  # Unix, so unzip applies external_attr's mode
            info.external_attr = (0o100000 | ZIP_MODE) << 16  # S_IFREG | rw-r--r--
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buf.getvalue()


def write_video(path: str, frames: np.ndarray, fps: int) -> None:  # frames [N, H, W, 3] uint8
    """H.264 MP4, yuv420p, fast-start (moov before mdat)."""
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
        macro_block_size=16, ffmpeg_log_level="error", output_params=["-movflags", "+faststart"],
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()

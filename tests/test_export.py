"""stages.export: files that load, colours where they belong, Y-up, cleaning, turntable, seams, atomicity."""
import json
import os
import struct
import zipfile

import numpy as np
import pytest
import torch
import trimesh

from geometry.mesh_ops import clean_mesh, decimate
from stages import export as export_module
from stages.common import Cancelled
from stages.export import ExportConfig, dilate_texture, export, from_y_up, to_y_up

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def _config(**overrides) -> ExportConfig:
    base = dict(texture_size=128, turntable=False)
    base.update(overrides)
    return ExportConfig(**base)


def _tensors(mesh: trimesh.Trimesh) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


def red_blue(points: torch.Tensor) -> torch.Tensor:  # red where x > 0, blue where x < 0 (training frame)
    right = (points[:, 0] > 0).to(points.dtype)[:, None]
    return right * torch.tensor(RED) + (1 - right) * torch.tensor(BLUE)


def smooth(points: torch.Tensor) -> torch.Tensor:  # a smooth, non-symmetric colour field in [0.1, 0.9]
    return 0.5 + 0.4 * torch.sin(2.5 * points + torch.tensor([0.3, 1.1, 2.0]))


def _load_obj(path: str) -> trimesh.Trimesh:
    return trimesh.load(path, force="mesh", process=False)


def _load_glb(path: str) -> trimesh.Trimesh:
    scene = trimesh.load(path, process=False)
    return list(scene.geometry.values())[0] if isinstance(scene, trimesh.Scene) else scene


def _sample(image, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup with the OBJ convention (v = 0 is the bottom row): [N, 2] -> [N, 3] in [0, 1]."""
    tex = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    h, w = tex.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def test_files_load_with_textures(tmp_path):
    v, f = _tensors(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    events = []
    result = export(v, f, red_blue, tmp_path, _config(), progress=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("export", i, 5) for i in range(1, 6)]
    assert sorted(os.listdir(tmp_path)) == ["model.glb", "model.mtl", "model.obj", "model.zip", "texture_kd.png"]
    assert result.paths["turntable"] is None
    assert set(result.timings) == {"clean", "unwrap", "bake", "write", "turntable"}
    assert "map_Kd texture_kd.png" in open(result.paths["mtl"]).read()

    obj = _load_obj(result.paths["obj"])
    assert obj.visual.kind == "texture"
    assert obj.visual.material.image is not None and obj.visual.material.image.size == (128, 128)
    assert obj.visual.uv.shape == (len(obj.vertices), 2)
    assert len(obj.faces) == result.num_faces == 320

    glb = _load_glb(result.paths["glb"])
    assert glb.visual.kind == "texture"
    assert glb.visual.material.baseColorTexture is not None
    with open(result.paths["glb"], "rb") as handle:  # the raw glTF JSON chunk names the texture
        handle.seek(12)
        length, _ = struct.unpack("<II", handle.read(8))
        gltf = json.loads(handle.read(length))
    assert "baseColorTexture" in gltf["materials"][0]["pbrMetallicRoughness"]

    with zipfile.ZipFile(result.paths["zip"]) as archive:
        assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "texture_kd.png"]
        assert archive.read("model.obj") == open(result.paths["obj"], "rb").read()


@pytest.mark.parametrize("loader", [_load_obj, _load_glb], ids=["obj", "glb"])
def test_texture_colour_at_face_centroids(tmp_path, loader):
    v, f = _tensors(trimesh.creation.icosphere(subdivisions=3, radius=0.5))
    result = export(v, f, red_blue, tmp_path, _config(texture_size=256))
    mesh = loader(result.paths["obj"] if loader is _load_obj else result.paths["glb"])
    centroids = from_y_up(mesh.vertices[mesh.faces].mean(1))  # back to the training frame
    uv = mesh.visual.uv[mesh.faces].mean(1)
    colours = _sample(mesh.visual.material.image if loader is _load_obj else mesh.visual.material.baseColorTexture, uv)
    expected = np.where(centroids[:, :1] > 0, RED, BLUE)
    far = np.abs(centroids[:, 0]) > 0.03  # a texel or two from x = 0 may blend
    error = np.abs(colours - expected).max(1)
    assert far.sum() > 1000
    assert error[far].max() < 0.1


def test_y_up_rotation(tmp_path):
    assert np.allclose(to_y_up(np.eye(3)), [[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    assert np.isclose(np.linalg.det(to_y_up(np.eye(3))), 1.0)  # a proper rotation
    points = np.random.default_rng(0).normal(size=(10, 3))
    assert np.allclose(from_y_up(to_y_up(points)), points)

    box = trimesh.creation.box(extents=(0.2, 0.4, 1.0))  # tall along training z
    box.apply_translation((0.1, 0.2, 0.3))
    v, f = _tensors(box)
    result = export(v, f, smooth, tmp_path, _config())
    for mesh in (_load_obj(result.paths["obj"]), _load_glb(result.paths["glb"])):
        lo, hi = mesh.bounds
        assert np.allclose(hi - lo, (0.2, 1.0, 0.4), atol=1e-4)  # tall along y
        assert np.allclose((hi + lo) / 2, (0.1, 0.3, -0.2), atol=1e-4)


def test_cleaning_and_decimation(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    # Unwelded copy (every face owns its three vertices), a degenerate face, a tiny far piece.
    soup_v = sphere.vertices[sphere.faces].reshape(-1, 3)
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    speck = trimesh.creation.icosphere(subdivisions=0, radius=0.01)
    vertices = np.concatenate([soup_v, speck.vertices + (0.9, 0.0, 0.0)])
    faces = np.concatenate([soup_f, [[0, 0, 1]], speck.faces + len(soup_v)])
    v, f = clean_mesh(vertices, faces, min_component_ratio=0.05, merge_distance=1e-6)
    assert (len(v), len(f)) == (len(sphere.vertices), len(sphere.faces))
    assert np.abs(v).max() < 0.51  # the speck at x = 0.9 is gone

    result = export(torch.tensor(vertices, dtype=torch.float32), torch.tensor(faces), smooth, tmp_path, _config(min_component_ratio=0.05))
    assert result.num_faces == len(sphere.faces)

    dense = trimesh.creation.icosphere(subdivisions=4, radius=0.5)  # 5120 faces
    dv, df = decimate(dense.vertices, dense.faces, 1000)
    assert 900 <= len(df) <= 1000
    assert trimesh.Trimesh(dv, df).is_watertight
    result = export(*_tensors(dense), smooth, tmp_path / "decimated", _config(target_faces=1000))
    assert 900 <= result.num_faces <= 1000


def test_a_decimation_that_opens_the_mesh_is_redone_or_left_out():
    """Quadric collapses can pinch a thin part into an edge of four faces: such a result is redone with another
    aggressiveness, then a larger budget, and a watertight mesh is never returned open."""
    from fast_simplification import simplify

    dense = trimesh.creation.icosphere(subdivisions=4, radius=0.5)  # 5120 faces
    calls = []

    def pinching(v, f, target_count, agg):  # opens the mesh (drops a face) at fast-simplification's default agg
        calls.append((target_count, agg))
        dv, df = simplify(v, f, target_count=target_count, agg=agg)
        return (dv, df[1:]) if agg == 7.0 else (dv, df)

    v, f = decimate(dense.vertices, dense.faces, 1000, simplify=pinching)
    assert calls == [(1000, 7.0), (1000, 5.0)]
    assert 900 <= len(f) <= 1000 and trimesh.Trimesh(v, f, process=False).is_watertight

    calls.clear()
    v, f = decimate(dense.vertices, dense.faces, 1000, simplify=lambda v, f, target_count, agg: (
        calls.append(target_count) or (v, f[1:])))
    assert calls == [1000] * 4 + [1250] * 4 + [1500] * 4 + [2000] * 4  # every try opened it: kept as it was
    assert np.array_equal(f, dense.faces) and np.array_equal(v, dense.vertices)

    calls.clear()
    v, f = decimate(dense.vertices, dense.faces[1:], 1000, simplify=pinching)  # open already: the first result
    assert calls == [(1000, 7.0)] and len(f) < 1000


def test_turntable_video(tmp_path):
    import imageio.v2 as imageio

    v, f = _tensors(trimesh.creation.icosphere(subdivisions=2, radius=0.5))
    config = _config(turntable=True, turntable_frames=12, turntable_fps=12, turntable_resolution=64)
    result = export(v, f, red_blue, tmp_path, config)
    reader = imageio.get_reader(result.paths["turntable"])
    count = reader.count_frames()
    frames = np.stack([frame for frame in reader])  # list(reader) would ask for len(), which is inf
    reader.close()
    assert count == 12
    assert frames.shape == (12, 64, 64, 3)
    assert frames[:, 0, 0].min() > 240  # white background in the corners
    centre = frames[:, 32, 32].astype(float)  # the sphere covers the centre: not white, red or blue
    assert (centre.min(1) < 100).all()
    # Azimuth 0 looks from +x (red half), azimuth 180 from -x (blue half).
    assert centre[0, 0] > 150 > centre[0, 2]
    assert centre[6, 2] > 150 > centre[6, 0]
    assert frames.std() > 30


def test_dilation_fills_rings_then_mean():
    image = torch.zeros(20, 20, 3)
    covered = torch.zeros(20, 20, dtype=torch.bool)
    covered[5:10, 5:10] = True
    image[5:10, 5:10] = torch.tensor([1.0, 0.0, 0.0])
    covered[12:15, 12:15] = True
    image[12:15, 12:15] = torch.tensor([0.0, 0.0, 1.0])
    out = dilate_texture(image, covered, iterations=2)
    assert torch.allclose(out[3:12, 3, :], torch.tensor([1.0, 0.0, 0.0]).expand(9, 3))  # 2 px left of the red square
    assert torch.allclose(out[16, 12:15], torch.tensor([0.0, 0.0, 1.0]).expand(3, 3))  # 2 px below the blue one
    mean = image[covered].mean(0)
    assert torch.allclose(out[2, 5], mean) and torch.allclose(out[19, 0], mean)  # beyond the two rings
    assert torch.equal(out[covered], image[covered])


def test_no_seams_along_edges(tmp_path):
    """Bilinear texture lookups along every edge (chart borders included) match the colour field."""
    v, f = _tensors(trimesh.creation.icosphere(subdivisions=3, radius=0.5))
    errors = {}
    for iterations in (8, 0):
        result = export(v, f, smooth, tmp_path / str(iterations), _config(dilation_iterations=iterations))
        mesh = _load_obj(result.paths["obj"])
        tri_uv, tri_pos = mesh.visual.uv[mesh.faces], from_y_up(mesh.vertices[mesh.faces])
        t = np.array([0.05, 0.5, 0.95])[:, None, None]  # points along each edge (k, k + 1)
        uv = (tri_uv * (1 - t[..., None]) + np.roll(tri_uv, -1, axis=1) * t[..., None]).reshape(-1, 2)
        pos = (tri_pos * (1 - t[..., None]) + np.roll(tri_pos, -1, axis=1) * t[..., None]).reshape(-1, 3)
        expected = smooth(torch.tensor(pos, dtype=torch.float32)).numpy()
        errors[iterations] = np.abs(_sample(mesh.visual.material.image, uv) - expected).max(1)
        texels = np.asarray(mesh.visual.material.image.convert("RGB"))
        assert texels.max(-1).min() > 0.1 * 255  # no black texel anywhere
    assert np.quantile(errors[8], 0.999) < 0.08
    assert np.quantile(errors[0], 0.999) > np.quantile(errors[8], 0.999)  # the check does see undilated borders


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    v, f = _tensors(trimesh.creation.icosphere(subdivisions=3, radius=0.5))
    calls = []

    def failing(points):
        calls.append(len(points))
        if len(calls) == 2:
            raise RuntimeError("albedo exploded")
        return smooth(points)

    with pytest.raises(RuntimeError, match="albedo exploded"):
        export(v, f, failing, tmp_path / "bake", _config(bake_chunk_size=1000))
    assert len(calls) == 2 and os.listdir(tmp_path / "bake") == []

    def broken_writer(path, frames, fps):  # dies half way through the video, after the other files
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "_write_video", broken_writer)
    config = _config(turntable=True, turntable_frames=2, turntable_resolution=32)
    with pytest.raises(OSError, match="disk full"):
        export(v, f, smooth, tmp_path / "write", config)
    assert os.listdir(tmp_path / "write") == []

    polls = []  # should_stop is polled after each step: the third poll follows the bake
    with pytest.raises(Cancelled, match="step 3"):
        export(v, f, smooth, tmp_path / "cancel", config, should_stop=lambda: polls.append(1) or len(polls) >= 3)
    assert os.listdir(tmp_path / "cancel") == []


def test_config_check_names_the_field():
    ExportConfig().check()
    for field, value in (("turntable_resolution", 100), ("texture_size", 0), ("min_component_ratio", 1.5)):
        with pytest.raises(ValueError, match=field):
            ExportConfig(**{field: value}).check()
    with pytest.raises(ValueError, match="faces"):
        export(torch.zeros(3, 3), torch.zeros(1, 3), smooth, "/nonexistent", _config())

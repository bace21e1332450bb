"""stages.export_files through stages.export: files as other tools read them.

A welded OBJ that imports as one closed part of the right genus, a GLB whose structure the
glTF spec asks for, zip entries readable by everyone, a fast-start MP4, a well-filled atlas.
"""
import json
import struct
import zipfile

import numpy as np
import pytest
import torch
import trimesh

import geometry.uv as uv_module
import geometry.uv_charts as charts_module
from bench.export_checks import mp4_atoms, shape_mesh, shape_sdf
from geometry.mesh_ops import clean_mesh, is_watertight
from geometry.tets import make_tet_grid, marching_tets
from geometry.uv import MAX_OVERLAP, overlapping_texels, texture_fill, unwrap
from geometry.uv_charts import MIN_FACING, axis_labels
from stages.export import ExportConfig, export
from stages.export_files import MATERIAL_NAME


def colours(points: torch.Tensor) -> torch.Tensor:  # [N, 3] -> [N, 3] in [0.1, 0.9]
    return 0.5 + 0.4 * torch.sin(3.0 * points + torch.tensor([0.0, 2.0, 4.0]))


def _export(tmp_path, verts, faces, **overrides):
    config = ExportConfig(**{"texture_size": 128, "turntable": False, **overrides})
    return export(verts, faces, colours, tmp_path, config)


def _obj_records(path: str) -> dict[str, list[list[str]]]:
    records: dict[str, list[list[str]]] = {}
    for line in open(path):
        key, *rest = line.split()
        records.setdefault(key, []).append(rest)
    return records


def _glb(path: str) -> tuple[dict, bytes]:
    data = open(path, "rb").read()
    magic, version, length = struct.unpack_from("<III", data)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_length, json_kind = struct.unpack_from("<II", data, 12)
    assert json_kind == 0x4E4F534A and json_length % 4 == 0
    bin_length, bin_kind = struct.unpack_from("<II", data, 20 + json_length)
    assert bin_kind == 0x004E4942 and bin_length % 4 == 0 and 28 + json_length + bin_length == len(data)
    return json.loads(data[20 : 20 + json_length]), data[28 + json_length :]


@pytest.mark.parametrize("shape, euler", [("sphere", 2), ("torus", 0)])
def test_obj_imports_as_one_closed_part(tmp_path, shape, euler):
    verts, faces = shape_mesh(shape, grid=24)
    result = _export(tmp_path, verts, faces)
    obj = _obj_records(result.paths["obj"])
    assert obj["usemtl"] == [[MATERIAL_NAME]]
    assert len(obj["v"]) == len(obj["vn"]) == result.num_vertices
    assert len(obj["vt"]) == result.num_uv_vertices > result.num_vertices  # seams exist, and only vt is split there
    corners = np.array([[c.split("/") for c in face] for face in obj["f"]], dtype=np.int64) - 1  # [F, 3, (v, vt, vn)]
    assert np.array_equal(corners[..., 0], corners[..., 2])  # one normal per position, shared across seams
    welded = trimesh.Trimesh(np.array(obj["v"], dtype=float), corners[..., 0], process=False)
    assert welded.is_watertight and welded.is_winding_consistent
    assert welded.euler_number == euler
    assert result.watertight

    # A tool that merges only what the file shares (positions, not UVs) sees one closed part.
    loaded = trimesh.load(result.paths["obj"], force="mesh", process=False)
    loaded.merge_vertices(merge_tex=True, merge_norm=True)
    assert len(loaded.vertices) == result.num_vertices
    assert len(loaded.split(only_watertight=False)) == 1
    assert loaded.is_watertight and loaded.euler_number == euler


def test_glb_structure(tmp_path):
    verts, faces = shape_mesh("sphere", grid=24)
    result = _export(tmp_path / "closed", verts, faces)
    gltf, blob = _glb(result.paths["glb"])
    prim = gltf["meshes"][0]["primitives"][0]
    views, accessors = gltf["bufferViews"], gltf["accessors"]
    for name in ("POSITION", "NORMAL", "TEXCOORD_0"):
        assert views[accessors[prim["attributes"][name]]["bufferView"]]["target"] == 34962  # ARRAY_BUFFER
        assert accessors[prim["attributes"][name]]["count"] == result.num_uv_vertices
    assert views[accessors[prim["indices"]]["bufferView"]]["target"] == 34963  # ELEMENT_ARRAY_BUFFER
    assert "target" not in views[gltf["images"][0]["bufferView"]]  # image data is not vertex data
    for view in views:
        assert view["byteOffset"] % 4 == 0 and view["byteOffset"] + view["byteLength"] <= len(blob)
    material = gltf["materials"][prim["material"]]
    assert material["name"] == MATERIAL_NAME and gltf["images"][0]["name"] == "texture_kd"
    assert material["doubleSided"] is False

    def array(name, width):  # the accessor's data as [count, width] floats
        accessor = accessors[prim["attributes"][name]]
        view = views[accessor["bufferView"]]
        return np.frombuffer(blob, "<f4", accessor["count"] * width, view["byteOffset"]).reshape(-1, width)

    position = array("POSITION", 3)
    assert np.allclose(accessors[prim["attributes"]["POSITION"]]["min"], position.min(0))
    assert np.allclose(accessors[prim["attributes"]["POSITION"]]["max"], position.max(0))
    assert np.allclose(np.linalg.norm(array("NORMAL", 3), axis=1), 1.0, atol=1e-5)
    indices = accessors[prim["indices"]]
    index = np.frombuffer(blob, "<u4", indices["count"], views[indices["bufferView"]]["byteOffset"])
    assert indices["count"] == 3 * result.num_faces and index.max() < result.num_uv_vertices

    # An open mesh (half a sphere) must stay visible from behind.
    v, f = verts.numpy(), faces.numpy()
    half = f[(v[f][:, :, 2] > 0).all(1)]
    result = _export(tmp_path / "open", verts, torch.as_tensor(half))
    assert not result.watertight
    assert _glb(result.paths["glb"])[0]["materials"][0]["doubleSided"] is True


def test_zip_entries_are_readable_by_everyone(tmp_path):
    verts, faces = shape_mesh("sphere", grid=16)
    result = _export(tmp_path, verts, faces)
    with zipfile.ZipFile(result.paths["zip"]) as archive:
        infos = archive.infolist()
        assert len(infos) == 3
        for info in infos:
            assert info.external_attr >> 16 == 0o100644, (info.filename, oct(info.external_attr >> 16))
            assert info.create_system == 3


def test_turntable_is_fast_start(tmp_path):
    verts, faces = shape_mesh("sphere", grid=16)
    result = _export(tmp_path, verts, faces, turntable=True, turntable_frames=4, turntable_resolution=32)
    atoms = mp4_atoms(result.paths["turntable"])
    assert "moov" in atoms and "mdat" in atoms
    assert atoms.index("moov") < atoms.index("mdat")


@pytest.mark.parametrize("shape, least", [
    pytest.param("sphere", 0.75, marks=pytest.mark.slow), ("cube", 0.93), pytest.param("torus", 0.68, marks=pytest.mark.slow),
])
def test_atlas_fill(shape, least):
    """Fill of a 512 px atlas of a 48-cell marching-tets mesh (28k-34k faces). The issue asks for
    0.7; projected charts cut into cells and rims reach 0.78 / 0.96 / 0.71 here (one cut per
    chart before: 0.78 / 0.95 / 0.69; xatlas's own charts: 0.55 / 0.94 / 0.46)."""
    verts, faces = shape_mesh(shape, grid=48)
    v, f = verts.double().numpy(), faces.numpy()
    vmap, uv_faces, uv = unwrap(v, f, 512)
    assert np.array_equal(vmap[uv_faces], f)  # the split mesh is the input mesh
    assert uv.min() >= 0 and uv.max() <= 1
    assert overlapping_texels(uv, uv_faces, 512) == 0
    assert texture_fill(uv, uv_faces, 512) >= least


def _lumpy_sphere(grid: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A sphere with bumps about as steep as a refined mesh's: some of them overhang."""
    points, tets = make_tet_grid(grid, (-0.7,) * 3, (0.7,) * 3)
    x, y, z = points.unbind(-1)
    sdf = shape_sdf("sphere", points) + 0.02 * torch.sin(23 * x) * torch.sin(19 * y + 1) * torch.sin(29 * z + 2)
    verts, faces = marching_tets(points, tets, sdf)
    return verts.double().numpy(), faces.numpy()


def test_projected_charts_do_not_flip_or_overlap():
    v, f = _lumpy_sphere()
    normals = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    lengths = np.linalg.norm(normals, axis=1)
    axes = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], float)
    facing = (normals * axes[axis_labels(v, f)]).sum(1) / np.maximum(lengths, 1e-30)
    assert facing[lengths > 1e-6 * lengths.mean()].min() >= MIN_FACING  # every projected triangle keeps its winding
    vmap, uv_faces, uv = unwrap(v, f, 256)
    assert np.array_equal(vmap[uv_faces], f)
    assert overlapping_texels(uv, uv_faces, 256) <= MAX_OVERLAP * 256**2
    assert texture_fill(uv, uv_faces, 256) >= 0.6  # 0.63; xatlas's own charts: 0.51


def test_unwrap_falls_back_to_xatlas_charts(monkeypatch):
    calls = []
    xatlas_atlas = uv_module._xatlas_atlas
    monkeypatch.setattr(uv_module, "MAX_OVERLAP", -1.0)  # every projected atlas counts as overlapping
    monkeypatch.setattr(uv_module, "_xatlas_atlas", lambda *args: calls.append(args) or xatlas_atlas(*args))
    verts, faces = shape_mesh("sphere", grid=16)
    v, f = verts.double().numpy(), faces.numpy()
    vmap, uv_faces, uv = unwrap(v, f, 128)
    assert len(calls) == 1
    assert np.array_equal(vmap[uv_faces], f)
    assert uv.min() >= 0 and uv.max() <= 1
    assert texture_fill(uv, uv_faces, 128) > 0.3


def test_unwrap_packs_again_larger_when_the_atlas_leaves_room(monkeypatch):
    """Density search: an atlas packed from too low a first guess is packed again at a density
    scaled by texture size / its larger side (still fitting the texture), and the fuller is kept."""
    verts, faces = shape_mesh("sphere", grid=16)
    v, f = verts.double().numpy(), faces.numpy()
    monkeypatch.setattr(uv_module, "ATLAS_FILL_GUESS", 0.25)  # the first atlas comes out ~70 % of the texture
    monkeypatch.setattr(uv_module, "CHART_CELLS", (0,))
    calls = []
    projected_atlas = uv_module._projected_atlas
    monkeypatch.setattr(uv_module, "_projected_atlas", lambda *args: calls.append((args[3], projected_atlas(*args))) or calls[-1][1])
    vmap, uv_faces, uv = unwrap(v, f, 128)
    (first_density, (_, first_faces, first_uv, room)), (second_density, second) = calls
    assert room > 1.3 and second_density == pytest.approx(first_density * room * 0.995)
    assert second[3] >= 1  # the larger atlas still fits: padding stays a texel
    fills = [texture_fill(first_uv, first_faces, 128), texture_fill(second[2], second[1], 128)]
    assert np.array_equal(vmap[uv_faces], f)
    assert uv.min() >= 0 and uv.max() <= 1 and overlapping_texels(uv, uv_faces, 128) == 0
    assert texture_fill(uv, uv_faces, 128) == pytest.approx(max(fills), abs=0.005)


def test_straighten_removes_spikes_without_swapping():
    """A face whose edges to another key are longer than those to its own takes that key;
    two such neighbours do not swap keys back and forth."""
    verts, faces = shape_mesh("sphere", grid=16)
    v, f = verts.double().numpy(), faces.numpy()
    across, length = charts_module.neighbours(v, f)
    key = np.random.default_rng(0).integers(0, 2, len(f))  # a salt-and-pepper border everywhere

    def border(k):
        return float((length * (k[np.maximum(across, 0)] != k[:, None])).sum())

    def spikes(k):
        other = (k[np.maximum(across, 0)] != k[:, None]) & (across >= 0)
        return int(((other * length).sum(1) > (~other * length).sum(1)).sum())

    straight = charts_module.straighten(key, across, length, passes=50)
    assert border(straight) < 0.5 * border(key)
    assert spikes(straight) == 0 < spikes(key)
    allowed = np.zeros((len(f), 2), bool)
    allowed[:, 0] = True  # nobody may take key 1
    assert not (charts_module.straighten(key, across, length, allowed, passes=50)[key == 0]).any()


def test_cut_charts_are_cells_and_quartered_rims():
    verts, faces = shape_mesh("sphere", grid=32)
    v, f = verts.double().numpy(), faces.numpy()
    label = axis_labels(v, f)
    axis, sign = label // 2, np.where(label % 2 == 0, 1.0, -1.0)
    rows = np.arange(len(f))
    corners = np.stack([v[f][rows, :, (axis + 1) % 3], sign[:, None] * v[f][rows, :, (axis + 2) % 3]], -1) * 300.0
    a, b = charts_module.edge_pairs(f)
    neighbours = charts_module.neighbours(v, f)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    charts = {}
    for levels in (0, 3):
        charts_module.SPLIT_LEVELS, old = levels, charts_module.SPLIT_LEVELS
        try:
            chart = charts_module.cut_charts(corners, label, neighbours, a, b, 64)
        finally:
            charts_module.SPLIT_LEVELS = old
        assert all(len(np.unique(label[chart == c])) == 1 for c in range(chart.max() + 1))  # one axis per chart
        assert len(np.unique(charts_module.components(len(f), a, b, chart[a] == chart[b]))) == chart.max() + 1  # connected
        charts[levels] = chart
    uncut = np.bincount(charts[0], area)
    assert uncut.min() >= charts_module.MERGE_BELOW * 64**2  # every fragment joined a cell
    whole = uncut >= charts_module.SPLIT_BELOW * 64**2  # full cells stay whole; rims are cut
    big = np.isin(charts[0], np.flatnonzero(whole))
    assert all(len(np.unique(charts[3][charts[0] == c])) == 1 for c in np.flatnonzero(whole))
    assert len(np.unique(charts[3][~big])) > len(np.unique(charts[0][~big]))


def test_overlapping_texels_counts_overlaps_not_shared_edges():
    quad = np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.1, 0.9]], np.float32)
    assert overlapping_texels(quad, np.array([[0, 1, 2], [0, 2, 3]]), 64) == 0  # a shared diagonal is no overlap
    twice = np.concatenate([quad[:3], quad[:3]])  # one triangle, twice, sharing no vertex
    covered = round(texture_fill(twice[:3], np.array([[0, 1, 2]]), 64) * 64**2)
    assert covered > 0
    assert overlapping_texels(twice, np.array([[0, 1, 2], [3, 4, 5]]), 64) == covered


def test_cleaning_keeps_a_closed_mesh_closed():
    """A weld collapses an edge and a sliver has zero area: the surface must stay closed."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v, f = sphere.vertices.copy(), sphere.faces
    a, b, c = f[0]
    v[c] = (v[a] + v[b]) / 2  # face 0: zero area, three distinct vertices (deleting it opens a hole)
    e0, e1 = f[100][:2]
    v[e1] = v[e0]  # an edge of length 0: its ends weld, its two faces fold away
    cv, cf = clean_mesh(v, f, min_component_ratio=0.0, merge_distance=1e-6)
    assert (len(cv), len(cf)) == (len(v) - 1, len(f) - 2)
    assert is_watertight(torch.as_tensor(cf))
    assert trimesh.Trimesh(cv, cf, process=False).euler_number == 2

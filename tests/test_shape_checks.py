"""The benchmark's shape checks (bench/shape_checks.py) on the true primitives and on meshes
with a known fault: a torus without its hole, a sunken base, light baked into the texture."""
import numpy as np
import pytest

from bench.quality import primitive_as_export
from bench.shape_checks import albedo_up_down, base_gap, shape_checks, topology


def test_true_primitives_pass():
    for shape in ("sphere", "cube", "cylinder", "cone", "torus", "capsule"):
        checks = shape_checks(primitive_as_export(shape, "red"), shape)
        assert checks["parts"] == 1 and checks["closed"] and checks["genus_ok"], (shape, checks)
        assert checks["closed_shells"] == 1 and checks["euler_ok"] and checks["self_intersections"] == 0  # bench.solid_metrics
        assert checks["genus"] == (1 if shape == "torus" else 0)
        assert checks["albedo_up_down"] == pytest.approx(1.0)
        if shape in ("cube", "cylinder", "cone"):
            assert checks["base_gap"] < 1e-6
        else:
            assert checks["base_gap"] is None


def test_a_sunken_base_and_a_split_mesh_are_seen():
    cone = primitive_as_export("cone", "red")
    low = cone["vertices"][:, 2] < -0.4
    cone["vertices"][low, 2] -= 0.1  # the base 0.1 below the true plane
    assert base_gap(cone, "cone") == pytest.approx(0.1, abs=0.01)

    cube = primitive_as_export("cube", "red")  # faces not sharing vertices: what an unwelded export imports as
    f = cube["faces"]
    cube["vertices"], cube["faces"] = cube["vertices"][f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3)
    assert topology(cube)["parts"] == 1  # welding by position joins them again
    cube["vertices"][:3] += 1e-3  # one face pulled loose
    checks = topology(cube)
    assert checks["parts"] == 2 and not checks["closed"] and checks["genus"] is None


def test_baked_light_is_measured():
    sphere = primitive_as_export("sphere", "red")
    sphere["texture"] = np.array([[[0.2] * 3, [0.2] * 3], [[0.6] * 3, [0.6] * 3]], dtype=np.float32)  # row 0 dark
    sphere["uv"] = np.where(sphere["vertices"][:, 2:3] > 0, [[0.5, 0.99]], [[0.5, 0.01]])  # the top bright
    assert albedo_up_down(sphere)["albedo_up_down"] > 2.5


def test_a_turned_cube_is_measured_at_its_best_heading():
    from bench.shape_checks import aligned_volume_iou, turned
    from geometry.metrics import volumetric_iou
    from guidance.primitive_shapes import primitive_mesh

    cube = turned(primitive_as_export("cube", "red"), 30.0)
    raw = volumetric_iou((cube["vertices"], cube["faces"]), primitive_mesh("cube"), 32)
    assert raw < 0.85  # a cube turned by 30 degrees against the upright one
    assert aligned_volume_iou(cube["vertices"], cube["faces"], "cube", 32) > 0.95
    sphere = primitive_as_export("sphere", "red")  # symmetric about z: never turned
    assert aligned_volume_iou(sphere["vertices"], sphere["faces"], "sphere", 32) == pytest.approx(
        volumetric_iou((sphere["vertices"], sphere["faces"]), primitive_mesh("sphere"), 32))


# --------------------------------------------------------------------------- solid checks (issue 31)
def _export_of(mesh) -> dict:
    return {"vertices": np.asarray(mesh.vertices, dtype=np.float64), "faces": np.asarray(mesh.faces, dtype=np.int64)}


def test_solid_checks_pass_the_true_primitives():
    from bench.solid_metrics import solid_checks

    for shape in ("cube", "cylinder", "cone", "torus", "capsule"):
        checks = solid_checks(primitive_as_export(shape, "red"), shape)
        assert checks["shells"] == checks["closed_shells"] == 1, (shape, checks)
        assert checks["self_intersections"] == 0 and checks["cavity_share"] == 0.0 and checks["weld_pairs"] == 0
        assert checks["euler_ok"] and checks["euler"] == (0 if shape == "torus" else 2)
        for key in ("base_pit", "base_bulge", "cap_pit", "cap_bulge"):
            assert checks.get(key, 0.0) < 1e-6, (shape, key, checks[key])
    assert solid_checks(primitive_as_export("capsule", "red"), "capsule")["angle_p95"] < 10.0


def test_vertices_an_importer_would_weld_are_counted():
    import trimesh

    from bench.solid_metrics import weld_pairs

    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.4)
    export = _export_of(ball)
    assert weld_pairs(export) == 0
    export["vertices"][7] = export["vertices"][3] + [5e-5, 0, 0]  # two vertices 5e-5 apart: Blender merges them
    assert weld_pairs(export) == 1


def test_a_hidden_shell_is_counted_with_its_cavity():
    import trimesh

    from bench.solid_metrics import solid_checks

    outer = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    inner = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    inner.invert()  # an inward-facing wall: the cavity of a hollow ball
    checks = solid_checks(_export_of(trimesh.util.concatenate([outer, inner])), "sphere")
    assert checks["shells"] == checks["closed_shells"] == 2
    assert checks["euler"] == 4 and not checks["euler_ok"]
    assert checks["cavity_share"] == pytest.approx(0.3**3 / 0.5**3, abs=0.03)
    assert checks["self_intersections"] == 0


def test_crossing_faces_are_counted():
    import trimesh

    from bench.solid_metrics import self_intersections

    a = trimesh.creation.box(extents=(0.8, 0.8, 0.8))
    b = a.copy()
    b.apply_translation((0.3, 0.2, 0.1))  # two boxes through each other: their walls cross
    assert self_intersections(a) == 0
    crossing = self_intersections(trimesh.util.concatenate([a, b]))
    assert crossing >= 4
    b.apply_translation((2.0, 0.0, 0.0))  # apart: nothing crosses
    assert self_intersections(trimesh.util.concatenate([a, b])) == 0


def test_a_pit_and_a_bulge_in_a_base_are_measured_over_its_area():
    import trimesh

    from bench.solid_metrics import flat_faces

    cylinder = primitive_as_export("cylinder", "red")
    v = cylinder["vertices"]
    centre = np.flatnonzero((np.abs(v[:, 0]) < 1e-9) & (np.abs(v[:, 1]) < 1e-9) & (v[:, 2] < 0))
    assert len(centre) == 1  # the base is a fan around its centre vertex
    v[centre, 2] += 0.2  # a conical pit 0.2 deep in the middle of the base
    solid = trimesh.Trimesh(v, cylinder["faces"], process=True)
    checks = flat_faces(solid, "cylinder")
    assert checks["base_pit"] == pytest.approx(0.2, abs=0.02)
    assert checks["cap_pit"] < 1e-6 and checks["base_bulge"] < 1e-6
    assert base_gap(cylinder, "cylinder") < 0.03  # the lowest points cannot see it
    v[centre, 2] -= 0.3  # now sticking out 0.1 below the base
    checks = flat_faces(trimesh.Trimesh(v, cylinder["faces"], process=True), "cylinder")
    assert checks["base_bulge"] == pytest.approx(0.1, abs=0.02) and checks["base_pit"] < 1e-6


def test_a_spike_shows_in_the_adjacent_face_angles():
    import trimesh

    from bench.solid_metrics import adjacent_angles

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    smooth = adjacent_angles(sphere)
    sphere.vertices[0] *= 1.6  # one vertex pulled out: a spike
    spiky = adjacent_angles(sphere)
    assert smooth["angle_max"] < 15.0 and spiky["angle_max"] > 60.0

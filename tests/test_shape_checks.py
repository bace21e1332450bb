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

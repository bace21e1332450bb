"""renderers.mesh's textured render (the turntable's and the quality benchmark's) and the shading it shares."""
import pytest
import torch
import trimesh

from geometry.mesh_ops import file_normals
from renderers.cameras import cameras_from_angles
from renderers.mesh import render_textured
from renderers.rasterizer import Rasterizer
from renderers.shading import lambert


def _sphere():
    mesh = trimesh.creation.icosphere(3, radius=0.5)
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.long)
    return verts, faces, torch.tensor(file_normals(mesh.vertices, mesh.faces), dtype=torch.float32)


def test_lambert_is_ambient_plus_the_cosine_and_two_sided_lights_back_faces():
    up = torch.tensor([[0.0, 0.0, 1.0]])
    assert lambert(up, up, 0.3).item() == pytest.approx(1.0)
    assert lambert(up, -up, 0.3).item() == pytest.approx(0.3)  # facing away: the ambient share only
    assert lambert(up, -up, 0.3, two_sided=True).item() == pytest.approx(1.0)


@pytest.mark.parametrize("light", ["point", "view"])
def test_a_uniform_texture_renders_its_colour_lit_at_the_centre_and_the_background_around(light):
    verts, faces, normals = _sphere()
    tex = torch.tensor([0.8, 0.2, 0.4]).expand(4, 4, 3)
    cams = cameras_from_angles([20.0, -10.0], [0.0, 120.0], 3.0, 40.0, (48, 48))
    image = render_textured(verts, faces, torch.full((len(verts), 2), 0.5), normals, tex, cams, 0.3, light,
                            background=0.6, rasterizer=Rasterizer.make("torch"))
    assert image.shape == (2, 48, 48, 3)
    torch.testing.assert_close(image[:, 24, 24], tex[0, 0].expand(2, 3), atol=0.03, rtol=0)  # faces the light
    torch.testing.assert_close(image[:, 0, 0], torch.full((2, 3), 0.6))
    with pytest.raises(ValueError, match="light"):
        render_textured(verts, faces, torch.zeros(len(verts), 2), normals, tex, cams, 0.3, "sun",
                        rasterizer=Rasterizer.make())


def test_a_slice_of_cameras_renders_as_those_cameras():
    verts, faces, normals = _sphere()
    tex = torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(0))
    uv = (verts[:, :2] + 0.5).clamp(0, 1)
    cams = cameras_from_angles([20.0, 0.0, -30.0], [0.0, 90.0, 200.0], 3.0, 40.0, (32, 32))
    part = cams[1:3]
    assert len(part) == 2 and part.view_words == cams.view_words[1:3] and part.height == 32
    torch_raster = Rasterizer.make("torch")
    whole = render_textured(verts, faces, uv, normals, tex, cams, 0.35, "view", rasterizer=torch_raster)
    part_image = render_textured(verts, faces, uv, normals, tex, part, 0.35, "view", rasterizer=torch_raster)
    torch.testing.assert_close(part_image, whole[1:3])


def test_file_normals_are_unit_outward_and_up_where_the_faces_cancel():
    mesh = trimesh.creation.icosphere(2)
    normals = file_normals(mesh.vertices, mesh.faces)
    assert normals.shape == mesh.vertices.shape
    assert (normals * mesh.vertices).sum(1).min() > 0.99  # a unit sphere's normal is its position
    pinch = file_normals([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0, 1, 2], [0, 2, 1]])
    assert pinch.tolist() == [[0.0, 0.0, 1.0]] * 3

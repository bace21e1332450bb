"""The shape in the viewer while a run trains: the coarse surface and the refine stage's meshes as GLBs
(`stages.live_models`), passed up through the pipeline's events and gone once the export exists."""
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from helpers import tiny_run_config
from stages import live_models
from stages.pipeline import generate


def _load(path) -> trimesh.Trimesh:
    scene = trimesh.load(path, file_type="glb")
    meshes = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    assert len(meshes) == 1
    return meshes[0]


def test_a_run_shows_the_coarse_surface_then_the_refine_meshes_then_only_the_export(tmp_path):
    config = tiny_run_config()
    config.refine.iters, config.refine.model_every = 5, 2  # meshes at steps 2 and 4 (not 5: the export follows)
    seen = []  # (stage, step, label, name, faces, colours) of each event with a model, read when it came
    stages = []  # (stage, whether the event has a model) of every event
    for event in generate("a red cube", config, out_root=tmp_path):
        stages.append((event.stage, bool(event.model)))
        if event.model:
            mesh = _load(event.model)  # it exists, whole, when its event comes
            colours = mesh.visual.vertex_colors
            assert colours.shape == (len(mesh.vertices), 4)
            seen.append((event.stage, event.step, event.model_label, Path(event.model).name, len(mesh.faces),
                         colours[:, :3].astype(int)))
            # The previous intermediate model is gone: one at a time in the run folder.
            assert sorted(p.name for p in Path(event.run_dir).glob("preview-*.glb")) == [Path(event.model).name]
    assert [(s[0], s[1], s[2], s[3]) for s in seen] == [
        ("coarse", 4, "coarse surface", "preview-coarse.glb"),
        ("refine", 2, "refine step 2 (vertex colours)", "preview-refine-2.glb"),
        ("refine", 4, "refine step 4 (vertex colours)", "preview-refine-4.glb"),
    ]
    assert all(s[4] > 20 for s in seen)  # a surface, not a stray triangle
    assert all(np.ptp(s[5], axis=0).max() < 255 for s in seen)  # colours from the field, not noise
    # The coarse surface comes after the last coarse step and before the refine stage's first.
    first = [has for _, has in stages].index(True)
    assert {s for s, _ in stages[:first]} == {"setup", "coarse"} and stages[first + 1][0] == "refine"
    run_dir = tmp_path / next(tmp_path.iterdir()).name
    assert (run_dir / "model.glb").is_file() and not list(run_dir.glob("preview-*.glb"))  # the export replaced them


def test_model_every_0_writes_no_refine_meshes(tmp_path):
    config = tiny_run_config()
    config.refine.model_every = 0
    models = [e.model for e in generate("a red cube", config, out_root=tmp_path) if e.model]
    assert [Path(m).name for m in models] == ["preview-coarse.glb"]


def test_glb_is_y_up_with_the_vertex_colours_given(tmp_path):
    """A tall box (z up in training) stands along +y in the GLB, as the export's files do."""
    box = trimesh.creation.box(extents=(0.2, 0.4, 1.0))
    colours = np.tile([[0.9, 0.2, 0.1]], (len(box.vertices), 1))
    path = tmp_path / "preview-x.glb"
    live_models.write_glb(path, np.asarray(box.vertices), np.asarray(box.faces), colours)
    mesh = _load(path)
    extent = mesh.vertices.max(0) - mesh.vertices.min(0)
    np.testing.assert_allclose(extent, (0.2, 1.0, 0.4), atol=1e-6)  # (x, y, z) -> (x, z, -y)
    assert mesh.is_winding_consistent and mesh.volume > 0  # a rotation keeps the faces facing out
    np.testing.assert_array_equal(mesh.visual.vertex_colors[0, :3], (230, 51, 26))
    assert not list(tmp_path.glob(".tmp-*"))  # written under a temporary name, then renamed


def test_clear_keeps_only_the_named_model(tmp_path):
    for name in ("preview-coarse.glb", "preview-refine-2.glb", "model.glb"):
        (tmp_path / name).write_bytes(b"glTF")
    live_models.clear(tmp_path, keep="preview-refine-2.glb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.glb", "preview-refine-2.glb"]
    live_models.clear(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.glb"]


def test_a_field_without_a_surface_writes_no_coarse_model(tmp_path):
    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def query(self, x, chunk_size=65536):
            return torch.zeros(x.shape[0]), torch.zeros(x.shape[0], 3)

        def albedo(self, x):
            return torch.zeros(x.shape[0], 3)

    assert live_models.LiveModels(tmp_path, grid_resolution=8, threshold=1.0).coarse_surface(Empty()) is None
    assert not list(tmp_path.iterdir())


def test_model_every_must_not_be_negative():
    config = tiny_run_config()
    config.refine.model_every = -1
    with pytest.raises(ValueError, match="refine.model_every"):
        config.check()

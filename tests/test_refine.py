import copy
import dataclasses

import numpy as np
import pytest
import torch

from geometry.level_set import LevelSetSettings, extract_mesh
from geometry.mesh_ops import is_watertight
from geometry.metrics import volumetric_iou
from guidance.primitive_shapes import primitive_mesh
from guidance.sds import SDSConfig
from helpers import quick_primitives_config
from stages import coarse, refine
from stages.common import Cancelled, StageError


class Blob(torch.nn.Module):
    """A synthetic coarse field: a rounded box or cylinder (superellipsoid of exponent p), one colour."""

    def __init__(self, radius=0.45, p=3.0, cylinder=False, color=(0.3, 0.5, 0.3), peak=100.0, softness=0.03):
        super().__init__()
        self.radius, self.p, self.cylinder, self.peak, self.softness = radius, p, cylinder, peak, softness
        self.color_logit = torch.nn.Parameter(torch.logit(torch.tensor(color)))

    def density(self, x):
        if self.cylinder:
            x = torch.stack([x[:, :2].norm(dim=-1), x[:, 2]], dim=-1)
        r = x.abs().pow(self.p).sum(-1).pow(1.0 / self.p)
        return self.peak * torch.sigmoid((self.radius - r) / self.softness)

    def albedo(self, x):
        return torch.sigmoid(self.color_logit).expand(x.shape[0], 3)

    def query(self, x, chunk_size=65536):
        with torch.no_grad():
            return self.density(x), self.albedo(x)


QUICK = quick_primitives_config()  # the quick preset as a run with the primitives prior gets it
CAMERA = QUICK.camera


@pytest.fixture
def prior(small_prior):
    return small_prior


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_refine_config(**changes):
    config = refine.RefineConfig(
        iters=4, batch_size=2, resolution=32, grid_resolution=16, preview_every=2, preview_views=2,
        preview_resolution=24, prob_albedo=0.0, prob_lambertian=1.0, prob_textureless=0.0,
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_config_check_names_the_field():
    refine.RefineConfig().check()
    for changes, name in [
        ({"iters": 0}, "refine.iters"), ({"grid_resolution": 2}, "refine.grid_resolution"),
        ({"threshold": -1.0}, "refine.threshold"), ({"deform_scale": 0.9}, "refine.deform_scale"),
        ({"lr_sdf": -1e-3}, "refine.lr_sdf"), ({"background": "black"}, "refine.background"),
        ({"background": (1.0, 2.0, 0.0)}, "refine.background"), ({"backend": "cuda"}, "refine.backend"),
        ({"ambient": 1.5}, "refine.ambient"), ({"sds": SDSConfig(t_min=0.6, t_max=0.5)}, "t_min"),
        ({"surface_opacity": 1.0}, "refine.surface_opacity"), ({"surface_opacity": 0.0}, "refine.surface_opacity"),
        ({"color_average_from": 1.5}, "refine.color_average_from"),
    ]:
        config = refine.RefineConfig(**changes)
        with pytest.raises(ValueError, match=name):
            config.check()


def test_the_texture_is_the_mean_of_the_colour_fields_last_steps(tiny_prior):
    """color_average_from=0.5 over 4 steps: the colour field handed on is the mean of its state after
    steps 3 and 4, which runs of 3 and 4 steps without averaging end at (same seed, same draws)."""
    def final_color(**changes):
        config = tiny_refine_config(preview_every=0, lr_color=0.05, lr_sdf=0.0, lr_deform=0.0, **changes)
        return torch.sigmoid(refine.run(Blob(), tiny_prior, "a green cube", config, CAMERA).color_field.color_logit)

    after3, after4 = final_color(iters=3), final_color(iters=4)
    averaged = final_color(iters=4, color_average_from=0.5)
    assert not torch.allclose(after3, after4)  # the colour moved in the last step
    expected = torch.sigmoid((torch.logit(after3) + torch.logit(after4)) / 2)  # the parameters are averaged
    torch.testing.assert_close(averaged, expected)


def test_the_texture_gets_its_own_guidance_scale(tiny_prior):
    """refine.sds.texture_guidance_scale routes the SDS gradient at that scale to the colour field
    only: the texture follows a run at the texture's scale, the surface a run without the setting."""
    def run(iters, lr_sdf, **sds):
        config = tiny_refine_config(iters=iters, preview_every=0, lr_color=0.05, lr_sdf=lr_sdf, lr_deform=lr_sdf,
                                    sds=SDSConfig(**sds))
        result = refine.run(Blob(), tiny_prior, "a green cube", config, CAMERA)
        return result.vertices, torch.sigmoid(result.color_field.color_logit)

    # A fixed surface, 3 steps: the texture is that of plain CFG at the texture's scale.
    _, split_color = run(3, 0.0, guidance_scale=10.0, texture_guidance_scale=2.0)
    _, texture_color = run(3, 0.0, guidance_scale=2.0)
    _, shape_color = run(3, 0.0, guidance_scale=10.0)
    torch.testing.assert_close(split_color, texture_color)
    assert not torch.allclose(split_color, shape_color, atol=1e-4)
    # The first step's surface update is the shape scale's (later ones see the other texture).
    split_verts, _ = run(1, 0.05, guidance_scale=10.0, texture_guidance_scale=2.0)
    shape_verts, _ = run(1, 0.05, guidance_scale=10.0)
    texture_verts, _ = run(1, 0.05, guidance_scale=2.0)
    torch.testing.assert_close(split_verts, shape_verts)
    assert not torch.allclose(split_verts, texture_verts, atol=1e-5)


def test_run_reports_progress_and_leaves_the_coarse_field_alone(tiny_prior):
    field = Blob(radius=0.4)
    before = copy.deepcopy(field.state_dict())
    events = []
    result = refine.run(field, tiny_prior, "a green cube", tiny_refine_config(), CAMERA, callback=events.append)

    assert [e.step for e in events] == [1, 2, 3, 4] and all(e.stage == "refine" and e.total == 4 for e in events)
    previews = [e.preview for e in events if e.preview is not None]
    assert len(previews) == 2 and len(result.previews) == 2
    assert previews[0].dtype == np.uint8 and previews[0].shape == (2 * 24, 48, 3)  # colour above normals
    assert previews[0][:24].min() < 200  # the object is in the picture, not just the white background
    assert set(refine.TIMING_PARTS) <= set(events[0].timings) and all(np.isfinite(e.loss) for e in events)

    assert is_watertight(result.faces) and not result.vertices.requires_grad
    assert result.stats["faces"] == result.faces.shape[0] > 100
    for part in ("marching", "rasterize", "shade", "guidance", "backward"):
        assert result.stats[part] > 0
    colors = result.color_field.albedo(result.vertices[:5])
    assert colors.shape == (5, 3) and bool(((colors >= 0) & (colors <= 1)).all())
    # The coarse field is untouched: the stage trained a copy of it.
    for key, value in field.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert any(not torch.equal(a, b) for a, b in zip(result.color_field.state_dict().values(), before.values()))


def test_previews_are_rendered_at_256_px_with_colour_and_normals(tiny_prior):
    """The mesh's preview: each view rendered at 256 px (not enlarged), its colour above its normals."""
    events = []
    config = tiny_refine_config(iters=1, preview_resolution=256)
    refine.run(Blob(radius=0.4, color=(0.8, 0.1, 0.1)), tiny_prior, "a red cube", config, CAMERA, callback=events.append)
    preview = events[-1].preview
    assert preview.shape == (2 * 256, 2 * 256, 3)
    colour, shape = preview[:256].astype(int), preview[256:].astype(int)
    on_object = (shape < 250).any(-1)
    assert 0.02 < on_object.mean() < 0.9, on_object.mean()
    assert (colour[on_object][:, 0] > colour[on_object][:, 2] + 30).mean() > 0.9  # the colour row is red
    assert len(np.unique(shape[on_object] // 32, axis=0)) >= 3  # the normals row shows the faces turning
    assert np.abs(colour - shape)[on_object].mean() > 20


def test_run_is_reproducible_and_can_be_cancelled(tiny_prior):
    config = tiny_refine_config(iters=3, preview_every=0)
    first = refine.run(Blob(), tiny_prior, "a green cube", config, CAMERA)
    second = refine.run(Blob(), tiny_prior, "a green cube", config, CAMERA)
    assert torch.equal(first.faces, second.faces)
    torch.testing.assert_close(first.vertices, second.vertices, rtol=0, atol=0)

    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="step 2"):
        refine.run(Blob(), tiny_prior, "a green cube", config, CAMERA, should_stop=stop)


class BrokenPrior:
    """The primitives prior with a noise prediction gone NaN."""

    def __init__(self, inner):
        self.inner = inner
        for name in ("space", "resolution", "alphas_cumprod", "default_guidance_scale", "view_dependent_uncond"):
            setattr(self, name, getattr(inner, name))

    def encode_prompt(self, texts):
        return self.inner.encode_prompt(texts)

    def predict_noise(self, x_t, t, cond):
        return torch.full_like(x_t, float("nan"))


def test_non_finite_guidance_is_a_stage_error(tiny_prior):
    with pytest.raises(StageError, match="refine stage failed at step 1") as err:
        refine.run(Blob(), BrokenPrior(tiny_prior), "a green cube", tiny_refine_config(max_nonfinite_steps=1), CAMERA)
    assert err.value.stage == "refine"
    with pytest.raises(StageError, match="no surface"):
        refine.run(Blob(peak=0.0), tiny_prior, "a green cube", tiny_refine_config(), CAMERA)


def level_set(config):  # the refine stage's starting surface: its grid and SDF smoothing
    return LevelSetSettings(config.grid_resolution, smoothing=config.sdf_smoothing)


def _iou(mesh, shape):
    return volumetric_iou(mesh, primitive_mesh(shape), resolution=64)


@pytest.mark.slow
def test_refine_moves_a_rounded_blob_toward_the_primitive(prior):
    # The coarse stage's typical mistake: a rounded, too large cylinder. Refinement sharpens and shrinks it.
    field = Blob(radius=0.45, p=3.0, cylinder=True, color=(0.95, 0.85, 0.10))
    config = refine.RefineConfig(
        iters=300, batch_size=4, resolution=64, grid_resolution=32, preview_every=0,
        prob_albedo=0.0, prob_lambertian=1.0, sds=QUICK.refine.sds,  # the guidance scale of a run with the prior
    )
    before = _iou(extract_mesh(field, level_set(config)), "cylinder")
    result = refine.run(field, prior, "a yellow cylinder", config, CAMERA)
    after = _iou((result.vertices, result.faces), "cylinder")
    assert is_watertight(result.faces)
    # Observed: 0.445 -> 0.503. With the light at the camera (the prior's default) the pull is slower than with the
    # light around it: at 150 steps 0.477 against 0.502.
    assert after > before + 0.04, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize(
    # At this 32 px / 32-cell size the quick refine settings sharpen the rough cube the coarse MLP at 1e-3 leaves
    # (0.693 -> 0.723). The cylinder starts near what a 32 px prior resolves: from any start the refine stage ends at 0.86-0.87
    # (0.875 -> 0.862 as the product runs, 0.870 without the elevation kernel, 0.873 on a 48-cell grid; 0.861 ->
    # 0.873 from a coarse stage with the kernel), so there it must keep the start, not wreck it. A rough
    # cylinder gains (test_refine_moves_a_rounded_blob_toward_the_primitive), and at the quick preset's own size
    # every shape gains (bench/HISTORY.md, ninth pass).
    "prompt, shape, may_lose",
    [("a green cube", "cube", 0.0), ("a yellow cylinder", "cylinder", 0.02)],
)
def test_coarse_then_refine_recovers_the_primitive(prior, prompt, shape, may_lose):
    quick = quick_primitives_config(coarse_iters=400, resolution=32)
    # A rough start, as the check was written for: the coarse MLP at 1e-3, not the prior's 1e-2.
    quick.coarse.lr_network = coarse.CoarseConfig().filled().lr_network
    camera = quick.camera
    field = coarse.run(prior, prompt, quick.coarse, camera).field
    # The quick preset's refine stage as a run with the prior gets it (300 steps, lr_sdf 0.05, regularizers
    # x 0.1, no pose jitter), on a 32-cell grid.
    config = dataclasses.replace(quick.refine, batch_size=4, grid_resolution=32, preview_every=0)
    before = _iou(extract_mesh(field, level_set(config)), shape)
    result = refine.run(field, prior, prompt, config, camera)
    after = _iou((result.vertices, result.faces), shape)
    print(f"{prompt}: IoU before refinement {before:.3f}, after {after:.3f}, {result.stats['faces']} faces")
    assert is_watertight(result.faces)
    assert after >= 0.7, (before, after)
    assert after > before - may_lose, (before, after)

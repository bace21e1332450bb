"""Plain helpers the tests share (no fixtures: those are in conftest.py): tiny run settings,
guidance wrappers and test servers. Test modules import from here, never from each other."""
import contextlib
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# A whole run in seconds: the settings of `tiny_run_config`, as `--set` values (the app's servers).
TINY_SETTINGS = [
    "prior.resolution=16", "prior.renders_per_view=4", "coarse.iters=4", "coarse.resolution=16",
    "coarse.preview_every=2", "coarse.preview_views=2", "coarse.preview_resolution=16", "coarse.volume.num_samples=16",
    "refine.iters=3", "refine.batch_size=1", "refine.resolution=16", "refine.grid_resolution=16",
    "refine.preview_every=2", "refine.preview_views=2", "refine.preview_resolution=16",
    "export.texture_size=64", "export.turntable_frames=4", "export.turntable_resolution=64",
]


def quick_primitives_config(coarse_iters: int = 400, resolution: int = 32, prompt: str | None = None):
    """The `quick` preset as a run with the primitives prior gets it (for `prompt`), its coarse stage cut to test size."""
    from guidance import registry
    from stages.config import preset

    config = preset("quick")
    registry.get("primitives").adapt(config, prompt)
    config.coarse.iters, config.coarse.resolution, config.coarse.preview_every = coarse_iters, resolution, 0
    return config


def tiny_run_config(**changes):
    """A whole-pipeline Config small enough to run end to end in seconds on a CPU (TINY_SETTINGS, primitives, CPU)."""
    from stages.config import apply_overrides, preset

    config = apply_overrides(preset("quick"), TINY_SETTINGS)
    config.guidance, config.device = "primitives", "cpu"
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# The command line's tiny settings: a whole run in seconds (test_cli, test_batch_ray).
TINY_CLI_SETTINGS = [
    "--set", "prior.resolution=16", "--set", "prior.renders_per_view=4",
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_app(out: Path, extra_args=(), extra_env=None):
    """The app served on a free 127.0.0.1 port with the TINY_SETTINGS: (gradio_client Client, process)."""
    port = free_port()
    env = dict(os.environ, DREAMLIFT_OUTPUT_DIR=str(out), GRADIO_ANALYTICS_ENABLED="False", **(extra_env or {}))
    args = [sys.executable, "app.py", "--port", str(port), "--queue-size", "4", *extra_args]
    for item in TINY_SETTINGS:
        args += ["--set", item]
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((out / "server.log").read_text())
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("the app did not start in 120 s: " + (out / "server.log").read_text())
    from gradio_client import Client

    try:
        yield Client(url, verbose=False), proc
    finally:
        stop_server(proc)
        log.close()


class NaNGuidance:
    """A real guidance model whose noise predictions are NaN (always, or while `on["nan"]` is set)."""

    def __init__(self, inner, on: dict | None = None):
        self.inner, self.on = inner, on

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def with_background(self, level):  # the coarse stage's grey levels: the copy for a level is NaN as well
        inner = self.inner.with_background(level) if hasattr(self.inner, "with_background") else self.inner
        return type(self)(inner, self.on)

    def predict_noise(self, x_t, t, cond, **kwargs):
        eps = self.inner.predict_noise(x_t, t, cond, **kwargs)
        return torch.full_like(eps, float("nan")) if self.on is None or self.on["nan"] else eps


def run_dir_from_status(status: str, root: Path) -> Path:
    """The run folder under `root` whose id ends the final status line '**Done** in 3 s · run `ID`'."""
    assert "Done" in status, status
    return root / status.split("`")[-2]


class FakeGuidance:
    """eps(x_t, t, c) = 0.3 x_t + c (1 + t / T), c a per-text vector broadcast over pixels.

    Pixel space, or latent space with a fixed linear encoder (3 -> 4 channels, 2x2 average).
    Records every text it embeds and the batch size of every model call; its predictions are NaN
    with `nan`, or from its `nan_at`-th call on.
    """

    default_guidance_scale = 10.0

    def __init__(self, space="pixel", resolution=8, view_dependent_uncond=False, vectors=None, nan=False,
                 nan_at: int | None = None):
        self.space = space
        self.resolution = resolution
        self.view_dependent_uncond = view_dependent_uncond
        self.channels = 4 if space == "latent" else 3
        self.alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000), dim=0)  # [T]
        self.vectors = dict(vectors or {})
        self.nan, self.nan_at = nan, nan_at
        self.encoded, self.calls, self.released = [], [], False
        self.encoder = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
        self.latents = None

    def vector(self, text: str) -> torch.Tensor:  # [channels]
        if text in self.vectors:
            return self.vectors[text]
        return torch.randn(self.channels, generator=torch.Generator().manual_seed(zlib.crc32(text.encode())))

    def encode_prompt(self, texts):
        self.encoded.extend(texts)
        return torch.stack([self.vector(text) for text in texts])

    def eps(self, x_t, t, cond):  # the closed form, for the tests' expectations too
        return 0.3 * x_t + cond.view(-1, self.channels, 1, 1) * (1.0 + t.view(-1, 1, 1, 1) / 1000.0)

    def predict_noise(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        out = self.eps(x_t, t, cond)
        nan = self.nan or (self.nan_at is not None and len(self.calls) >= self.nan_at)
        return out * float("nan") if nan else out

    def encode_images(self, images):  # [B, 3, H, W] -> [B, 4, H/2, W/2]
        latents = torch.nn.functional.avg_pool2d(torch.einsum("oc,bchw->bohw", self.encoder, images), 2)
        latents.retain_grad()
        self.latents = latents
        return latents

"""What the speed benchmarks wrap around a stage: the seconds spent inside the guidance model (and its
VAE, forward and backward), and the peak memory of a block (bench/speed.py, bench/gpu_check.py)."""
from __future__ import annotations

import threading
import time

import torch

from stages.common import release_free_memory


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class TimedGuidance:
    """A guidance model whose network calls add up their seconds: `seconds` in all, `vae_seconds`
    of them in encode_images (latent models), and `vae_backward_seconds`: the encoder's backward
    pass, which runs inside the stage's backward (from the gradient reaching the latents to it
    reaching the images)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.seconds, self.vae_seconds = model, device, 0.0, 0.0
        self.vae_backward_seconds = 0.0

    def __getattr__(self, name):  # everything else: the wrapped model's
        return getattr(self.model, name)

    def predict_noise(self, x_t, t, cond, **kwargs):  # kwargs: the cameras' elevations, for a model that takes them
        start = _now(self.device)
        out = self.model.predict_noise(x_t, t, cond, **kwargs)
        self.seconds += _now(self.device) - start
        return out

    def encode_images(self, images):
        start = _now(self.device)
        out = self.model.encode_images(images)
        spent = _now(self.device) - start
        self.seconds += spent
        self.vae_seconds += spent
        if torch.is_grad_enabled() and images.requires_grad and out.requires_grad:
            self._time_backward(images, out)
        return out

    def _time_backward(self, images, latents) -> None:
        started = []  # when the gradient reached the latents (a stack: a retained graph may run twice)

        def reached_latents(grad):
            started.append(_now(self.device))
            return grad

        def reached_images(grad):
            if started:
                self.vae_backward_seconds += _now(self.device) - started.pop()
            return grad

        latents.register_hook(reached_latents)
        images.register_hook(reached_images)


class PeakMemory:
    """Peak memory of a block, in MB: `mb` above the level at start, `absolute_mb` in all (weights,
    activations), and on CUDA `reserved_mb`, the caching allocator's peak (what the card must hold).
    CUDA allocations, or the process RSS sampled in a thread."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.peak = 0
        self.reserved = None  # bytes, CUDA only
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            release_free_memory(self.device)  # the previous block's cached blocks do not count toward this one
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            import psutil

            release_free_memory()
            self._process = psutil.Process()
            self.base = self.peak = self._process.memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20

    @property
    def absolute_mb(self) -> float:
        return self.peak / 2**20

    @property
    def reserved_mb(self) -> float | None:
        return None if self.reserved is None else self.reserved / 2**20

    def as_dict(self) -> dict:
        return {"peak_memory_mb": self.mb, "peak_absolute_mb": self.absolute_mb, "peak_reserved_mb": self.reserved_mb}

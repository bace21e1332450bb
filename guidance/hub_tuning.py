"""What the text-to-image models from the hub (Stable Diffusion, DeepFloyd IF) share as guidance models: the
run settings they tune, the settings they are built from, and the app's free-form example prompts."""
from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLES_FILE", "adapt_to_hub_model", "file_examples", "hub_settings"]

EXAMPLES_FILE = Path(__file__).resolve().parents[1] / "examples" / "prompts.txt"  # free-form example prompts


def adapt_to_hub_model(config, prompt: str | None = None) -> None:
    """Text-to-image models see real backgrounds: the coarse stage learns one, the refine stage draws random ones
    (unless the config chose a colour or mode of its own)."""
    if config.coarse.background is None:
        config.coarse.background = "learned"
    if config.refine.background is None:
        config.refine.background = "random"


def hub_settings(config) -> dict:
    from guidance.hub import model_dtype

    dtype = model_dtype(getattr(config, "model_dtype", "auto"))  # None ("auto"): fp16 on CUDA, fp32 elsewhere
    return {**({"model_id": config.model_id} if config.model_id else {}), **({"dtype": dtype} if dtype else {})}


def file_examples() -> list[str]:
    lines = [ln.strip() for ln in EXAMPLES_FILE.read_text().splitlines() if ln.strip()] if EXAMPLES_FILE.exists() else []
    return lines or ["a ceramic teapot", "a wooden chair"]

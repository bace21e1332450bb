"""The page's examples: a clicked example fills the prompt and, where the guidance model has one, shows its
ready-made result at once (`examples.ready`); their run times are the wait estimate before any run."""
from __future__ import annotations

import gradio as gr

from app_queue import as_text, duration
from app_support import enlarge
from examples import ready
from guidance import registry

__all__ = ["example_prompts", "example_seconds", "show_example"]


def example_prompts(guidance: str) -> list[str]:
    return registry.get(guidance).examples()


def example_seconds(guidance: str) -> list[float]:
    """The run times of the ready-made examples of a guidance model."""
    found = (ready.load(p, guidance) for p in example_prompts(guidance))
    return [r["facts"].get("seconds") for r in found if r is not None]


def read_image(path: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def show_example(sample, guidance: str):
    """An example clicked: its prompt, and its ready-made result at once when there is one for `guidance`, as
    (prompt, gallery, status, model, files, latest preview, run id, Generate button, turntable)."""
    prompt = sample[0] if isinstance(sample, (list, tuple)) else sample
    found = ready.load(prompt, guidance)
    if found is None:  # no ready-made result for this guidance model: fill the prompt only
        return (prompt,) + (gr.skip(),) * 8
    facts = found["facts"]
    status = (f"**Ready-made result** of “{as_text(prompt)}”: made by this product's {facts.get('preset')} preset, "
              f"seed {facts.get('seed')}, in {duration(facts.get('seconds') or 0)} on {facts.get('device')} "
              f"(commit `{str(facts.get('commit'))[:7]}`). Press **Generate** to run it live.")
    files = [found[k] for k in ("zip", "glb") if k in found]
    gallery = [(found["preview"], "the run's last preview")] + (
        [(found["strip"], "turntable frames")] if "strip" in found else [])
    return (prompt, gallery, status, found["glb"], files, enlarge(read_image(found["preview"])), "",
            gr.update(value="Generate", interactive=True), found["turntable"])

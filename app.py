"""Gradio app: a prompt in, staged previews while it trains, a 3D viewer and downloads at the end.

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 8080 --queue-size 8 --keep-runs 20 --max-output-gb 5

All training happens in `stages.pipeline.generate`; this file only wires the UI to it.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import gradio as gr
import torch

from stages.config import GUIDANCE_CHOICES, MAX_SEED, PRESETS, STAGES, apply_overrides, preset
from stages.runs import prune_runs

OUTPUT_ROOT = Path(os.environ.get("DREAMLIFT_OUTPUT_DIR", "outputs")).resolve()  # every run's folder is made here
KEEP_RUNS = int(os.environ.get("DREAMLIFT_KEEP_RUNS", "20"))  # finished runs kept under OUTPUT_ROOT (oldest pruned)
MAX_OUTPUT_BYTES = int(os.environ.get("DREAMLIFT_MAX_OUTPUT_BYTES", "0"))  # bytes the earlier runs may take; 0 = no bound
SERVED_FILE_AGE = 24 * 3600  # seconds Gradio keeps its served copies of results (previews, GLB, zip) before deleting them
CLOSE_WAIT = 1.0  # seconds a cancel waits for the worker in Gradio's event loop (the next run waits for the device)
MAX_GALLERY = 24  # previews kept in the gallery (the latest ones)
GPU_SECONDS = 1500  # budget asked of a Hugging Face ZeroGPU Space per generation
SERVER_OVERRIDES: list[str] = []  # "--set key=value" given to the server, applied to every run

try:  # a no-op outside Hugging Face Spaces
    import spaces

    gpu = spaces.GPU(duration=GPU_SECONDS)
except Exception:  # pragma: no cover - spaces missing or broken: run without it
    def gpu(fn):
        return fn

ADVANCED_LIMITS = {  # name: (low, high) accepted from the UI and the API; 0 (or None) = the preset's value
    "coarse_iters": (0, 20000),
    "refine_iters": (0, 20000),
    "texture_size": (0, 4096),
}


def active_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_guidance() -> str:
    return "stable-diffusion" if active_device() == "cuda" else "primitives"


def example_prompts() -> list[str]:
    if default_guidance() == "primitives":
        return ["a red sphere", "a green cube", "a blue torus", "a yellow cylinder", "an orange cone", "a purple capsule"]
    path = Path(__file__).parent / "examples" / "prompts.txt"
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return lines or ["a ceramic teapot", "a wooden chair"]


def _int_setting(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or value is None:
        raise gr.Error(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise gr.Error(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise gr.Error(f"{name} must be an integer in [{low}, {high}], got {value!r}") from None
    if not isinstance(value, int) or not low <= value <= high:
        raise gr.Error(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def build_config(prompt, preset_name, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after):
    """Validate the UI/API inputs (gr.Error on anything wrong) and build the run's Config."""
    from stages.pipeline import PromptError, check_inputs, check_prompt

    try:
        check_prompt(prompt)
    except PromptError as exc:
        raise gr.Error(str(exc)) from None
    if preset_name not in PRESETS:
        raise gr.Error(f"preset must be one of {list(PRESETS)}, got {preset_name!r}")
    if guidance not in GUIDANCE_CHOICES:
        raise gr.Error(f"guidance must be one of {list(GUIDANCE_CHOICES)}, got {guidance!r}")
    if stop_after not in STAGES:
        raise gr.Error(f"stop_after must be one of {list(STAGES)}, got {stop_after!r}")
    config = apply_overrides(preset(preset_name), SERVER_OVERRIDES)
    config.seed = _int_setting("seed", seed, 0, MAX_SEED)
    config.guidance = guidance
    config.stop_after = stop_after
    advanced = {"coarse_iters": coarse_iters, "refine_iters": refine_iters, "texture_size": texture_size}
    for name, value in advanced.items():
        advanced[name] = 0 if value is None else _int_setting(name, value, *ADVANCED_LIMITS[name])
    if advanced["coarse_iters"]:
        config.coarse.iters = advanced["coarse_iters"]
    if advanced["refine_iters"]:
        config.refine.iters = advanced["refine_iters"]
    if advanced["texture_size"]:
        if advanced["texture_size"] < 64:
            raise gr.Error(f"texture_size must be 0 (the preset's) or in [64, 4096], got {advanced['texture_size']}")
        config.export.texture_size = advanced["texture_size"]
    try:
        check_inputs(prompt, config)  # the config, the device, and the prompt against the prior's vocabulary
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    return config


def check_queue_room(demo: gr.Blocks) -> None:
    """gr.Error when the queue is full: the browser would only say "busy" (the API client says "Queue is full")."""
    queue = getattr(demo, "_queue", None)  # Gradio's queue; a private attribute, so the check is skipped if it moves
    bound = getattr(queue, "max_size", None)
    if not isinstance(bound, int):
        return
    waiting = len(queue)
    if waiting >= bound:
        raise gr.Error(f"The queue is full: {waiting} runs are waiting (the limit is {bound}). Please try again in a few minutes.")


def _status(event) -> str:
    if event.stage == "done":
        return f"**Done** in {event.elapsed:.0f} s · {event.run_dir}"
    if event.stage == "setup" or not event.total:
        return f"**{event.stage}** · {event.message}"
    eta = f" · about {event.stage_eta:.0f} s left in this stage" if event.stage_eta is not None else ""
    loss = f" · loss {event.loss:.4g}" if event.loss is not None else ""
    return f"**{event.stage}** step {event.step}/{event.total}{loss}{eta} · {event.elapsed:.0f} s elapsed"


@gpu
def generate(
    prompt: str,
    preset: str = "quick",
    seed: int = 0,
    guidance: str = "auto",
    coarse_iters: int | None = None,
    refine_iters: int | None = None,
    texture_size: int | None = None,
    stop_after: str = "export",
    progress=gr.Progress(),
):
    """Stream (gallery, status, model, files) while the pipeline runs."""
    from stages.common import Cancelled
    from stages.pipeline import generate as run_pipeline

    config = build_config(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after)
    prune_runs(OUTPUT_ROOT, keep=max(KEEP_RUNS - 1, 0), max_bytes=MAX_OUTPUT_BYTES or None)
    gallery: list = []
    last_yield = 0.0
    # Gradio closes this generator on Cancel (or a lost client); closing `events` stops the worker.
    events = run_pipeline(prompt, config, out_root=OUTPUT_ROOT, close_wait=CLOSE_WAIT)
    try:
        for event in events:
            if event.total:
                progress(event.step / event.total, desc=f"{event.stage} {event.step}/{event.total}")
            if event.preview is not None:
                gallery.append((event.preview, f"{event.stage} step {event.step}"))
                gallery = gallery[-MAX_GALLERY:]
            if event.stage == "done":
                paths = event.paths or {}
                files = [paths[k] for k in ("zip", "glb", "obj", "turntable") if k in paths]
                yield gallery, _status(event), paths.get("glb"), files
                return
            now = time.monotonic()
            if event.preview is not None or now - last_yield > 1.0:
                last_yield = now
                yield gallery, _status(event), None, None
    except Cancelled:
        raise gr.Error("The run was cancelled.") from None
    except gr.Error:
        raise
    except Exception as exc:  # a readable message, never a traceback
        raise gr.Error(" ".join(str(exc).split()) or type(exc).__name__) from None
    finally:
        events.close()


def build_demo(queue_size: int = 8, overrides: list[str] | None = None) -> gr.Blocks:
    """The UI. `overrides` ("coarse.iters=300", ...) apply to every run (checked here, at start)."""
    SERVER_OVERRIDES[:] = list(overrides or [])
    apply_overrides(preset("quick"), SERVER_OVERRIDES)  # fail at start on a bad override
    device, guidance = active_device(), default_guidance()
    with gr.Blocks(title="DreamLift: text to 3D", delete_cache=(3600, SERVED_FILE_AGE)) as demo:
        gr.Markdown(
            "# DreamLift\nType a prompt, get a textured 3D model (Score Distillation Sampling into a NeRF, "
            "then a DMTet mesh). "
            f"Active guidance: **{guidance}** on **{device}**"
            + (" (offline primitives prior: prompts like 'a red cube', 'a blue torus')." if guidance == "primitives" else ".")
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder=example_prompts()[0], max_lines=1)
                with gr.Row():
                    preset_in = gr.Dropdown(list(PRESETS), value="quick" if device == "cpu" else "standard", label="Preset")
                    # A text box, so that a bad seed sent to the API gets our message that names it.
                    seed = gr.Textbox(value="0", label=f"Seed (0 to {MAX_SEED})", max_lines=1)
                guidance_in = gr.Dropdown(list(GUIDANCE_CHOICES), value="auto", label="Guidance model")
                with gr.Accordion("Advanced settings", open=False):
                    coarse_iters = gr.Slider(*ADVANCED_LIMITS["coarse_iters"], value=0, step=1, label="Coarse steps (0 = the preset's)")
                    refine_iters = gr.Slider(*ADVANCED_LIMITS["refine_iters"], value=0, step=1, label="Refine steps (0 = the preset's)")
                    texture_size = gr.Slider(*ADVANCED_LIMITS["texture_size"], value=0, step=64, label="Texture size, px (0 = the preset's)")
                    stop_after = gr.Dropdown(list(STAGES), value="export", label="Stop after")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary")
                    cancel_btn = gr.Button("Cancel")
                gr.Examples(example_prompts(), inputs=[prompt])
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.")
                gallery = gr.Gallery(
                    label="Previews (coarse NeRF, then refined mesh)", columns=2, height=320, object_fit="contain"
                )
                # Gradio 6.31's Model3D does not mount its 3D canvas when a streaming (generator) event
                # sets it, so /generate fills a hidden one and a plain follow-up event shows it.
                model = gr.Model3D(label="Model (GLB)", visible=False)
                viewer = gr.Model3D(label="Model (GLB)", height=380, clear_color=(1.0, 1.0, 1.0, 1.0))
                files = gr.File(label="Downloads: model.zip (OBJ + MTL + PNG), model.glb", file_count="multiple")
        inputs = [prompt, preset_in, seed, guidance_in, coarse_iters, refine_iters, texture_size, stop_after]

        def precheck(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after):
            """Answer bad input and a full queue at once, before the run waits in the queue."""
            build_config(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after)
            check_queue_room(demo)

        # The check runs unqueued; API clients call /generate directly (which checks again, and
        # whose "Queue is full" comes from Gradio).
        event = run_btn.click(precheck, inputs=inputs, queue=False, api_name="precheck", api_visibility="undocumented")
        event = event.success(
            generate,
            inputs=inputs,
            outputs=[gallery, status, model, files],
            api_name="generate",
            concurrency_limit=1,
        )
        event.success(lambda path: path, inputs=[model], outputs=[viewer], queue=False, api_visibility="undocumented")
        cancel_btn.click(lambda: "Cancelled.", outputs=[status], cancels=[event], queue=False)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def main(argv=None) -> None:
    global KEEP_RUNS, MAX_OUTPUT_BYTES
    parser = argparse.ArgumentParser(description="DreamLift web app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--queue-size", type=int, default=8, help="waiting runs beyond which new ones are refused")
    parser.add_argument("--keep-runs", type=int, default=KEEP_RUNS, help="finished runs kept under the output folder")
    parser.add_argument("--max-output-gb", type=float, default=MAX_OUTPUT_BYTES / 1e9,
                        help="disk the earlier runs may take, GB (oldest pruned first); 0 = no bound")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run, e.g. coarse.iters=300 (repeatable)")
    args = parser.parse_args(argv)
    if args.keep_runs < 1 or args.max_output_gb < 0 or args.queue_size < 1:
        parser.error(f"--keep-runs and --queue-size must be >= 1 and --max-output-gb >= 0, got {args.keep_runs}, "
                     f"{args.queue_size}, {args.max_output_gb}")
    KEEP_RUNS, MAX_OUTPUT_BYTES = args.keep_runs, int(args.max_output_gb * 1e9)
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    demo = build_demo(args.queue_size, args.overrides)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(OUTPUT_ROOT)], show_error=True)


if __name__ == "__main__":
    main()

"""The page's layout: the inputs on the left, the run's status, previews, viewer and downloads on the right.

`build_page` only makes the components (inside the caller's `gr.Blocks`); `app.build_demo` wires their events.
The element ids and labels are what the browser tests and the API's callers find the page by.
"""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from guidance import registry
from stages.config import MAX_SEED, STAGES

__all__ = ["CSS", "URL_JS", "Page", "build_page"]

CSS = "#downloads .label-clear-button { display: none; }"  # downloads are results: no remove buttons
URL_JS = """(id) => {  // the run id in the address bar, so that a reload finds the run
    const url = new URL(window.location.href);
    if (id) { url.searchParams.set("run", id); } else { url.searchParams.delete("run"); }
    window.history.replaceState(null, "", url);
    return [];
}"""


@dataclass
class Page:
    """The page's components."""

    prompt: gr.Textbox
    preset: gr.Dropdown
    seed: gr.Textbox
    guidance: gr.Dropdown
    model_id: gr.Textbox
    coarse_iters: gr.Slider
    refine_iters: gr.Slider
    texture_size: gr.Slider
    stop_after: gr.Dropdown
    run_btn: gr.Button
    cancel_btn: gr.Button
    examples: gr.Dataset
    server: gr.Markdown  # the device's state and this server's recent runs
    status: gr.Markdown
    run_id: gr.Textbox  # the run this page shows, mirrored in ?run=
    latest: gr.Image
    model: gr.Model3D  # hidden: the runs set it, its changes fill the viewer
    viewer: gr.Model3D
    files: gr.File
    turntable: gr.Video
    gallery: gr.Gallery

    @property
    def inputs(self) -> list:
        """A run's fields, in the order of `app.generate`'s parameters."""
        return [self.prompt, self.preset, self.seed, self.guidance, self.coarse_iters, self.refine_iters,
                self.texture_size, self.stop_after, self.model_id]

    @property
    def outputs(self) -> list:
        """What a run's view updates, in the order of `app.view`'s tuple."""
        return [self.gallery, self.status, self.model, self.files, self.latest, self.run_id, self.run_btn,
                self.turntable]


def build_page(
    guidance: str,  # the active guidance model
    device: str,  # the server's device type
    presets: list,  # the preset menu's choices
    preset_value: str,  # the preset chosen at first
    preset_note: str | None,  # the preset menu's info line
    model_id_note: str,  # the model id box's placeholder
    prompts: list[str],  # the example prompts
    has_ready: bool,  # whether some example has a ready-made result
    limits: dict[str, tuple[int, int]],  # the advanced sliders' (low, high)
) -> Page:
    """The page's components, made inside the current gr.Blocks."""
    gr.Markdown(
        "# DreamLift\nType a prompt, get a textured 3D model (Score Distillation Sampling into a NeRF, "
        "then a DMTet mesh). "
        f"Active guidance: **{guidance}** on **{device}**{registry.get(guidance).app_note}."
    )
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", placeholder=prompts[0], max_lines=1, elem_id="prompt")
            with gr.Row():
                preset_in = gr.Dropdown(presets, value=preset_value, label="Preset", elem_id="preset", info=preset_note)
                # A text box, so that a bad seed sent to the API gets our message that names it.
                seed = gr.Textbox(value="0", label=f"Seed (0 to {MAX_SEED})", max_lines=1, elem_id="seed")
            guidance_in = gr.Dropdown(list(registry.choices()), value=registry.AUTO, label="Guidance model")
            with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                model_id = gr.Textbox(label="Model id (hub id or local folder, for stable-diffusion and deepfloyd-if)",
                                      placeholder=model_id_note, max_lines=1)
                coarse_iters = gr.Slider(*limits["coarse_iters"], value=0, step=1, label="Coarse steps (0 = the preset's)",
                                         elem_id="coarse-steps")
                refine_iters = gr.Slider(*limits["refine_iters"], value=0, step=1, label="Refine steps (0 = the preset's)")
                texture_size = gr.Slider(*limits["texture_size"], value=0, step=64,
                                         label="Texture size, px (0 = the preset's)")
                stop_after = gr.Dropdown(list(STAGES), value="export", label="Stop after")
            with gr.Row():
                run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel_btn = gr.Button("Cancel", elem_id="cancel")
            examples = gr.Dataset(
                components=[prompt], samples=[[p] for p in prompts], elem_id="examples",
                label="Examples: click one to see its ready-made result at once; Generate runs it live" if has_ready
                else "Examples")
            server = gr.Markdown("", elem_id="server")
        with gr.Column(scale=2):
            status = gr.Markdown("Ready.", elem_id="status")
            run_id = gr.Textbox(visible="hidden", elem_id="run-id")
            latest = gr.Image(label="Latest preview (colour above normals)", height=460, interactive=False,
                              elem_id="latest-preview")
            # Gradio 6.31's Model3D does not mount its 3D canvas when a streaming (generator) event
            # sets it, so the runs fill a hidden one and a plain event shows it: on each change (the
            # intermediate models while it trains) and after the run. Hidden but mounted ("hidden", not
            # False): an unmounted one fired its .change for the first model only (checked in Chromium).
            model = gr.Model3D(label="Model (GLB)", visible="hidden")
            viewer = gr.Model3D(label="Model (GLB)", height=380, clear_color=(1.0, 1.0, 1.0, 1.0), elem_id="viewer")
            files = gr.File(label="Downloads: model.zip (OBJ + MTL + PNG), model.glb", file_count="multiple",
                            interactive=False, elem_id="downloads")
            turntable = gr.Video(label="Turntable (turntable.mp4)", height=300, interactive=False, autoplay=True,
                                 loop=True, elem_id="turntable")
            gallery = gr.Gallery(label="Earlier previews (newest first)", columns=3, height=240, object_fit="contain")
    return Page(prompt, preset_in, seed, guidance_in, model_id, coarse_iters, refine_iters, texture_size, stop_after,
                run_btn, cancel_btn, examples, server, status, run_id, latest, model, viewer, files, turntable, gallery)

"""Gradio app: a prompt in, staged previews while it trains, a 3D viewer and downloads at the end.

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 8080 --queue-size 8 --keep-runs 20 --max-output-gb 5
    python app.py --model-id stable-diffusion-v1-5/stable-diffusion-v1-5   # or env DREAMLIFT_MODEL_ID
    python app.py --model-id stable-diffusion=/models/sd15 --model-id deepfloyd-if=/models/if   # one per family

All training happens in `stages.pipeline.generate`; this file only wires the UI to it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import gradio as gr
import torch

from guidance import registry
from stages.config import MAX_SEED, PRESETS, STAGES, apply_overrides, preset
from app_gpu import hosted_events, on_zerogpu
from app_support import RunJob, Runs, Snapshot, check_model_id, enlarge, int_setting, wait_until, web_message
from stages.gpu_budget import GPU_PRESETS, ZEROGPU_CALL_CAP, ZEROGPU_PRESET, check_fits, preset_label
from stages.plan import resolve_device
from stages.runs import new_run_dir, prune_runs
from app_queue import Cached, Line, as_text, duration, is_device_state, recent_runs, run_prompt, typical_seconds
from app_warmup import Warmup
from examples import ready

OUTPUT_ROOT = Path(os.environ.get("DREAMLIFT_OUTPUT_DIR", "outputs")).resolve()  # every run's folder is made here
KEEP_RUNS = int(os.environ.get("DREAMLIFT_KEEP_RUNS", "20"))  # finished runs kept under OUTPUT_ROOT (oldest pruned)
MAX_OUTPUT_BYTES = int(os.environ.get("DREAMLIFT_MAX_OUTPUT_BYTES", "0"))  # bytes the earlier runs may take; 0 = no bound
MODEL_IDS: dict[str, str] = {}  # guidance family -> the server's default hub id / folder for it (none = the model's own)
SERVED_FILE_AGE = 24 * 3600  # seconds Gradio keeps its served copies of results (previews, GLB, zip) before deleting them
CLOSE_WAIT = 1.0  # seconds a cancel waits for the worker in Gradio's event loop (the next run waits for the device)
CANCEL_WAIT = 10.0  # seconds the Cancel button waits for the run to stop (it stops within a step)
SERVER_OVERRIDES: list[str] = []  # "--set key=value" given to the server, applied to every run
RUNS = Runs()  # the runs of this server, by run id: a reloaded page finds its run here
DEMO: dict = {}  # "blocks": the served gr.Blocks, whose queue tells a cancel from a page that went away
LINE = Line(RUNS, queue_size=8)  # the runs in line for the device; its bound is --queue-size
WARMUP = Warmup()  # the primitives prior's libraries, loaded in the background at start
PROMPTS: dict[str, str] = {}  # run id -> prompt, for the runs this server started
QUEUED: dict[str, float] = {}  # session -> when its run joined the queue, until the run starts
TICK_SECONDS = 3.0  # how often a page refreshes its place in line, the device's state and the recent runs

ADVANCED_LIMITS = {  # name: (low, high) accepted from the UI and the API; 0 (or None) = the preset's value
    "coarse_iters": (0, 20000),
    "refine_iters": (0, 20000),
    "texture_size": (0, 4096),
}


def active_device() -> str:
    return resolve_device("auto").type


def default_guidance() -> str:
    return registry.resolve_name(registry.AUTO, torch.device(active_device()))


def preset_choices(guidance: str) -> list:
    """The preset menu: GPU presets marked; on ZeroGPU each with its projected GPU time (and whether it fits)."""
    if on_zerogpu():
        return [(preset_label(name, guidance), name) if name in GPU_PRESETS else name for name in PRESETS]
    return [(f"{name} (GPU)" if name in GPU_PRESETS else name, name) for name in PRESETS]


def preset_info(device: str) -> str | None:
    if on_zerogpu():
        return f"GPU time of a run here; one GPU call may last {ZEROGPU_CALL_CAP} s"
    return "fast, standard and high need a GPU" if device == "cpu" else None


def example_prompts() -> list[str]:
    return registry.get(default_guidance()).examples()


def server_model_ids(values: list[str], overrides: list[str], env: str | None = None) -> tuple[dict[str, str], list[str]]:
    """The server's model id per family from `--model-id [FAMILY=]ID` values, a `--set model_id=...` (obeyed as
    one, not left for each run to overwrite) and DREAMLIFT_MODEL_ID; and the other overrides. A bare id is for
    stable-diffusion. ValueError names a bad value or a family that takes no model id."""
    model_ids = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "model_id" and "=" in o]
    rest = [o for o in overrides if o.split("=", 1)[0].strip() != "model_id"]
    ids = {}
    for value in ([env] if env and env.strip() else []) + list(values) + model_ids:
        family, sep, model_id = value.partition("=")
        if not sep or family.strip() not in registry.names():
            family, model_id = "stable-diffusion", value  # a bare id (a hub id or a path may hold "=")
        family, model_id = family.strip(), model_id.strip()
        if not registry.get(family).takes_model_id:
            with_ids = ", ".join(n for n in registry.names() if registry.get(n).takes_model_id)
            raise ValueError(f"--model-id: {family} has no weights, so it takes no model id (families with one: {with_ids})")
        if not model_id or len(model_id) > 300 or any(ord(c) < 32 for c in model_id):
            raise ValueError(f"--model-id expects [FAMILY=]ID with a one-line id, got {value!r}")
        ids[family] = model_id
    return ids, rest


def model_id_placeholder() -> str:
    if not MODEL_IDS:
        return "empty = the guidance model's default"
    return "empty = this server's: " + ", ".join(f"{family} {model_id}" for family, model_id in MODEL_IDS.items())


def default_preset() -> str:
    if on_zerogpu():
        return ZEROGPU_PRESET
    return "quick" if active_device() == "cpu" else "standard"


def example_seconds() -> list[float]:
    """The run times of the ready-made examples of the active guidance model (the wait estimate before any run)."""
    found = (ready.load(p, default_guidance()) for p in example_prompts())
    return [r["facts"].get("seconds") for r in found if r is not None]


TYPICAL = Cached(lambda: typical_seconds(OUTPUT_ROOT, default_preset(), example_seconds()))
LINE.typical = TYPICAL


def build_plan(prompt, preset_name, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id=None):
    """Validate the UI/API inputs (gr.Error naming what to change) and resolve the run's plan, once."""
    from stages.plan import check_prompt, resolve, resolve_guidance

    try:
        config = apply_overrides(preset(preset_name), SERVER_OVERRIDES)  # preset() names a bad preset
        if preset_name in GPU_PRESETS and resolve_device(config.device).type == "cpu" and not on_zerogpu():
            raise ValueError(f"{preset_name} is a GPU preset (hours of work on this server, which has no GPU): "
                             "choose quick in the Preset menu")
        config.seed = int_setting("seed", seed, 0, MAX_SEED)
        config.guidance, config.stop_after = guidance, stop_after
        advanced = {"coarse_iters": coarse_iters, "refine_iters": refine_iters, "texture_size": texture_size}
        for name, value in advanced.items():
            advanced[name] = 0 if value is None else int_setting(name, value, *ADVANCED_LIMITS[name])
        config.coarse.iters = advanced["coarse_iters"] or config.coarse.iters
        config.refine.iters = advanced["refine_iters"] or config.refine.iters
        if 0 < advanced["texture_size"] < 64:
            raise ValueError(f"texture_size must be 0 (the preset's) or in [64, 4096], got {advanced['texture_size']}")
        config.export.texture_size = advanced["texture_size"] or config.export.texture_size
        # The prompt, the config (guidance and stop_after included), the device, the model id, the model's vocabulary.
        check_prompt(prompt)
        config.check()
        spec = resolve_guidance(config, resolve_device(config.device))
        config.model_id = check_model_id(model_id, spec) or MODEL_IDS.get(spec.name)
        plan = resolve(prompt, config)
        if on_zerogpu():  # every GPU call must fit the host's cap: refused here, before any GPU time is taken
            check_fits(plan.config, plan.guidance_name)
    except ValueError as exc:  # PromptError and UnknownPromptError too
        message = web_message(str(exc))
        print(f"input refused: {message[:200]}", file=sys.stderr, flush=True)  # one line in the server's log
        raise gr.Error(message, print_exception=False) from None
    return plan


def check_queue_room(demo: gr.Blocks) -> None:
    """gr.Error when the queue is full: the browser would only say "busy" (the API client says "Queue is full")."""
    message = LINE.full_message()  # the runs waiting in Gradio's queue and those waiting for the device
    if message is not None:
        raise gr.Error(message, print_exception=False)


def run_events(plan, run_dir: str, should_stop):
    """The pipeline's events for one run: on a ZeroGPU Space a GPU call per stage (app_gpu), else in this process."""
    if on_zerogpu():
        return hosted_events(plan, run_dir, should_stop)
    from stages.pipeline import run_plan

    return run_plan(plan, run_dir=run_dir, should_stop=should_stop, close_wait=CLOSE_WAIT)


def view(snap: Snapshot | None, job=None) -> tuple:
    """(gallery newest first, status, model, files, latest preview, run id, Generate button, turntable) for a snapshot."""
    if snap is None:
        return [], LINE.device_state(), None, None, None, "", gr.update(value="Generate", interactive=True), None
    paths = snap.paths or {}
    files = [paths[k] for k in ("zip", "glb") if k in paths] or None
    gallery = [(image, caption) for image, caption in reversed(snap.previews)]
    latest = enlarge(snap.previews[-1][0]) if snap.previews else None
    button = gr.update(value="Generate" if snap.done else "Running…", interactive=snap.done)
    model, status = paths.get("glb"), snap.status
    if model is None and not snap.done and snap.model and os.path.isfile(snap.model):  # the export deletes it
        model, status = snap.model, f"{status}\n\nIn the viewer: {snap.model_label}; the textured model replaces it at the end."
    if job is not None and not snap.done:
        status = LINE.job_place(job) or status  # waiting for the device: its place, not "waiting for the previous run"
        if WARMUP.busy() and status.startswith("**Loading"):
            status += f"\n\n{WARMUP.note()}"
    return gallery, status, model, files, latest, snap.run_id, button, paths.get("turntable")


def generate(prompt: str, preset: str = "quick", seed: int = 0, guidance: str = "auto", coarse_iters: int | None = None,
             refine_iters: int | None = None, texture_size: int | None = None, stop_after: str = "export",
             model_id: str | None = None, request: gr.Request = None):
    """Start a run and stream its view; the run lives on its own thread (a reloaded page follows it by run id)."""
    QUEUED.pop(request.session_hash if request is not None else "", None)  # it has a slot: no longer queued
    plan = build_plan(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id)
    prune_runs(OUTPUT_ROOT, keep=max(KEEP_RUNS - 1, 0), max_bytes=MAX_OUTPUT_BYTES or None)
    run_dir = new_run_dir(OUTPUT_ROOT, plan.prompt, plan.config.seed)
    job = RunJob(run_dir, lambda stopped: run_events(plan, str(run_dir), stopped))
    RUNS.add(job)
    PROMPTS[job.snapshot.run_id] = prompt
    try:
        for snap in job.follow(watch=lambda: LINE.job_place(job)):
            yield view(snap, job)
            if snap.error:
                raise gr.Error(snap.error, print_exception=False)
    finally:  # Gradio closed this generator: a cancel stops the run; a page that went away (reload) leaves it running
        if not job.snapshot.done and not client_left(request):
            job.cancel()


def client_left(request) -> bool:
    """Whether the page of `request` went away (closed, reloaded), rather than cancelled its event.

    Gradio marks a lost page's events not alive before it closes their generators; a cancel leaves
    them alive. A private attribute of Gradio's queue: if it moves, every close counts as a cancel.
    """
    events = getattr(getattr(DEMO.get("blocks"), "_queue", None), "event_ids_to_events", None)
    if request is None or not isinstance(events, dict):
        return False
    return any(e.session_hash == request.session_hash and not getattr(e, "alive", True) for e in list(events.values()))


def follow(request: gr.Request):
    """On page load: the run named by `?run=` in the URL, still going or finished (its prompt fills the prompt box);
    without one, the device's state."""
    run_id = (request.query_params.get("run") or "") if request is not None else ""
    job = RUNS.get(run_id) if run_id else None
    if job is not None:
        prompt = run_prompt(job.run_dir, PROMPTS)
        for snap in job.follow(watch=lambda: LINE.job_place(job)):
            yield *view(snap, job), prompt
            prompt = gr.update()  # once: the visitor may type a new one meanwhile
        return
    if run_id:
        missing = Snapshot(run_id="", status=f"No run {as_text(run_id[:60])} on this server (its folder was pruned?).",
                           done=True)
        found = RUNS.from_disk(OUTPUT_ROOT, run_id)
        yield *view(found or missing), (run_prompt(OUTPUT_ROOT / run_id, PROMPTS) if found else gr.update())
        return
    yield *view(None), gr.update()


def queued(request: gr.Request):
    """Right after the input check: the old model goes, and the page says the run waits its turn."""
    session = request.session_hash if request is not None else ""
    if len(QUEUED) > 1000:  # pages that went away before their run started
        QUEUED.clear()
    QUEUED[session] = time.time()
    status = LINE.queued_place(session) or "**Queued** · runs go one at a time; this one starts when the device is free"
    return None, status, gr.update(value="Running…", interactive=False), None


def cancel(run_id: str, request: gr.Request):
    """The Cancel button: stop this page's run and say where it stopped (or that it left the queue)."""
    job = RUNS.get(run_id) if run_id else None
    if job is None or job.snapshot.done:
        if QUEUED.pop(request.session_hash if request is not None else "", None) is not None:
            return ("**Removed from the queue**: your run had not started, so nothing was made.",
                    gr.update(value="Generate", interactive=True))
        return "Nothing to cancel: no run is going.", gr.update(value="Generate", interactive=True)
    job.cancel()
    wait_until(lambda: job.snapshot.done, CANCEL_WAIT)
    return job.snapshot.status, gr.update(value="Generate", interactive=True)


def tick(server_text: str, status_text: str, request: gr.Request):
    """Every few seconds: this page's place while its run is queued (else the device's state, on a page that shows
    nothing of its own: also when the line is full and Gradio refused its load event); the recent runs."""
    state = LINE.device_state()
    place = LINE.queued_place(request.session_hash) if request is not None else None
    if place is None and is_device_state(status_text) and status_text != state:
        place = state
    text = f"{state}\n\n**Recent runs on this server** (click one to follow it)\n\n" + \
        recent_runs(OUTPUT_ROOT, {job.snapshot.run_id: job for job in RUNS.jobs()}, PROMPTS)
    return (place if place is not None else gr.skip()), (text if text != server_text else gr.skip())


def read_image(path: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def show_example(sample):
    """An example clicked: its prompt, and its ready-made result at once when there is one for the active model."""
    prompt = sample[0] if isinstance(sample, (list, tuple)) else sample
    found = ready.load(prompt, default_guidance())
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


def build_demo(queue_size: int = 8, overrides: list[str] | None = None) -> gr.Blocks:
    """The UI. `overrides` ("coarse.iters=300", ...) apply to every run (checked here, at start)."""
    SERVER_OVERRIDES[:] = list(overrides or [])
    apply_overrides(preset("quick"), SERVER_OVERRIDES)  # fail at start on a bad override
    LINE.queue_size = queue_size
    device, guidance = active_device(), default_guidance()
    precheck_errors: dict[str, str] = {}  # session -> the last refused input's message, for the status line
    with gr.Blocks(title="DreamLift: text to 3D", delete_cache=(3600, SERVED_FILE_AGE)) as demo:
        gr.Markdown(
            "# DreamLift\nType a prompt, get a textured 3D model (Score Distillation Sampling into a NeRF, "
            "then a DMTet mesh). "
            f"Active guidance: **{guidance}** on **{device}**{registry.get(guidance).app_note}."
        )
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder=example_prompts()[0], max_lines=1, elem_id="prompt")
                with gr.Row():
                    preset_in = gr.Dropdown(preset_choices(guidance), value=default_preset(), label="Preset",
                                            elem_id="preset", info=preset_info(device))
                    # A text box, so that a bad seed sent to the API gets our message that names it.
                    seed = gr.Textbox(value="0", label=f"Seed (0 to {MAX_SEED})", max_lines=1, elem_id="seed")
                guidance_in = gr.Dropdown(list(registry.choices()), value=registry.AUTO, label="Guidance model")
                with gr.Accordion("Advanced settings", open=False, elem_id="advanced"):
                    model_id = gr.Textbox(label="Model id (hub id or local folder, for stable-diffusion and deepfloyd-if)",
                                          placeholder=model_id_placeholder(), max_lines=1)
                    coarse_iters = gr.Slider(*ADVANCED_LIMITS["coarse_iters"], value=0, step=1, label="Coarse steps (0 = the preset's)",
                                             elem_id="coarse-steps")
                    refine_iters = gr.Slider(*ADVANCED_LIMITS["refine_iters"], value=0, step=1, label="Refine steps (0 = the preset's)")
                    texture_size = gr.Slider(*ADVANCED_LIMITS["texture_size"], value=0, step=64, label="Texture size, px (0 = the preset's)")
                    stop_after = gr.Dropdown(list(STAGES), value="export", label="Stop after")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", elem_id="cancel")
                has_ready = any(ready.load(p, guidance) for p in example_prompts())
                examples = gr.Dataset(
                    components=[prompt], samples=[[p] for p in example_prompts()], elem_id="examples",
                    label="Examples: click one to see its ready-made result at once; Generate runs it live" if has_ready
                    else "Examples")
                server = gr.Markdown("", elem_id="server")  # the device's state and this server's recent runs
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                run_id = gr.Textbox(visible="hidden", elem_id="run-id")  # the run this page shows, mirrored in ?run=
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
        inputs = [prompt, preset_in, seed, guidance_in, coarse_iters, refine_iters, texture_size, stop_after, model_id]
        outputs = [gallery, status, model, files, latest, run_id, run_btn, turntable]

        def precheck(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id,
                     request: gr.Request):
            """Answer bad input and a full queue at once, before the run waits in the queue."""
            session = request.session_hash if request is not None else ""
            try:
                build_plan(prompt, preset, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id)
                check_queue_room(demo)
            except gr.Error as exc:
                if len(precheck_errors) > 1000:  # API callers that never fetch theirs
                    precheck_errors.clear()
                precheck_errors[session] = exc.message
                raise
            precheck_errors.pop(session, None)

        def show_refusal(request: gr.Request):
            message = precheck_errors.pop(request.session_hash if request is not None else "", "the input was refused")
            return f"**Error:** {as_text(message)}"

        # The check runs unqueued, so it answers at once (also when the queue is full). Gradio 6.31 shows no
        # error of an unqueued event on the page, so its .failure writes the message into the status line.
        check = run_btn.click(precheck, inputs=inputs, queue=False, show_progress="hidden",
                              api_name="precheck", api_visibility="undocumented")
        check.failure(show_refusal, outputs=[status], queue=False, show_progress="hidden")
        event = check.success(generate, inputs=inputs, outputs=outputs, api_name="generate", concurrency_limit=1,
                              show_progress="hidden")
        check.success(queued, outputs=[viewer, status, run_btn, turntable], queue=False, api_visibility="undocumented")
        # The one way into the viewer: the hidden model's changes (intermediate models, the final one, an example,
        # a reloaded run). A second setter of the same path at the same time left the viewer without its canvas.
        model.change(lambda path: path, inputs=[model], outputs=[viewer], queue=False, show_progress="hidden",
                     api_visibility="undocumented")
        # A reload (or a second tab) with ?run=ID follows that run: still going, or its result.
        load = demo.load(follow, outputs=outputs + [prompt], concurrency_limit=None, show_progress="hidden",
                         api_visibility="undocumented")
        run_id.change(None, inputs=[run_id], js=URL_JS, queue=False, api_visibility="undocumented")
        # Unqueued: a full line (Gradio's bound lowered by the runs waiting for the device) must not refuse a cancel.
        cancel_btn.click(cancel, inputs=[run_id], outputs=[status, run_btn], cancels=[event, load], queue=False,
                         api_visibility="undocumented", show_progress="hidden")
        examples.click(show_example, inputs=[examples], outputs=[prompt, *outputs], queue=False,
                       show_progress="hidden", api_visibility="undocumented")
        timer = gr.Timer(TICK_SECONDS)
        timer.tick(tick, inputs=[server, status], outputs=[status, server], queue=False, show_progress="hidden",
                   api_visibility="undocumented")
        demo.load(tick, inputs=[server, status], outputs=[status, server], queue=False, show_progress="hidden",
                  api_visibility="undocumented")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    DEMO["blocks"] = demo
    LINE.demo = demo
    RUNS.on_change = LINE.sync
    return demo


CSS = "#downloads .label-clear-button { display: none; }"  # downloads are results: no remove buttons
URL_JS = """(id) => {  // the run id in the address bar, so that a reload finds the run
    const url = new URL(window.location.href);
    if (id) { url.searchParams.set("run", id); } else { url.searchParams.delete("run"); }
    window.history.replaceState(null, "", url);
    return [];
}"""


def main(argv=None) -> None:
    global KEEP_RUNS, MAX_OUTPUT_BYTES
    parser = argparse.ArgumentParser(description="DreamLift web app")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--queue-size", type=int, default=8, help="waiting runs beyond which new ones are refused")
    parser.add_argument("--keep-runs", type=int, default=KEEP_RUNS, help="finished runs kept under the output folder")
    parser.add_argument("--max-output-gb", type=float, default=MAX_OUTPUT_BYTES / 1e9,
                        help="disk the earlier runs may take, GB (oldest pruned first); 0 = no bound")
    parser.add_argument("--model-id", action="append", default=[], metavar="[FAMILY=]ID",
                        help="hub id or local folder this server's stable-diffusion or deepfloyd-if runs load (repeatable, "
                             "one per family; a bare id is for stable-diffusion; env DREAMLIFT_MODEL_ID); "
                             "the page's Model id box overrides it per run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every run, e.g. coarse.iters=300 (repeatable)")
    args = parser.parse_args(argv)
    if args.keep_runs < 1 or args.max_output_gb < 0 or args.queue_size < 1:
        parser.error(f"--keep-runs and --queue-size must be >= 1 and --max-output-gb >= 0, got {args.keep_runs}, "
                     f"{args.queue_size}, {args.max_output_gb}")
    KEEP_RUNS, MAX_OUTPUT_BYTES = args.keep_runs, int(args.max_output_gb * 1e9)
    try:
        ids, args.overrides = server_model_ids(args.model_id, args.overrides, os.environ.get("DREAMLIFT_MODEL_ID"))
    except ValueError as exc:
        parser.error(str(exc))
    MODEL_IDS.clear()
    MODEL_IDS.update(ids)
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    demo = build_demo(args.queue_size, args.overrides)
    start_warmup()
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(OUTPUT_ROOT), str(ready.RESULTS)], show_error=True, css=CSS)


def start_warmup() -> None:
    """Load the primitives prior's libraries for the default run in the background (when it is the default model)."""
    config = apply_overrides(preset(default_preset()), SERVER_OVERRIDES)
    try:
        if WARMUP.start(example_prompts()[0], config, log=lambda text: print(text, flush=True)):
            return
    except ValueError as exc:  # an override the default prompt cannot run with: runs load the libraries themselves
        print(f"primitives prior: no background load ({exc})", flush=True)


if __name__ == "__main__":
    main()

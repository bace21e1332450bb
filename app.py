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

from app_examples import example_prompts, example_seconds, show_example
from app_gpu import hosted_events, on_zerogpu
from app_page import CSS, URL_JS, build_page
from app_plan import (
    ADVANCED_LIMITS,
    active_device,
    default_guidance,
    default_preset,
    model_id_placeholder,
    plan_from_inputs,
    preset_choices,
    preset_info,
    server_model_ids,
)
from app_queue import Cached, Line, as_text, is_device_state, recent_runs, run_prompt, typical_seconds
from app_support import RunJob, Runs, ShownModel, Snapshot, enlarge, wait_until, web_message
from app_warmup import Warmup
from examples import ready
from stages.config import apply_overrides, preset
from stages.runs import new_run_dir, prune_runs

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
LAST_RUN: dict[str, str] = {}  # session -> the run id its latest Generate started
TICK_SECONDS = 3.0  # how often a page refreshes its place in line, the device's state and the recent runs

TYPICAL = Cached(lambda: typical_seconds(OUTPUT_ROOT, default_preset(), example_seconds(default_guidance())))
LINE.typical = TYPICAL


def build_plan(prompt, preset_name, seed, guidance, coarse_iters, refine_iters, texture_size, stop_after, model_id=None):
    """Validate the UI/API inputs (gr.Error naming what to change) and resolve the run's plan, once."""
    try:
        return plan_from_inputs(prompt, preset_name, seed, guidance, coarse_iters, refine_iters, texture_size,
                                stop_after, model_id, SERVER_OVERRIDES, MODEL_IDS)
    except ValueError as exc:  # PromptError and UnknownPromptError too
        message = web_message(str(exc))
        print(f"input refused: {message[:200]}", file=sys.stderr, flush=True)  # one line in the server's log
        raise gr.Error(message, print_exception=False) from None


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


def view(snap: Snapshot | None, job=None, shown: ShownModel | None = None) -> tuple:
    """(gallery newest first, status, model, files, latest preview, run id, Generate button, turntable) for a snapshot;
    an intermediate model goes to the viewer as the page's own link (`shown`), which the worker cannot delete."""
    if snap is None:
        return [], LINE.device_state(), None, None, None, "", gr.update(value="Generate", interactive=True), None
    paths = snap.paths or {}
    files = [paths[k] for k in ("zip", "glb") if k in paths] or None
    gallery = [(image, caption) for image, caption in reversed(snap.previews)]
    latest = enlarge(snap.previews[-1][0]) if snap.previews else None
    button = gr.update(value="Generate" if snap.done else "Running…", interactive=snap.done)
    model, status = paths.get("glb"), snap.status
    if shown is not None:
        shown.release()  # Gradio has cached the last one
    held = shown.hold(snap.model) if shown is not None and model is None and not snap.done and snap.model else None
    if held is not None:
        model, status = held, f"{status}\n\nIn the viewer: {snap.model_label}; the textured model replaces it at the end."
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
    if request is not None:
        if len(LAST_RUN) > 1000:  # pages long gone
            LAST_RUN.clear()
        LAST_RUN[request.session_hash] = job.snapshot.run_id
    shown = ShownModel(run_dir)
    try:
        for snap in job.follow(watch=lambda: LINE.job_place(job)):
            yield view(snap, job, shown)
            if snap.error:
                raise gr.Error(snap.error, print_exception=False)
    finally:  # Gradio closed this generator: a cancel stops the run; a page that went away (reload) leaves it running
        shown.release()
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
        prompt, shown = run_prompt(job.run_dir, PROMPTS), ShownModel(job.run_dir)
        try:
            for snap in job.follow(watch=lambda: LINE.job_place(job)):
                yield *view(snap, job, shown), prompt
                prompt = gr.update()  # once: the visitor may type a new one meanwhile
        finally:
            shown.release()
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


def tick(server_text: str, status_text: str, run_id: str = "", button_text: str = "", request: gr.Request = None):
    """Every few seconds: this page's place while its run is queued (else the device's state, on a page that shows
    nothing of its own: also when the line is full and Gradio refused its load event); the end of this page's run
    where the page still shows it running; the recent runs."""
    state = LINE.device_state()
    session = request.session_hash if request is not None else ""
    place = LINE.queued_place(session) if request is not None else None
    if place is None and is_device_state(status_text) and status_text != state:
        place = state
    button = gr.skip()
    job = RUNS.get(run_id) if run_id and LAST_RUN.get(session) == run_id else None
    if place is None and job is not None and job.snapshot.done and button_text != "Generate" \
            and status_text != job.snapshot.status:
        # A cancel's answer can reach the page before the run's last update that was on its way, which then
        # leaves a running status and a disabled button: the page settles on how its run ended.
        place, button = job.snapshot.status, gr.update(value="Generate", interactive=True)
    text = f"{state}\n\n**Recent runs on this server** (click one to follow it)\n\n" + \
        recent_runs(OUTPUT_ROOT, {job.snapshot.run_id: job for job in RUNS.jobs()}, PROMPTS)
    return (place if place is not None else gr.skip()), (text if text != server_text else gr.skip()), button


def build_demo(queue_size: int = 8, overrides: list[str] | None = None) -> gr.Blocks:
    """The UI. `overrides` ("coarse.iters=300", ...) apply to every run (checked here, at start)."""
    SERVER_OVERRIDES[:] = list(overrides or [])
    apply_overrides(preset("quick"), SERVER_OVERRIDES)  # fail at start on a bad override
    LINE.queue_size = queue_size
    device, guidance = active_device(), default_guidance()
    precheck_errors: dict[str, str] = {}  # session -> the last refused input's message, for the status line
    with gr.Blocks(title="DreamLift: text to 3D", delete_cache=(3600, SERVED_FILE_AGE)) as demo:
        prompts = example_prompts(guidance)
        page = build_page(guidance, device, preset_choices(guidance), default_preset(), preset_info(device),
                          model_id_placeholder(MODEL_IDS), prompts, any(ready.load(p, guidance) for p in prompts),
                          ADVANCED_LIMITS)
        inputs, outputs, status, run_btn, run_id = page.inputs, page.outputs, page.status, page.run_btn, page.run_id

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
        check.success(queued, outputs=[page.viewer, status, run_btn, page.turntable], queue=False,
                      api_visibility="undocumented")
        # The one way into the viewer: the hidden model's changes (intermediate models, the final one, an example,
        # a reloaded run). A second setter of the same path at the same time left the viewer without its canvas.
        page.model.change(lambda path: path, inputs=[page.model], outputs=[page.viewer], queue=False,
                          show_progress="hidden", api_visibility="undocumented")
        # A reload (or a second tab) with ?run=ID follows that run: still going, or its result.
        load = demo.load(follow, outputs=outputs + [page.prompt], concurrency_limit=None, show_progress="hidden",
                         api_visibility="undocumented")
        run_id.change(None, inputs=[run_id], js=URL_JS, queue=False, api_visibility="undocumented")
        # Unqueued: a full line (Gradio's bound lowered by the runs waiting for the device) must not refuse a cancel.
        page.cancel_btn.click(cancel, inputs=[run_id], outputs=[status, run_btn], cancels=[event, load], queue=False,
                              api_visibility="undocumented", show_progress="hidden")
        page.examples.click(lambda sample: show_example(sample, default_guidance()), inputs=[page.examples],
                            outputs=[page.prompt, *outputs], queue=False, show_progress="hidden",
                            api_visibility="undocumented")
        timer = gr.Timer(TICK_SECONDS)
        timer.tick(tick, inputs=[page.server, status, run_id, run_btn], outputs=[status, page.server, run_btn],
                   queue=False, show_progress="hidden", api_visibility="undocumented")
        # After the page's own load: run at the same time, its device state could land after (and hide) what the
        # load wrote, such as "No run ... on this server" for an unknown ?run=.
        load.then(tick, inputs=[page.server, status, run_id, run_btn], outputs=[status, page.server, run_btn],
                  queue=False, show_progress="hidden", api_visibility="undocumented")
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    DEMO["blocks"] = demo
    LINE.demo = demo
    RUNS.on_change = LINE.sync
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
        if WARMUP.start(example_prompts(default_guidance())[0], config, log=lambda text: print(text, flush=True)):
            return
    except ValueError as exc:  # an override the default prompt cannot run with: runs load the libraries themselves
        print(f"primitives prior: no background load ({exc})", flush=True)


if __name__ == "__main__":
    main()

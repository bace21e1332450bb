"""The app's line of runs, ready-made examples and visitor-text quoting, in-process (no server)."""
import json
import threading
import time
from pathlib import Path

import pytest

from app_queue import Line, as_text, recent_runs, typical_seconds
from app_support import RunJob, Runs


def _blocked_job(tmp_path, name, gate, started=True):
    """A RunJob whose events wait on `gate` (a run holding the device, or one waiting for it)."""
    from stages.pipeline import ProgressEvent

    def events(stopped):
        message = "loading" if started else "waiting for the previous run on cpu to stop"
        yield ProgressEvent(stage="setup", message=message)
        while not gate.is_set():
            if stopped():
                from stages.common import Cancelled

                raise Cancelled("setup", 0)
            time.sleep(0.01)
        yield ProgressEvent(stage="done", message="done", run_dir=str(tmp_path / name), paths={})

    run_dir = tmp_path / name
    run_dir.mkdir()
    return RunJob(run_dir, events)


class _Queue:
    def __init__(self, max_size):
        self.max_size, self.event_queue_per_concurrency_id = max_size, {}


class _Demo:
    def __init__(self, max_size):
        self._queue = _Queue(max_size)


def test_runs_whose_page_left_lower_gradios_bound_so_the_waiting_runs_stay_within_queue_size(tmp_path):
    runs, gate = Runs(), threading.Event()
    line = Line(runs, queue_size=3, typical=lambda: 100.0)
    line.demo = _Demo(3)
    runs.on_change = line.sync
    jobs = [_blocked_job(tmp_path, "a", gate)]
    runs.add(jobs[0])
    assert line.demo._queue.max_size == 3 and line.waiting() == 0  # one running: the whole bound is Gradio's
    for name in "bc":  # pages that left: their runs wait for the device, outside Gradio's queue
        jobs.append(_blocked_job(tmp_path, name, gate, started=False))
        runs.add(jobs[-1])
    assert line.waiting() == 2 and line.demo._queue.max_size == 1
    assert line.job_place(jobs[0]) is None  # it runs
    place = line.job_place(jobs[2])
    assert place.startswith("**2nd in line**") and "1 waiting ahead" in place and "about" in place
    assert line.full_message() is None
    jobs.append(_blocked_job(tmp_path, "d", gate, started=False))
    runs.add(jobs[-1])
    assert line.demo._queue.max_size == 0 and "The queue is full: 3 runs are waiting" in line.full_message()
    jobs[1].cancel()  # a waiting run leaves the line at once
    assert jobs[1].snapshot.done and "Removed from the queue" in jobs[1].snapshot.status
    assert line.waiting() == 2 and line.demo._queue.max_size == 1
    gate.set()
    assert all(j._thread.join(10) is None and j.snapshot.done for j in jobs)
    assert line.waiting() == 0 and line.demo._queue.max_size == 3
    assert "Removed from the queue" in jobs[1].snapshot.status  # its worker's late report changes nothing


def test_the_device_state_says_busy_with_the_runs_waiting():
    runs = Runs()
    line = Line(runs, queue_size=4, typical=lambda: None)
    assert line.device_state().startswith("Ready.")
    runs.unfinished = lambda: [object(), object()]
    text = line.device_state()
    assert "busy" in text and "1 run going, 1 waiting" in text and "Ready" not in text


@pytest.mark.parametrize("text, shown", [
    ("<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
    ('<img src=x onerror="x()">', '&lt;img src=x onerror="x()"&gt;'),
    ("a *bold* `code` [link](x)", r"a \*bold\* \`code\` \[link\](x)"),
])
def test_visitor_text_is_quoted_as_text(text, shown):
    assert as_text(text) == shown


def test_gpu_presets_are_refused_on_a_cpu_server_naming_quick():
    import gradio as gr

    import app
    from app_plan import active_device

    if active_device() != "cpu":
        pytest.skip("a GPU server accepts them")
    for name in ("fast", "standard", "high"):
        with pytest.raises(gr.Error) as err:
            app.build_plan("a red cube", name, "0", "primitives", 0, 0, 0, "export")
        assert "GPU preset" in err.value.message and "choose quick" in err.value.message
    assert app.build_plan("a red cube", "quick", "0", "primitives", 0, 0, 0, "export").config.preset == "quick"


def _record(folder: Path, **fields):
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(fields))


def test_recent_runs_list_prompts_as_text_states_and_links(tmp_path):
    _record(tmp_path / "20260101-000001-x-s0-aaaaaa", prompt="<b>a red cube</b>", status="finished", total_seconds=150)
    _record(tmp_path / "20260101-000002-y-s0-bbbbbb", prompt="a blue torus", status="cancelled")
    text = recent_runs(tmp_path, {}, {})
    first, second = text.splitlines()
    assert first == "- [a blue torus](?run=20260101-000002-y-s0-bbbbbb) · cancelled"  # newest first
    assert "&lt;b&gt;a red cube&lt;/b&gt;" in second and "finished in 2 min 30 s" in second
    assert recent_runs(tmp_path / "none", {}, {}) == "No runs yet on this server."


def test_the_typical_run_time_is_the_median_of_finished_runs_else_the_examples(tmp_path):
    assert typical_seconds(tmp_path, "quick", [200.0, 100.0, 300.0]) == 200.0
    for i, seconds in enumerate([50, 70, 60]):
        _record(tmp_path / f"r{i}", status="finished", preset="quick", total_seconds=seconds)
    _record(tmp_path / "other", status="finished", preset="standard", total_seconds=999)
    _record(tmp_path / "failed", status="failed", preset="quick")
    assert typical_seconds(tmp_path, "quick", [500.0]) == 60.0
    assert typical_seconds(tmp_path / "none", "quick", []) is None


def test_an_example_shows_its_ready_made_result_or_only_fills_the_prompt(tmp_path, monkeypatch):
    from app_examples import show_example
    from examples import ready

    folder = tmp_path / "a-red-cube"
    folder.mkdir()
    for name in ("model.glb", "turntable.mp4", "strip.png"):
        (folder / name).write_bytes(b"x")
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "preview.png")
    facts = {"prompt": "a red cube", "preset": "quick", "seed": 0, "guidance": "primitives", "device": "cpu",
             "seconds": 151.0, "commit": "0123456789abcdef"}
    (folder / "facts.json").write_text(json.dumps(facts))
    monkeypatch.setattr(ready, "RESULTS", tmp_path)
    shown = show_example(["a red cube"], "primitives")
    prompt, gallery, status, model, files, latest, run_id, button, video = shown  # the viewer follows the model
    assert prompt == "a red cube" and model == str(folder / "model.glb") and files == [model]
    assert "Ready-made result" in status and "2 min 31 s" in status and "0123456" in status and "Generate" in status
    assert video.endswith("turntable.mp4") and latest.shape[1] >= 512 and len(gallery) == 2 and run_id == ""
    other = show_example(["a red cube"], "stable-diffusion")  # made with another model: prompt only
    assert other[0] == "a red cube" and all(not isinstance(x, (str, list)) for x in other[1:])


def test_the_server_loads_the_priors_libraries_in_the_background_and_says_when_it_renders_one(tmp_path, monkeypatch,
                                                                                               capsys):
    from app_warmup import Warmup
    from helpers import tiny_run_config
    from stages.plan import resolve
    from stages.workers import forget_guidance, guidance_loaded

    monkeypatch.setenv("DREAMLIFT_CACHE", str(tmp_path))  # nothing cached: both libraries are rendered
    forget_guidance()
    config = tiny_run_config()
    config.prior.renders_per_view = 2  # small libraries, in an empty cache
    lines, warmup = [], Warmup()
    assert warmup.start("a red cube", config, log=lines.append)
    assert warmup.busy() and "still being rendered" in warmup.note()
    warmup._thread.join(120)
    assert not warmup.busy() and warmup.error is None and warmup.note() == ""
    plan = resolve("a red cube", config)
    assert guidance_loaded(plan) and guidance_loaded(plan, "refine")  # the first run loads nothing
    printed = capsys.readouterr().out.splitlines()  # the prior's own lines, as the command line shows them
    rendering = [i for i, line in enumerate(printed) if "rendering a library" in line]
    built = [i for i, line in enumerate(printed) if "built library" in line]
    assert len(rendering) == len(built) == 2 and all(r < b for r, b in zip(rendering, built)), printed
    assert "in the background" in lines[0] and "libraries ready" in lines[-1]
    stable = tiny_run_config()
    stable.guidance = "stable-diffusion"
    assert not Warmup().start("a teapot", stable)  # no library to render for a hub model
    forget_guidance()


def test_a_page_showing_only_the_device_state_is_kept_current_and_a_queued_page_gets_its_place(monkeypatch):
    import gradio as gr

    import app

    class Request:
        session_hash = "page-1"

    monkeypatch.setattr(app.LINE, "queued_place", lambda session: None)
    monkeypatch.setattr(app.LINE, "device_state", lambda: "**The device is busy** · 1 run going, 0 waiting (at most 8).")
    status, server, _ = app.tick("", "Ready.", request=Request())
    assert status.startswith("**The device is busy**") and "Recent runs on this server" in server
    assert app.tick(server, status, request=Request()) == (gr.skip(), gr.skip(), gr.skip())  # nothing changed
    kept, _, _ = app.tick("", "**Coarse NeRF** · step 3/500", request=Request())  # the page's own run: left alone
    assert kept == gr.skip()
    monkeypatch.setattr(app.LINE, "queued_place", lambda session: "**2nd in line** · 1 waiting ahead of yours")
    assert app.tick("", "**Queued** · runs go one at a time", request=Request())[0].startswith("**2nd in line**")


def test_a_page_left_showing_its_run_going_after_the_run_ended_settles_on_how_it_ended(monkeypatch):
    """A cancel's answer can reach the page before the run's last update on its way: the timer repairs the page."""
    import gradio as gr

    import app
    from app_support import Snapshot

    class Request:
        session_hash = "page-2"

    class Ended:
        snapshot = Snapshot(run_id="run-a", status="**Cancelled** at coarse step 50/3000.", done=True)

    monkeypatch.setattr(app.LINE, "queued_place", lambda session: None)
    monkeypatch.setattr(app.RUNS, "get", lambda run_id: Ended if run_id == "run-a" else None)
    monkeypatch.setitem(app.LAST_RUN, "page-2", "run-a")
    stale = "**Coarse NeRF** · step 49/3000 · 7 s elapsed"
    status, _, button = app.tick("", stale, "run-a", "Running…", request=Request())
    assert status == Ended.snapshot.status and button["interactive"] is True and button["value"] == "Generate"
    # Left alone: a page showing its ended run already, one whose button is back, and one whose newest run is another.
    assert app.tick("", Ended.snapshot.status, "run-a", "Running…", request=Request())[2] == gr.skip()
    assert app.tick("", stale, "run-a", "Generate", request=Request())[2] == gr.skip()
    monkeypatch.setitem(app.LAST_RUN, "page-2", "run-b")
    assert app.tick("", stale, "run-a", "Running…", request=Request())[2] == gr.skip()

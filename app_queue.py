"""The line of runs: who waits where, for how long, and the bound `--queue-size` on them all.

A run waits in one of two places: in Gradio's queue (its event has no slot yet), or as a started
`RunJob` whose pipeline waits for the device, which happens when the page of the run ahead went
away (its Gradio slot is freed, its run keeps the device). `Line` counts both: it lowers Gradio's
own bound by the runs waiting for the device, so that the runs waiting in all never exceed
`--queue-size` whatever pages do, and it tells a page its place and a wait estimate.
"""
from __future__ import annotations

import html
import re
import time
from pathlib import Path

TYPICAL_RUNS = 5  # finished runs of this server whose median time is the estimate of one run
MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]{}#|~])")


def as_text(text: str) -> str:
    """Visitor-given text for a Markdown line: HTML tags and Markdown marks show as typed."""
    return MARKDOWN_SPECIALS.sub(r"\\\1", html.escape(str(text), quote=False))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


class Line:
    """The runs of one server in line for its device (`runs`: app_support.Runs; `typical`: seconds or None)."""

    def __init__(self, runs, queue_size: int, typical=lambda: None) -> None:
        self.runs, self.queue_size, self.typical = runs, queue_size, typical
        self.demo = None  # the served gr.Blocks, whose queue bound `sync` keeps

    # ---- counts ------------------------------------------------------------------------------
    def gradio_waiting(self, api_name: str = "generate") -> list:
        """The events of `api_name` waiting for a slot in Gradio's queue, first first (a private part of Gradio)."""
        queue = getattr(self.demo, "_queue", None)
        queues = getattr(queue, "event_queue_per_concurrency_id", None)
        if not isinstance(queues, dict):
            return []
        events = [e for q in list(queues.values()) for e in list(q.queue) if getattr(e.fn, "api_name", None) == api_name]
        return sorted(events, key=lambda e: e.enqueue_time)

    def waiting(self) -> int:
        """Runs waiting, all told: started ones behind the running run, and Gradio's queued events."""
        return max(len(self.runs.unfinished()) - 1, 0) + len(self.gradio_waiting())

    def sync(self) -> None:
        """Gradio's queue takes only as many runs as the bound leaves beside the started ones that wait for the device."""
        queue = getattr(self.demo, "_queue", None)
        if queue is not None and hasattr(queue, "max_size"):
            queue.max_size = max(self.queue_size - max(len(self.runs.unfinished()) - 1, 0), 0)

    def full_message(self) -> str | None:
        waiting = self.waiting()
        if waiting < self.queue_size:
            return None
        return (f"The queue is full: {waiting} runs are waiting (the limit is {self.queue_size}). Please try again in a "
                "few minutes.")

    # ---- a page's view of it -------------------------------------------------------------------
    def wait_seconds(self, ahead: int) -> float | None:
        """Seconds until a run with `ahead` runs before it (the running one included) starts; None without a figure."""
        typical = self.typical()
        if typical is None or ahead <= 0:
            return None if ahead > 0 else 0.0
        running = self.runs.unfinished()[:1]
        left = typical
        if running:
            left = max(typical - running[0].running_seconds(), 0.1 * typical)
        return left + (ahead - 1) * typical

    def _place(self, ahead: int) -> str:
        seconds = self.wait_seconds(ahead)
        wait = f"an estimated wait of about {duration(seconds)}" if seconds else "no wait estimate yet (no run finished)"
        return (f"**{ordinal(ahead)} in line** · {ahead - 1} waiting ahead of yours and 1 running · {wait} "
                "(Cancel takes it out of the line)")

    def job_place(self, job) -> str | None:
        """The status of a started run that waits for the device, or None once it runs."""
        unfinished = self.runs.unfinished()
        if job not in unfinished or unfinished.index(job) == 0:
            return None
        return self._place(unfinished.index(job))

    def queued_place(self, session_hash: str) -> str | None:
        """The status of this page's run while it waits in Gradio's queue, or None when it has none there."""
        events = self.gradio_waiting()
        mine = [i for i, e in enumerate(events) if e.session_hash == session_hash]
        if not mine:
            return None
        ahead = len(self.runs.unfinished()) + mine[0]
        if ahead == 0:
            return "**Queued** · starting …"
        return self._place(ahead)

    def device_state(self) -> str:
        """One line on the device: free, or busy with runs going and waiting."""
        unfinished, waiting = self.runs.unfinished(), self.waiting()
        if not unfinished and not waiting:
            return "Ready. The device is free: a run you start now begins at once."
        seconds = self.wait_seconds(len(unfinished) + len(self.gradio_waiting()))
        wait = f"; a run started now waits about {duration(seconds)}" if seconds else ""
        return (f"**The device is busy** · 1 run going, {waiting} waiting (at most {self.queue_size}){wait}.")


def is_device_state(text) -> bool:
    """Whether a status line only tells the device's state (the page shows nothing of its own)."""
    return text in ("", "Ready.") or str(text).startswith(("Ready. The device is free", "**The device is busy**"))


def typical_seconds(root: Path, preset: str = "quick", examples: list | None = None) -> float | None:
    """The median time of this server's latest finished runs of `preset`; else of the ready-made examples' runs."""
    from stages.runs import RUN_FILE, RunRecord

    times = []
    for record_path in sorted(root.glob(f"*/{RUN_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = RunRecord.read(record_path.parent)
        if record is None:
            continue
        if record.status == "finished" and record.preset == preset and record.total_seconds:
            times.append(float(record.total_seconds))
        if len(times) >= TYPICAL_RUNS:
            break
    times = times or [float(s) for s in (examples or []) if s]
    return sorted(times)[len(times) // 2] if times else None


class Cached:
    """`fn()` recomputed at most every `seconds` (the page's timers ask often; the answer changes slowly)."""

    def __init__(self, fn, seconds: float = 10.0) -> None:
        self.fn, self.seconds, self._at, self._value = fn, seconds, -1e9, None

    def __call__(self):
        if time.monotonic() - self._at > self.seconds:
            self._value, self._at = self.fn(), time.monotonic()
        return self._value


def run_prompt(run_dir: Path, known: dict) -> str:
    """The prompt of a run: `known` (run id -> prompt, the runs this server started), else its run.json."""
    from stages.runs import RunRecord

    if run_dir.name in known:
        return known[run_dir.name]
    record = RunRecord.read(run_dir)
    return str(record.prompt or "") if record is not None else ""


def recent_runs(root: Path, jobs: dict, prompts: dict, limit: int = 8) -> str:
    """A Markdown list of the latest runs in `root` (newest first): prompt, state, a `?run=` link.
    `jobs`: run id -> RunJob of this server (its live state); `prompts`: run id -> prompt."""
    from stages.runs import RunRecord

    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name,
                     reverse=True)[:limit] if root.is_dir() else []
    lines = []
    for folder in folders:
        job = jobs.get(folder.name)
        if job is not None and not job.snapshot.done:
            state = "running" if job.started_at is not None else "waiting"
        else:
            record = RunRecord.read(folder)
            if record is None:
                continue
            state = str(record.status or "unknown")
            if state == "running":
                state = "interrupted"  # no job of this server runs it
            elif state == "finished" and record.total_seconds:
                state = f"finished in {duration(record.total_seconds)}"
        prompt = as_text(run_prompt(folder, prompts)) or "(no prompt)"
        lines.append(f"- [{prompt}](?run={folder.name}) · {state}")
    return "\n".join(lines) or "No runs yet on this server."

"""The primitives prior's libraries, rendered in the background when the server starts.

The prior renders a library of primitive shapes per camera distribution the first time it is
used on a machine (minutes on a busy CPU; cached on disk after). A quick run needs two: the
coarse stage's cameras and the refine stage's (`RunPlan.refine_config`). `Warmup.start` loads
both on a background thread into the models the runs keep (`stages.workers.kept_guidance`), so the
first visitor's run finds them ready; a run that comes earlier waits for them, and the page says so.
"""
from __future__ import annotations

import threading
import time


class Warmup:
    """One background load of the guidance models a run with the server's defaults needs."""

    def __init__(self) -> None:
        self.started_at: float | None = None  # time.monotonic() at start
        self.ended_at: float | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, prompt: str, config, log=print) -> bool:
        """Load the models for `prompt` with `config` (a Config) in the background; False if its model has no library."""
        from stages.plan import resolve

        plan = resolve(prompt, config)
        if plan.guidance.name != "primitives":
            return False
        stages = ["coarse"] + (["refine"] if plan.refine_config is not plan.config else [])
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._load, args=(plan, stages, log), name="prior-warmup", daemon=True)
        self._thread.start()
        return True

    def _load(self, plan, stages, log) -> None:
        from stages.workers import guidance_for

        try:
            log(f"primitives prior: loading its {len(stages)} libraries in the background (rendered once per machine, "
                "then read from the cache)")
            for stage in stages:
                guidance_for(plan, stage)
            log(f"primitives prior: libraries ready after {time.monotonic() - self.started_at:.0f} s")
        except Exception as exc:  # a run loads them itself then, and reports any error
            self.error = " ".join(str(exc).split()) or type(exc).__name__
            log(f"primitives prior: background load failed ({self.error}); runs will load the libraries themselves")
        finally:
            self.ended_at = time.monotonic()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def note(self) -> str:
        """A line for a run that waits for the libraries; '' when it does not."""
        if not self.busy():
            return ""
        since = time.monotonic() - (self.started_at or time.monotonic())
        return (f"the primitives prior's libraries are still being rendered (started with the server {since:.0f} s ago; "
                "once per machine, then cached): the run starts when they are ready")

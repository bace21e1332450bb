"""The Ray actor that runs a batch's runs on one worker slot (one GPU, or N CPUs).

A plain class here (no Ray import at module level); `batch.ray_runner` wraps it with
`ray.remote`. One actor lives for the whole batch, so the guidance model it loads for its first
run (`stages.workers.guidance_for` keeps one per process) serves all its later runs. It is a
threaded actor (two calls at a time) only so that `stop()` can reach a run in progress.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path


class RunWorker:
    def __init__(self, root: str, threads: int):
        import torch

        import stages.pipeline  # noqa: F401 (imported once here, so a worker's start holds its import time)

        if threads > 0:
            torch.set_num_threads(threads)  # the CPUs Ray gave this slot, not the whole machine's
        if not Path(root).is_dir():
            raise RuntimeError(f"the batch's output folder {root} is not visible on {socket.gethostname()}: "
                               "--out must be on storage that every node mounts at the same path")
        self._stop = threading.Event()

    def info(self) -> dict:
        import ray

        return {"node": f"{socket.gethostname()} ({ray.util.get_node_ip_address()})", "pid": os.getpid()}

    def stop(self) -> None:
        """Ask the run in progress to stop at its next step (it ends as 'cancelled')."""
        self._stop.set()

    def run(self, prompt: str, config, run_dir: str, resume: bool) -> dict:
        """Run one prompt into run_dir; returns what batch.json records. A run that raises is
        reported in the result (run.json has its traceback) and the worker stays up for the next.
        `resume`: continue after the folder's last finished stage when it has a run.json (a retry)."""
        from stages import pipeline, workers
        from stages.common import Cancelled
        from stages.plan import resolve
        from stages.runs import RUN_FILE

        self._stop.clear()
        result = {"status": "failed", "error": None, **self.info(), "model_loaded": False, "load_seconds": 0.0}
        start = time.perf_counter()
        try:
            # Get the guidance model first, to tell a load from a kept model (the run gets the same one).
            plan = resolve(prompt, config)
            result["model_loaded"] = not workers.guidance_loaded(plan)
            workers.guidance_for(plan)
            result["load_seconds"] = time.perf_counter() - start
            resume = resume and (Path(run_dir) / RUN_FILE).is_file()
            for _ in pipeline.run_plan(plan, run_dir=run_dir, resume=resume, should_stop=self._stop.is_set):
                pass
            result["status"] = "finished"
        except Cancelled:
            result["status"], result["error"] = "cancelled", "cancelled"
        except Exception as exc:  # recorded, the batch goes on
            result["error"] = " ".join(str(exc).split()) or type(exc).__name__
        result["seconds"] = time.perf_counter() - start
        return result


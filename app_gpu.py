"""Where the app's runs get their GPU: in this process, or on a ZeroGPU Space, one GPU call per SDS stage.

On ZeroGPU (`SPACES_ZERO_GPU=true`, set by Hugging Face) each `@spaces.GPU` call runs in a forked worker
process: its arguments and each value it yields are pickled, it asks up front for a duration (seconds) that
must stay under the per-call cap and is charged to the visitor's daily quota, and CUDA exists only inside it.
So a run there is a chain of calls that share nothing but plain data and the run folder:

    coarse (GPU call) -> coarse.pt -> refine (GPU call) -> refine.pt -> export (this process, on the CPU)

Each call gets the resolved plan as plain data (`stages.plan.plan_payload`) and the run folder's path,
starts from the folder's checkpoints, and yields the pipeline's progress events; a failure or a cancel
comes back as an event (the host would reduce an exception to its class name). A cancel reaches the
worker as a file in the run folder (`stages.runs.request_stop`), which the stage loops check each step.
Each call asks for what `stages.gpu_budget` says (the upper end of the cost model's estimate at the rate
this server measured); a run with a call over the cap is refused before any GPU time is taken.
"""
from __future__ import annotations

import os
import time

from stages.gpu_budget import calibrate, call_requests, request_seconds


def on_zerogpu() -> bool:
    """Whether this server runs on a ZeroGPU Space (the variable the `spaces` package reads)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def stage_call(payload: dict, run_dir: str, stage: str, first: bool):
    """One SDS stage of a run, in whatever process the host gives it (a ZeroGPU worker): its progress
    events, and at the end a "paused" event, or one "cancelled" / "failed" event with the message."""
    from stages.common import Cancelled
    from stages.pipeline import ProgressEvent, run_plan
    from stages.plan import plan_from_payload

    try:
        plan = plan_from_payload(payload)
        yield from run_plan(plan, run_dir=run_dir, resume=not first, stages=(stage,))
    except Cancelled as exc:
        yield ProgressEvent(stage="cancelled", message=str(exc), run_dir=run_dir)
    except Exception as exc:  # noqa: BLE001 - the host would keep only the class name
        yield ProgressEvent(stage="failed", message=" ".join(str(exc).split()) or type(exc).__name__, run_dir=run_dir)


def _decorate(fn):
    try:
        import spaces
    except Exception:  # pragma: no cover - spaces missing or broken: no ZeroGPU
        return fn
    return spaces.GPU(duration=request_seconds)(fn)


gpu_stage_call = _decorate(stage_call)  # the same function where `spaces` is a no-op (not on ZeroGPU)


def hosted_events(plan, run_dir: str, should_stop):
    """A run as ZeroGPU needs it: a GPU call per SDS stage, then the export in this process on the CPU.
    Yields the pipeline's events; raises Cancelled on a cancel and RuntimeError with the message on a failure."""
    from stages.common import Cancelled, check_stop
    from stages.pipeline import run_plan
    from stages.plan import plan_from_payload, plan_payload
    from stages.runs import RunRecord

    start = time.perf_counter()
    payload = plan_payload(plan)
    calls = [stage for stage, _ in call_requests(plan.config, plan.guidance_name)]
    for i, stage in enumerate(calls):
        check_stop(should_stop, stage, 0)
        steps: list[tuple[int, float]] = []  # (step, arrival) of the call's step reports: its rate on this host
        try:
            for event in gpu_stage_call(payload, run_dir, stage, i == 0):
                if event.stage == stage and event.total and event.step:
                    steps.append((event.step, time.perf_counter()))
                if event.stage == "cancelled":
                    raise Cancelled(event.message)
                if event.stage == "failed":
                    raise RuntimeError(event.message)
                if event.stage != "paused":
                    event.elapsed = time.perf_counter() - start  # the run's time, not the call's
                    yield event
        except (Cancelled, RuntimeError):
            raise
        except Exception as exc:  # the host ended the call (past its request, a worker error): say so in run.json
            message = f"the {stage} stage's GPU call was ended by the host ({' '.join(str(exc).split()) or type(exc).__name__})"
            try:
                record = RunRecord.load(run_dir)
                if record.status == "running":
                    record.end(run_dir, "failed", message)
            except (OSError, ValueError):
                pass
            raise RuntimeError(message) from exc
        finally:
            calibrate(plan.guidance_name, stage, plan.config, steps)
    check_stop(should_stop, "export", 0)
    for event in run_plan(plan_from_payload(payload, device="cpu"), run_dir=run_dir, resume=True, stages=("export",),
                          should_stop=should_stop):
        event.elapsed = time.perf_counter() - start
        yield event

"""Run a batch's runs on a Ray cluster: one actor per worker slot, one actor task per (prompt, seed).

A slot is one GPU when the cluster has GPUs (and --device is not cpu), else `cpus_per_run` CPUs;
the batch starts min(slots, runs) actors and hands each free actor the next run, so a slow run
never holds back the others. Each actor keeps its guidance model between runs (batch.worker).

Outputs: the workers write each run's folder straight into the batch root, which must be on
storage every node mounts at the same path (on one machine it always is); nothing is copied
back. The driver checks each finished run's run.json and records a run it cannot see as failed.

Faults: a run that raises is recorded by its worker and the batch goes on. A worker process that
dies (killed, out of memory, node lost) fails its call with RayActorError: Ray restarts the actor
(max_restarts=-1) and the driver hands the run again to the next free worker, up to
`max_attempts` times; the retry continues after the run's last checkpoint. Ctrl-C (or
`should_stop`) asks the runs in progress to stop, waits up to STOP_GRACE_S for them to record
"cancelled", and kills the actors; runs never handed out stay "pending" for --resume.
"""
from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from batch.plan import BatchPlan, RunEntry, counts, run_status
from batch.worker import RunWorker

MAX_ATTEMPTS = 3  # hand-outs of one run before it counts as failed (a worker died each time)
STOP_GRACE_S = 30.0  # how long a cancel waits for the runs in progress to stop by themselves
WAIT_TICK_S = 0.5  # the driver wakes this often to notice a cancel
RESTART_WAIT_S = 300.0  # how long a dead worker may take to come back before the batch goes on without it


def import_ray():
    """Ray, imported only for --ray; a missing Ray is one clear error."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray, which is not installed: pip install -r requirements-ray.txt") from None
    return ray


@dataclass
class Cluster:
    ray: object  # the ray module
    started_here: bool  # this process called ray.init (joined or started a cluster), and calls ray.shutdown
    mode: str  # "gpu" (one GPU a run) or "cpu" (cpus_per_run CPUs a run)
    slots: int  # runs the cluster can hold at once
    num_cpus: int  # CPUs asked for per actor
    num_gpus: int  # GPUs asked for per actor
    threads: int  # torch threads per actor (0 = torch's default)
    resources: dict  # ray.cluster_resources() when the batch started

    @property
    def worker_device(self) -> str:
        return "cuda" if self.mode == "gpu" else "cpu"

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def open_cluster(address: str | None, device: str, cpus_per_run: int) -> Cluster:
    """Join the cluster at `address`, or for None / "auto" the one running on this machine, starting
    a local one when there is none. Works out the slots from the cluster's resources."""
    if cpus_per_run < 1:
        raise ValueError(f"--ray-cpus-per-run must be >= 1, got {cpus_per_run}")
    if device.startswith("cuda") and device not in ("cuda", "cuda:0"):
        raise ValueError(f"with --ray each run gets one GPU from Ray, seen as 'cuda'; use --device auto or cuda, "
                         f"got {device!r}")
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=None if address in (None, "auto") else address, include_dashboard=False,
                     logging_level="WARNING")
        except (ConnectionError, RuntimeError) as exc:
            raise RuntimeError(f"cannot join the Ray cluster ({address}): {_short(exc)}. Is `ray start --head` "
                               "running there, and is RAY_AUTH_MODE=token with the cluster's token set here "
                               "(README, Scale-out)?") from None
        started = True  # this process connected (or started a local cluster): it disconnects at the end
    try:
        resources = dict(ray.cluster_resources())
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if device.startswith("cuda") and gpus == 0:
            raise ValueError(f"--device {device} was asked for, but the Ray cluster has no GPUs")
        if gpus and device != "cpu":
            return Cluster(ray, started, "gpu", gpus, num_cpus=1, num_gpus=1, threads=0, resources=resources)
        if cpus < cpus_per_run:
            raise ValueError(f"the Ray cluster has {cpus} CPUs, fewer than --ray-cpus-per-run {cpus_per_run}")
        return Cluster(ray, started, "cpu", cpus // cpus_per_run, num_cpus=cpus_per_run, num_gpus=0,
                       threads=cpus_per_run, resources=resources)
    except BaseException:
        if started:
            ray.shutdown()
        raise


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail at once when a HOST:PORT address does not answer (ray.init would retry for minutes)."""
    if address in (None, "auto") or "://" in address or ":" not in address:
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"no Ray cluster answers at {address} ({exc}); start one there with "
                           "`ray start --head --port=PORT`, or use --ray alone for a local cluster") from None


def start_workers(cluster: Cluster, root: Path, count: int) -> tuple[list, list[dict], float]:
    """`count` actors, started and answering; returns them, their node/pid and the seconds it took."""
    ray = cluster.ray
    worker_class = ray.remote(RunWorker)
    start = time.perf_counter()
    actors = [
        worker_class.options(num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus, max_restarts=-1,
                             max_concurrency=2).remote(str(root), cluster.threads)
        for _ in range(count)
    ]
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except ray.exceptions.RayError as exc:
        for actor in actors:
            ray.kill(actor)
        raise RuntimeError(f"a Ray worker could not start: {_cause(exc)}") from None
    return actors, infos, time.perf_counter() - start


def run_batch(plan: BatchPlan, cluster: Cluster, resume: bool = False, max_attempts: int = MAX_ATTEMPTS,
              should_stop=None, on_dispatch=None, log=None) -> BatchPlan:
    """Run the plan's unfinished runs on the cluster, keeping batch.json current; returns the plan.

    `resume`: runs whose folder has a run.json continue after their last finished stage.
    `should_stop()`: polled every WAIT_TICK_S; True cancels like Ctrl-C (then KeyboardInterrupt is raised).
    `on_dispatch(entry, pid)`: called when a run is handed to the worker process `pid` (tests).
    """
    from tqdm import tqdm

    ray = cluster.ray
    log = log or tqdm.write
    todo = plan.todo()
    plan.info["ray"] = {"mode": cluster.mode, "slots": cluster.slots, "cpus_per_run": cluster.num_cpus,
                        "gpus_per_run": cluster.num_gpus, "resources": cluster.resources}
    started = time.time()
    if not todo:
        plan.save("finished")
        return plan
    plan.save("starting")  # from here on, --resume can continue the batch
    try:
        actors, infos, start_seconds = start_workers(cluster, plan.root, min(cluster.slots, len(todo)))
    except BaseException as exc:
        plan.save("cancelled" if isinstance(exc, KeyboardInterrupt) else "failed")
        raise
    plan.info["ray"].update(workers=infos, worker_start_seconds=start_seconds)
    workers = _Workers(ray, actors, infos)
    queue, inflight = deque(todo), {}  # inflight: ObjectRef -> (entry, actor, hand-out time)
    tries = {entry.index: 0 for entry in todo}  # hand-outs in this call (entry.attempts counts across resumes)
    for entry in todo:
        entry.status, entry.error = "pending", None
    bar = tqdm(total=len(plan.runs), initial=len(plan.runs) - len(todo), unit="run", desc="batch", smoothing=0)
    plan.save("running")
    try:
        while queue or inflight:
            while queue and workers.idle:
                entry, actor = queue.popleft(), workers.idle.popleft()
                entry.attempts += 1
                tries[entry.index] += 1
                entry.status = "running"
                ref = actor.run.remote(entry.prompt, plan.run_config(entry), str(plan.root / entry.run_dir),
                                       resume or tries[entry.index] > 1)
                inflight[ref] = (entry, actor, time.perf_counter())
                plan.save("running")
                if on_dispatch is not None:
                    on_dispatch(entry, workers.pid[id(actor)])
            if queue and not inflight and not workers.count():
                for entry in queue:
                    entry.status, entry.error = "failed", "no Ray worker left: every worker died and none came back"
                    log(_line(plan, entry))
                break
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            workers.reprobe()
            ready, _ = ray.wait([*inflight, *workers.probes], num_returns=1, timeout=WAIT_TICK_S)
            for ref in ready:
                if ref in workers.probes:
                    workers.answered(ref, log)
                    continue
                entry, actor, handed = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the worker process died: Ray restarts it
                    log(f"worker pid {workers.pid[id(actor)]} died during {entry.run_dir}: {_short(exc, 120)}")
                    if isinstance(exc, ray.exceptions.ActorUnavailableError):  # it may still be running the run:
                        ray.kill(actor, no_restart=False)  # restart it, so no run is ever done twice at once
                    workers.restarting(actor)
                    if tries[entry.index] < max_attempts:  # first in line for the next free worker
                        entry.status = "pending"
                        queue.appendleft(entry)
                        plan.save("running")
                        continue
                    result = {"status": "failed", "error": f"its worker died {tries[entry.index]} times: {_short(exc)}"}
                except ray.exceptions.RayError as exc:
                    workers.idle.append(actor)
                    result = {"status": "failed", "error": _short(exc)}
                else:
                    workers.idle.appendleft(actor)
                    workers.pid[id(actor)] = result.get("pid", workers.pid[id(actor)])
                _record(plan, entry, result, time.perf_counter() - handed)
                bar.update(1)
                log(_line(plan, entry))
        status = "finished" if all(r.status == "finished" for r in plan.runs) else "failed"
        plan.info.update(started_at=started, wall_seconds=time.time() - started)
        plan.save(status)
        return plan
    except KeyboardInterrupt:
        _cancel(ray, plan, inflight, log)
        plan.info.update(started_at=started, wall_seconds=time.time() - started)
        plan.save("cancelled")
        raise
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)


class _Workers:
    """The batch's actors: the idle ones, and those Ray is restarting, asked for info() until they answer."""

    def __init__(self, ray, actors: list, infos: list[dict]):
        self.ray = ray
        self.idle = deque(actors)
        self.pid = {id(a): info["pid"] for a, info in zip(actors, infos)}
        self.probes: dict = {}  # ObjectRef of info() -> (actor, when its restart began)
        self.unavailable: list = []  # (actor, restart began, probe again at): answered "restarting" recently

    def count(self) -> int:
        """Actors idle or coming back (busy ones are counted by the caller's in-flight runs)."""
        return len(self.idle) + len(self.probes) + len(self.unavailable)

    def restarting(self, actor) -> None:
        self.probes[actor.info.remote()] = (actor, time.perf_counter())

    def reprobe(self) -> None:
        now, waiting = time.perf_counter(), self.unavailable
        self.unavailable = [w for w in waiting if w[2] > now]
        for actor, since, _ in (w for w in waiting if w[2] <= now):
            self.probes[actor.info.remote()] = (actor, since)

    def answered(self, ref, log) -> None:
        actor, since = self.probes.pop(ref)
        try:
            self.pid[id(actor)] = self.ray.get(ref)["pid"]
            self.idle.append(actor)
        except self.ray.exceptions.ActorUnavailableError:  # still restarting
            if time.perf_counter() - since < RESTART_WAIT_S:
                self.unavailable.append((actor, since, time.perf_counter() + WAIT_TICK_S))
            else:
                log(f"a worker did not come back within {RESTART_WAIT_S:.0f} s; going on without it")
        except self.ray.exceptions.RayError as exc:  # dead for good
            log(f"a worker is gone for good: {_short(exc, 120)}")


def _record(plan: BatchPlan, entry: RunEntry, result: dict, wall: float) -> None:
    """Copy a worker's result into the run's entry; a run the driver cannot see is not finished."""
    for key in ("status", "error", "seconds", "model_loaded", "load_seconds", "node", "pid"):
        if key in result:
            setattr(entry, key, result[key])
    entry.wall_seconds = wall
    if entry.status == "finished" and run_status(plan.root / entry.run_dir) != "finished":
        entry.status = "failed"
        entry.error = (f"finished on {entry.node}, but {plan.root / entry.run_dir}/run.json is not visible to the "
                       "driver: --out must be on storage that every node shares")
    plan.save("running")


def _cancel(ray, plan: BatchPlan, inflight: dict, log) -> None:
    """Stop the runs in progress; what has not stopped within STOP_GRACE_S is cancelled by Ray."""
    log(f"cancelling: stopping {len(inflight)} run(s) in progress (Ctrl-C again to stop waiting)")
    for entry, actor, _ in inflight.values():
        actor.stop.remote()
    deadline = time.perf_counter() + STOP_GRACE_S
    try:
        while inflight and time.perf_counter() < deadline:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_TICK_S)
            for ref in ready:
                entry, _, handed = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    result = {"status": "cancelled", "error": _short(exc)}
                _record(plan, entry, result, time.perf_counter() - handed)
    except KeyboardInterrupt:
        pass
    for ref, (entry, _, _) in inflight.items():
        try:
            ray.cancel(ref)
        except Exception:  # the actor is killed next anyway
            pass
        entry.status, entry.error = "cancelled", "cancelled"
    log(f"cancelled: {counts(plan.runs)}; continue with --resume {plan.root} --ray")


def _line(plan: BatchPlan, entry: RunEntry) -> str:
    done = sum(r.status in ("finished", "failed") for r in plan.runs)
    where = f" on {entry.node} (pid {entry.pid})" if entry.node else ""
    seconds = f" in {entry.seconds:.0f} s" if entry.seconds is not None else ""
    error = f": {entry.error}" if entry.status != "finished" and entry.error else ""
    return f"[{done}/{len(plan.runs)}] {entry.status} {entry.run_dir}{seconds}{where}{error}"


def _cause(exc: BaseException) -> str:
    """The line that says why: for an actor whose __init__ raised, the last line of its traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if getattr(exc, "actor_init_failed", False) and lines:
        return lines[-1]
    return _short(exc)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

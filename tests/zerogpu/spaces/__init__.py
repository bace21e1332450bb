"""A test stand-in for Hugging Face's `spaces` package that behaves as ZeroGPU does, on a CPU.

Put this folder first on PYTHONPATH and set SPACES_ZERO_GPU=true; `spaces.GPU` then wraps a function so
that each call, as on a ZeroGPU Space (the `spaces` 0.51 package's own code):
- evaluates `duration` (seconds, a timedelta, or a callable of the call's arguments) and refuses a request
  over the cap before anything runs ("ZeroGPU illegal duration");
- runs the function in a forked worker process: the arguments are pickled on the way in, and each value the
  function yields (or returns) is pickled on the way out (what cannot be pickled fails the call);
- turns an exception in the worker into a gr.Error that keeps only the exception's class name, as the host
  does for anything but a gr.Error;
- stops a generator at its next yield when the caller closes it (the host's stop event);
- kills a call that runs past its request ("GPU task aborted").
Each call's request is appended to $ZEROGPU_STANDIN_LOG (one JSON line), so a test can read what was asked.

Not a package of the product: the product imports the real `spaces` (requirements.txt), a no-op off ZeroGPU.
"""
from __future__ import annotations

import functools
import inspect
import json
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from datetime import timedelta

CAP_SECONDS = float(os.environ.get("ZEROGPU_STANDIN_CAP", "300"))  # the largest request a call may make
# A call is killed past its request times this: requests are sized for the host's GPU, and a test that runs the
# calls on a busy CPU gives them more wall time (the kill itself is tested at 1).
TIME_SCALE = float(os.environ.get("ZEROGPU_STANDIN_TIME_SCALE", "1"))
DEFAULT_SECONDS = 60  # the host's duration when none is given
_FORK = multiprocessing.get_context("fork")


def _on() -> bool:
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


def GPU(task=None, *, duration=None, size=None, **kwargs):  # noqa: N802 - the real package's name
    if not callable(task):
        if task is not None:  # @spaces.GPU(45)
            duration = task
        return functools.partial(GPU, duration=duration, size=size)
    if not _on():
        return task
    wrapper = _generator_wrapper if inspect.isgeneratorfunction(task) else _regular_wrapper
    return wrapper(task, duration)


def _error(title: str, message: str):
    import gradio as gr

    return gr.Error(message, title=title, print_exception=False)


def _requested(duration, args, kwargs) -> float:
    value = duration(*args, **kwargs) if callable(duration) else duration
    if value is None:
        seconds = float(DEFAULT_SECONDS)
    elif isinstance(value, timedelta):
        seconds = value.total_seconds()
    else:
        seconds = float(value)
    log = os.environ.get("ZEROGPU_STANDIN_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"seconds": seconds, "refused": seconds > CAP_SECONDS, "time": time.time()}) + "\n")
    if seconds > CAP_SECONDS:
        raise _error("ZeroGPU illegal duration",
                     f"The requested GPU duration ({seconds:.0f}s) is larger than the maximum allowed")
    return seconds


def _worker(task, payload: bytes, conn, stop, generator: bool) -> None:
    """The forked worker: run the task, send ("yield" | "return" | "error" | "end", data) back, then exit."""
    try:
        args, kwargs = pickle.loads(payload)
        if generator:
            gen = task(*args, **kwargs)
            for value in gen:
                if stop.is_set():
                    gen.close()
                    break
                conn.send(("yield", pickle.dumps(value)))
            conn.send(("end", None))
        else:
            conn.send(("return", pickle.dumps(task(*args, **kwargs))))
    except Exception as exc:  # noqa: BLE001 - reported to the caller as the host does
        import gradio as gr

        kept = (getattr(exc, "title", "Error"), str(exc)) if isinstance(exc, gr.Error) else None
        try:
            conn.send(("error", (type(exc).__name__, kept, traceback.format_exc())))
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers of the server that forked this process


class _Call:
    """One call's worker process and the end of the pipe it answers on."""

    def __init__(self, task, duration, args, kwargs, generator: bool):
        self.seconds = _requested(duration, args, kwargs)
        payload = pickle.dumps((args, kwargs))  # unpicklable arguments fail here, before the worker starts
        self.conn, child = _FORK.Pipe(duplex=False)
        self.stop = _FORK.Event()
        self.process = _FORK.Process(target=_worker, args=(task, payload, child, self.stop, generator), daemon=True)
        self.process.start()
        child.close()
        self.deadline = time.monotonic() + self.seconds * TIME_SCALE

    def receive(self):
        """The worker's next message; kills the worker past its request."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise _error("ZeroGPU worker error", f"GPU task aborted (it ran past its {self.seconds:.0f} s request)")
            if self.conn.poll(min(left, 0.5)):
                try:
                    kind, data = self.conn.recv()
                except EOFError:
                    raise _error("ZeroGPU worker error", "GPU task aborted") from None
                if kind == "error":
                    name, kept, trace = data
                    print(trace, flush=True)
                    if kept is not None:
                        raise _error(*kept)
                    raise _error("ZeroGPU worker error", name)
                return kind, data
            if not self.process.is_alive() and not self.conn.poll(0):
                raise _error("ZeroGPU worker error", "GPU task aborted")

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=5)

    def close(self, grace: float = 10.0) -> None:
        self.stop.set()
        self.process.join(timeout=grace)
        self.kill()
        self.conn.close()


def _regular_wrapper(task, duration):
    @functools.wraps(task)
    def handler(*args, **kwargs):
        call = _Call(task, duration, args, kwargs, generator=False)
        try:
            kind, data = call.receive()
            return pickle.loads(data)
        finally:
            call.close()

    handler.zerogpu = None
    return handler


def _generator_wrapper(task, duration):
    @functools.wraps(task)
    def handler(*args, **kwargs):
        call = _Call(task, duration, args, kwargs, generator=True)
        try:
            while True:
                kind, data = call.receive()
                if kind == "end":
                    return
                yield pickle.loads(data)
        finally:  # done, failed, or closed by the caller: the worker stops at its next yield, or is killed
            call.close()

    handler.zerogpu = None
    return handler

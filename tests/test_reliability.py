"""Reliability under load, cancels, faults and bad input (issue 8).

One app server on 127.0.0.1 with tiny settings (runs stop after the coarse stage, a few
seconds each), driven by several gradio_client clients at once; then in-process checks of
the pipeline, the command line and the app's handler.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

import app
import generate as cli
from conftest import tiny_config
from stages import pipeline
from stages.common import StageError
from stages.pipeline import generate
from test_app import TINY

ROOT = Path(__file__).resolve().parents[1]
QUEUE_SIZE = 3  # the server's --queue-size
SERVER_SETTINGS = [*TINY, "export.turntable=false"]
RUN = dict(preset="quick", guidance="primitives", stop_after="coarse")  # an app run: mesh and files of the coarse field
RSS_COLD_MARGIN = 300e6  # bytes the server may keep after all runs, over its size before any (the prior, torch's caches)
RSS_WARM_MARGIN = 120e6  # bytes it may keep over its size after its first run
PROMPTS = ["a green sphere", "a blue torus", "a yellow cone", "an orange cylinder", "a purple capsule",
           "a pink cube", "a brown sphere", "a gray torus", "a white cone"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, out: Path):
        self.out, self.port = out, _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, DREAMLIFT_OUTPUT_DIR=str(out), DREAMLIFT_KEEP_RUNS="100", GRADIO_ANALYTICS_ENABLED="False")
        args = [sys.executable, "app.py", "--port", str(self.port), "--queue-size", str(QUEUE_SIZE)]
        for item in SERVER_SETTINGS:
            args += ["--set", item]
        self.log_path = out.parent / f"{out.name}-server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("the app did not start: " + self.log_path.read_text()[-3000:])
                time.sleep(0.3)

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def runs(self) -> dict[Path, dict]:
        return {p.parent: json.loads(p.read_text()) for p in self.out.glob("*/run.json")}

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("reliability") / "outputs")
    srv.out.mkdir(exist_ok=True)
    srv.rss_cold = srv.rss()
    client = srv.client()
    srv.first = client.predict(prompt="a red cube", seed=0, coarse_iters=1, api_name="/generate", **RUN)  # loads the prior
    srv.rss_warm = srv.rss()
    yield srv
    srv.stop()


def _run_dir(status: str, root: Path) -> Path:
    """The run folder under `root` whose id ends the final status line '**Done** in 3 s · run `ID`'."""
    assert "Done" in status, status
    return root / status.split("`")[-2]


def _wait(condition, timeout: float, what: str, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _precheck(server, prompt, seed=0) -> str:
    """The unqueued check the Generate button runs first, called as the browser does; '' if it passed."""
    data = [prompt, "quick", str(seed), "primitives", 0, 0, 0, "coarse", ""]
    response = httpx.post(server.url + "gradio_api/run/precheck", json={"data": data, "session_hash": "test"}, timeout=30)
    assert response.status_code in (200, 500), response.text
    return response.json().get("error") or "" if response.status_code == 500 else ""


# ---- served files and hostile prompts ----------------------------------------------------------
def test_only_files_under_the_output_root_are_served(server):
    run = _run_dir(server.first[1], server.out)
    assert run.parent == server.out
    base = server.url + "gradio_api/file="
    glb = httpx.get(base + str(run / "model.glb"), timeout=30)
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"
    for path in ["/etc/passwd", str(ROOT / "app.py"), f"{server.out}/../../../../etc/passwd", str(server.log_path)]:
        response = httpx.get(base + path, timeout=30)
        assert response.status_code in (403, 404), (path, response.status_code)
        assert "root:" not in response.text and "import gradio" not in response.text


@pytest.mark.parametrize("prompt", [
    "a red cube; rm -rf ~", "$(touch /tmp/dreamlift-pwned)", "`reboot`", "../../../etc/passwd",
    "a red cube && curl http://x", "a red cube | tee /tmp/dreamlift-pwned",
])
def test_hostile_prompts_are_refused_before_any_folder_is_made(server, prompt):
    before = sorted(server.out.iterdir())
    with pytest.raises(Exception) as err:
        server.client().predict(prompt=prompt, seed=1, api_name="/generate", **RUN)
    for message in (str(err.value), _precheck(server, prompt)):
        assert "vocabulary" in message and "torus" in message and "Traceback" not in message
    assert sorted(server.out.iterdir()) == before
    assert not Path("/tmp/dreamlift-pwned").exists()
    assert server.proc.poll() is None


# ---- cancel --------------------------------------------------------------------------------------
def test_cancel_stops_the_worker_and_the_next_run_starts(server):
    a_client, b_client, c_client = server.client(), server.client(), server.client()
    a = a_client.submit(prompt="a red cube", seed=501, coarse_iters=5000, api_name="/generate", **RUN)
    _wait(lambda: any("Coarse NeRF** · step" in str(o[1]) for o in a.outputs() if len(o) > 1), 60,
          "the long run to stream coarse steps")
    b = b_client.submit(prompt="a blue sphere", seed=502, coarse_iters=1, api_name="/generate", **RUN)
    c = c_client.submit(prompt="a green cone", seed=503, coarse_iters=1, api_name="/generate", **RUN)
    _wait(lambda: all(j.status().code.name == "IN_QUEUE" for j in (b, c)), 30, "two runs waiting")

    c.cancel()  # a waiting run: removed from the queue, never started
    start = time.time()
    a.cancel()  # a running run: Gradio closes the generator, the pipeline's worker stops
    a_dir = _wait(lambda: next((p for p, r in server.runs().items() if r["seed"] == 501 and r["status"] != "running"), None),
                  5, "the cancelled run's run.json to leave 'running'")
    stopped_after = time.time() - start
    a_record = json.loads((a_dir / "run.json").read_text())
    assert a_record["status"] == "cancelled" and "coarse" in a_record["error"], a_record.get("error")
    assert stopped_after < 5
    assert not list(a_dir.glob("model.*")) and not list(a_dir.glob(".*.tmp")) and not (a_dir / "coarse.pt").exists()

    b_dir = _run_dir(b.result(timeout=120)[1], server.out)
    b_record = json.loads((b_dir / "run.json").read_text())
    assert b_record["status"] == "finished" and b_record["seed"] == 502
    assert b_record["started_at"] >= a_record["ended_at"]  # the device was free when the next run began
    assert not [p for p, r in server.runs().items() if r["seed"] == 503]  # the cancelled waiting run left nothing
    assert server.proc.poll() is None


# ---- load ----------------------------------------------------------------------------------------
def test_many_clients_queue_in_order_overflow_is_refused_and_nothing_is_mixed_up(server):
    from gradio_client.utils import QueueError

    runs_before = set(server.runs())
    clients = [server.client() for _ in range(len(PROMPTS) + 1)]
    # 1. A longer run holds the device, then 9 clients submit at the same moment. (A white object:
    # its prior renders on a dark background, which must not cost a second library in memory.)
    blocker = clients[0].submit(prompt="a white cone", seed=700, coarse_iters=6, api_name="/generate", **RUN)
    _wait(lambda: blocker.status().code.name in ("PROCESSING", "ITERATING", "PROGRESS"), 60, "the first run to start")
    jobs, gate = [None] * len(PROMPTS), threading.Barrier(len(PROMPTS))

    def submit(i):
        gate.wait()
        jobs[i] = clients[i + 1].submit(prompt=PROMPTS[i], seed=701 + i, coarse_iters=1, api_name="/generate", **RUN)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # 2. The first QUEUE_SIZE wait with their positions; the rest are told the queue is full.
    def settled():
        statuses = [j.status() for j in jobs]
        refused = [i for i, j in enumerate(jobs) if j.done() and isinstance(j.exception(), QueueError)]
        waiting = {i: s.rank for i, s in enumerate(statuses) if s.code.name == "IN_QUEUE"}
        if len(refused) + len(waiting) == len(jobs) and sorted(waiting.values()) == list(range(len(waiting))):
            return refused, waiting, statuses
        return None

    refused, waiting, statuses = _wait(settled, 30, "every job to be queued or refused")
    assert len(waiting) == QUEUE_SIZE and len(refused) == len(PROMPTS) - QUEUE_SIZE
    assert all(statuses[i].queue_size is not None and statuses[i].queue_size > statuses[i].rank for i in waiting)
    for i in refused:
        assert "queue is full" in str(jobs[i].exception()).lower()
    # What the browser's Generate button shows (Gradio's own answer there is "busy"); bad input is named first.
    assert f"queue is full: {QUEUE_SIZE} runs are waiting (the limit is {QUEUE_SIZE})" in _precheck(server, "a red cube")
    assert "vocabulary" in _precheck(server, "a red teapot")

    # 3. Every accepted run finishes with its own prompt and seed, one at a time, in arrival order.
    order = [blocker] + [jobs[i] for i in sorted(waiting, key=waiting.get)]
    expected = [("a white cone", 700)] + [(PROMPTS[i], 701 + i) for i in sorted(waiting, key=waiting.get)]
    records = []
    for job, (prompt, seed) in zip(order, expected):
        run = _run_dir(job.result(timeout=240)[1], server.out)
        record = json.loads((run / "run.json").read_text())
        assert (record["prompt"], record["seed"], record["status"]) == (prompt, seed, "finished")
        assert (run / "model.glb").is_file()
        records.append(record)
    for earlier, later in zip(records, records[1:]):
        assert later["started_at"] >= earlier["ended_at"]
    assert len(set(server.runs()) - runs_before) == 1 + QUEUE_SIZE  # no run for a refused job, none lost

    # 4. Memory comes back: the server keeps its model and caches, not the runs.
    bound = min(server.rss_cold + RSS_COLD_MARGIN, server.rss_warm + RSS_WARM_MARGIN)
    deadline = time.time() + 10
    while (rss := server.rss()) > bound and time.time() < deadline:
        time.sleep(0.5)
    print(f"server RSS: cold {server.rss_cold / 1e6:.0f} MB, after one run {server.rss_warm / 1e6:.0f} MB, "
          f"after {len(records) + 2} more {rss / 1e6:.0f} MB")
    assert rss <= bound
    assert server.proc.poll() is None


# ---- the pipeline: cancel by closing, faults -------------------------------------------------------
def test_closing_returns_fast_and_the_next_run_waits_for_the_device(tmp_path, monkeypatch):
    real = pipeline.guidance_for
    slow = {"first": True}

    def slow_guidance(*args):
        if slow.pop("first", False):
            time.sleep(2.0)  # a long load that cannot look at the stop flag
        return real(*args)

    monkeypatch.setattr(pipeline, "guidance_for", slow_guidance)
    first = generate("a red cube", tiny_config(), run_dir=tmp_path / "first", close_wait=0.2)
    assert "loading" in next(first).message
    start = time.time()
    first.close()  # what Gradio does on Cancel, in its event loop
    assert time.time() - start < 1.0
    second = tiny_config(stop_after="coarse")
    second.coarse.iters, second.export.turntable = 1, False
    events = list(generate("a blue cube", second, run_dir=tmp_path / "second"))
    assert any("waiting for the previous run" in e.message for e in events) and events[-1].stage == "done"
    a = json.loads((tmp_path / "first" / "run.json").read_text())
    b = json.loads((tmp_path / "second" / "run.json").read_text())
    assert a["status"] == "cancelled" and not list((tmp_path / "first").glob("model.*"))
    assert b["status"] == "finished" and b["started_at"] >= a["ended_at"]
    assert len([t for t in threading.enumerate() if t.name.startswith("dreamlift-cpu")]) == 1  # one worker, reused


def _frames(exc: BaseException) -> list[str]:
    files, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__
    return files


class _NaNGuidance:
    """A real guidance model whose noise predictions turn NaN once `on` is set."""

    def __init__(self, inner, on):
        self.inner, self.on = inner, on

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_noise(self, x_t, t, cond):
        eps = self.inner.predict_noise(x_t, t, cond)
        return torch.full_like(eps, float("nan")) if self.on["nan"] else eps


def test_non_finite_loss_in_refine_names_the_stage_and_step_and_frees_the_frames(tmp_path, monkeypatch):
    on = {"nan": False}
    real_guidance, real_refine = pipeline.guidance_for, pipeline.refine_stage.run

    def refine_with_nan(*args, **kwargs):
        on["nan"] = True
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(pipeline, "guidance_for", lambda *a: _NaNGuidance(real_guidance(*a), on))
    monkeypatch.setattr(pipeline.refine_stage, "run", refine_with_nan)
    config = tiny_config()
    config.refine.max_nonfinite_steps = 2  # NaN at every step: skipped once, then the stage ends
    with pytest.raises(StageError, match=r"refine stage failed at step 2: .*2 steps in a row were not finite") as err:
        list(generate("a red cube", config, run_dir=tmp_path / "run"))
    # The stages' frames (and the tensors they hold) are not kept alive by the exception.
    assert not [f for f in _frames(err.value) if f.endswith(("refine.py", "coarse.py"))]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "refine stage failed at step" in record["error"]
    assert "refine.py" in record["traceback"]  # the text is kept for debugging
    assert (tmp_path / "run" / "coarse.pt").is_file() and not (tmp_path / "run" / "refine.pt").exists()


def test_a_non_finite_step_now_and_then_is_skipped_counted_and_the_run_finishes(tmp_path, monkeypatch):
    """fp16 overflows: NaN noise predictions at two separate coarse steps are skipped, not fatal."""
    calls = {"n": 0}
    real_guidance = pipeline.guidance_for

    class Flaky(_NaNGuidance):
        def predict_noise(self, x_t, t, cond):
            calls["n"] += 1
            self.on["nan"] = calls["n"] in (2, 4)
            return super().predict_noise(x_t, t, cond)

    monkeypatch.setattr(pipeline, "guidance_for", lambda *a: Flaky(real_guidance(*a), {"nan": False}))
    config = tiny_config()
    config.coarse.max_nonfinite_steps = 2  # two in all, but never two in a row
    events = list(generate("a red cube", config, run_dir=tmp_path / "run"))
    assert events[-1].stage == "done"
    assert any("skipped: non-finite" in e.message for e in events if e.stage == "coarse")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "finished"
    assert record["nonfinite_skipped"] == {"coarse": 2, "refine": 0}
    assert record["stage_stats"]["coarse"]["nonfinite_skipped"] == 2


@pytest.mark.parametrize("stage, error, hint", [
    ("coarse", torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "coarse.resolution"),
    ("refine", MemoryError(), "refine.grid_resolution"),
])
def test_out_of_memory_is_caught_and_names_the_setting_to_lower(tmp_path, monkeypatch, stage, error, hint):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(getattr(pipeline, f"{stage}_stage"), "run", oom)
    with pytest.raises(StageError, match=rf"{stage} stage failed: out of memory.*{hint}"):
        list(generate("a red cube", tiny_config(), run_dir=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_cli_resume_finishes_a_run_whose_refine_crashed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["a green cube", "--guidance", "primitives", "--out", str(out), "--set", "export.turntable=false"]
    argv += [a for item in [*TINY, "coarse.iters=1", "refine.iters=1"] for a in ("--set", item)]

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pipeline.refine_stage, "run", crash)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "error: refine stage failed: simulated crash"  # after the coarse stage's bar
    assert "Traceback" not in err
    assert (out / "coarse.pt").is_file() and not list(out.glob("model.*"))
    monkeypatch.undo()

    def no_coarse(*args, **kwargs):
        raise AssertionError("the coarse stage must not run again on resume")

    monkeypatch.setattr(pipeline.coarse_stage, "run", no_coarse)
    assert cli.main(["--resume", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["finished_stages"] == ["coarse", "refine", "export"]
    assert record["prompt"] == "a green cube" and (out / "model.glb").is_file()


def test_cli_checks_every_prompt_of_a_file_before_the_first_run(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n# fine\na ceramic teapot\n")
    code = cli.main(["--prompts", str(prompts), "--guidance", "primitives", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "line 3" in err and "vocabulary" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


# ---- the app's handler in-process: disk bounds, one folder per run, no shell ------------------------
def _fake_run(root: Path, name: str, size: int, age: float, status: str = "finished") -> Path:
    path = root / name
    path.mkdir()
    (path / "model.glb").write_bytes(b"x" * size)
    (path / "run.json").write_text(json.dumps({"status": status}))
    stamp = time.time() - age
    os.utime(path / "run.json", (stamp, stamp))
    return path


def test_app_run_prunes_old_runs_by_count_and_bytes_writes_one_folder_and_runs_no_shell(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    root.mkdir()
    _fake_run(root, "running-old", 10, age=500, status="running")  # never pruned
    for i in range(4):
        _fake_run(root, f"old{i}", 1_000_000, age=400 - i)
    monkeypatch.setattr(app, "OUTPUT_ROOT", root)
    monkeypatch.setattr(app, "KEEP_RUNS", 4)  # keeps 3 earlier runs, then bytes: 2.5 MB keeps 2
    monkeypatch.setattr(app, "MAX_OUTPUT_BYTES", 2_500_000)
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY))  # with the turntable video (ffmpeg)
    calls = []
    real_popen = subprocess.Popen

    class RecordingPopen(real_popen):
        def __init__(self, args, *rest, **kwargs):
            calls.append((args, kwargs.get("shell", False)))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    monkeypatch.setattr(os, "system", lambda *a: pytest.fail("os.system was called"))
    prompt = "A  Red Cube."
    outputs = list(app.generate(prompt, "quick", "9", "primitives", 1, 0, 0, "coarse"))
    gallery, status, model, files = outputs[-1][:4]
    run = _run_dir(status, root)
    assert sorted(p.name for p in root.iterdir()) == sorted(["running-old", "old2", "old3", run.name])
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]  # nothing written beside the output root
    assert run.parent == root and "-a-red-cube-s9-" in run.name
    assert model == str(run / "model.glb") and all(Path(f).parent == run for f in files)
    assert (run / "turntable.mp4").is_file() and calls, "the turntable video should have run ffmpeg"
    for args, shell in calls:
        assert shell is False and not isinstance(args, str)
        assert not any("red cube" in str(a).lower() for a in args)  # file names carry the slug, never the prompt


def test_app_answers_out_of_memory_with_a_readable_error(monkeypatch, tmp_path):
    import gradio as gr

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY))
    monkeypatch.setattr(pipeline.coarse_stage, "run", oom)
    with pytest.raises(gr.Error, match="out of memory.*coarse.resolution") as err:
        list(app.generate("a red cube", "quick", "0", "primitives", 0, 0, 0, "export"))
    assert "Traceback" not in str(err.value)


def test_app_refuses_bad_server_settings():
    for argv in (["--keep-runs", "0"], ["--max-output-gb", "-1"], ["--queue-size", "0"]):
        with pytest.raises(SystemExit) as err:
            app.main(argv)
        assert err.value.code == 2


def test_resume_of_a_folder_that_is_not_a_run_fails_at_once(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a DreamLift run folder"):
        list(generate("a red cube", tiny_config(), run_dir=tmp_path, resume=True))
    assert cli.main(["--resume", str(tmp_path)]) == 1
    assert "not a DreamLift run folder" in capsys.readouterr().err

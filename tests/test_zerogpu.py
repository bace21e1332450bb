"""The ZeroGPU contract, on a CPU: the cost model's requests, the stand-in host (tests/zerogpu/spaces), and
a run as a chain of forked GPU calls (a call per SDS stage, the export in the calling process)."""
from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import pytest

from helpers import TINY_SETTINGS
from stages.config import PRESETS, apply_overrides, preset

STANDIN = Path(__file__).resolve().parent / "zerogpu"


@pytest.fixture(autouse=True)
def uncalibrated(monkeypatch):
    """Each test starts from the cost model alone (a hosted run teaches gpu_budget this machine's rates)."""
    from stages import gpu_budget

    monkeypatch.setattr(gpu_budget, "CALIBRATION", {})


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """The stand-in `spaces` module, switched on; its request log."""
    import importlib.util

    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setenv("ZEROGPU_STANDIN_LOG", str(tmp_path / "requests.jsonl"))
    spec = importlib.util.spec_from_file_location("standin_spaces", STANDIN / "spaces" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _requests(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# ----------------------------------------------------------------------------------------------- the cost model
def test_the_zerogpu_default_preset_fits_every_call_and_an_anonymous_quota():
    from stages.gpu_budget import (
        ZEROGPU_CALL_CAP,
        ZEROGPU_PRESET,
        ZEROGPU_QUOTAS,
        call_requests,
        check_fits,
        projected_seconds,
    )

    config = preset(ZEROGPU_PRESET)
    requests = call_requests(config, "stable-diffusion")
    assert [stage for stage, _ in requests] == ["coarse", "refine"]
    assert all(0 < seconds <= ZEROGPU_CALL_CAP for _, seconds in requests), requests
    assert projected_seconds(config, "stable-diffusion") <= 120
    assert sum(seconds for _, seconds in requests) <= ZEROGPU_QUOTAS["anonymous visitor"], requests
    check_fits(config, "stable-diffusion")  # no error


def test_a_run_over_the_cap_is_refused_naming_the_preset_that_fits():
    from stages.gpu_budget import check_fits

    with pytest.raises(ValueError, match=r"refine stage would ask for \d+ s .* choose the 'fast' preset"):
        check_fits(preset("standard"), "stable-diffusion")
    config = apply_overrides(preset("fast"), ["coarse.iters=20000"])
    with pytest.raises(ValueError, match="coarse stage would ask for"):
        check_fits(config, "stable-diffusion")


def test_requests_follow_the_settings_and_never_pass_the_cap():
    from stages.config import to_dict
    from stages.gpu_budget import ZEROGPU_CALL_CAP, call_requests, request_seconds

    fast = preset("fast")
    longer = apply_overrides(preset("fast"), ["refine.iters=400"])
    assert dict(call_requests(longer, "stable-diffusion"))["refine"] > dict(call_requests(fast, "stable-diffusion"))["refine"]
    assert dict(call_requests(fast, "deepfloyd-if"))["coarse"] != dict(call_requests(fast, "stable-diffusion"))["coarse"]
    coarse_only = apply_overrides(preset("fast"), ["stop_after=coarse"])
    assert [s for s, _ in call_requests(coarse_only, "stable-diffusion")] == ["coarse"]
    payload = {"prompt": "a teapot", "guidance": "stable-diffusion", "config": to_dict(preset("high"))}
    assert request_seconds(payload, "/tmp/x", "refine", False) == ZEROGPU_CALL_CAP  # clipped (refused before, in the app)
    payload["config"] = to_dict(fast)
    assert request_seconds(payload, "/tmp/x", "coarse", True) == dict(call_requests(fast, "stable-diffusion"))["coarse"]


def test_requests_follow_the_rate_measured_on_this_host():
    from stages import gpu_budget

    config = preset("fast")
    before = dict(gpu_budget.call_requests(config, "stable-diffusion"))
    modelled = gpu_budget.modelled_step_seconds(config, "stable-diffusion", "coarse")
    assert gpu_budget.calibrate("stable-diffusion", "coarse", config, [(n, n * modelled) for n in range(1, 5)]) is None
    reports = [(n, 2.0 * modelled * n) for n in range(1, 40)]  # twice the model's time per step
    assert gpu_budget.calibrate("stable-diffusion", "coarse", config, reports) == pytest.approx(2.0)
    after = dict(gpu_budget.call_requests(config, "stable-diffusion"))
    assert after["coarse"] > before["coarse"] and after["refine"] == before["refine"]
    assert gpu_budget.calibrate("stable-diffusion", "coarse", config, [(n, 100.0 * n) for n in range(1, 40)]) == 4.0  # clipped
    with pytest.raises(ValueError, match="coarse stage would ask for"):
        gpu_budget.check_fits(apply_overrides(preset("fast"), ["coarse.iters=1500"]), "stable-diffusion")


@pytest.mark.parametrize("name", PRESETS)
def test_the_cost_model_grows_with_the_work(name):
    from stages.gpu_cost import CARDS, run_gpu_seconds

    config = preset(name)
    bigger = apply_overrides(preset(name), [f"coarse.iters={2 * config.coarse.iters}"])
    for card in CARDS.values():
        assert run_gpu_seconds(bigger, card) > run_gpu_seconds(config, card) > 0
    assert run_gpu_seconds(config, CARDS["zerogpu"]) > run_gpu_seconds(config, CARDS["h100"])  # a slice is slower


# ----------------------------------------------------------------------------------------------- the stand-in host
def _double_all(values):
    for v in values:
        yield 2 * v


def _sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


def _fail():
    raise KeyError("a message the host does not pass on")


def test_the_standin_forks_pickles_and_keeps_only_an_exceptions_class_name(standin):
    import gradio as gr

    double = standin.GPU(duration=5)(_double_all)
    assert list(double([1, 2, 3])) == [2, 4, 6]
    sleeper = standin.GPU(duration=5)(_sleep)
    assert sleeper(0) != os.getpid()  # ran in another process
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        list(double(lambda: None))  # a lambda cannot cross
    with pytest.raises(gr.Error) as caught:
        standin.GPU(duration=5)(_fail)()
    assert "KeyError" in caught.value.message and "does not pass on" not in caught.value.message


def test_the_standin_refuses_a_request_over_the_cap_and_kills_a_call_past_its_request(standin, tmp_path):
    import gradio as gr

    with pytest.raises(gr.Error, match="larger than the maximum"):
        standin.GPU(duration=lambda s: 301)(_sleep)(0)
    start = time.monotonic()
    with pytest.raises(gr.Error, match="aborted"):
        standin.GPU(duration=1)(_sleep)(30)
    assert time.monotonic() - start < 10
    assert [r["seconds"] for r in _requests(tmp_path / "requests.jsonl")] == [301, 1]


# ----------------------------------------------------------------------------------------------- a run as GPU calls
def _tiny_plan(prompt="a red cube"):
    from stages.plan import resolve

    config = apply_overrides(preset("quick"), TINY_SETTINGS)
    config.guidance, config.device = "primitives", "cpu"
    return resolve(prompt, config)


@pytest.fixture
def hosted(standin, monkeypatch):
    """app_gpu's stage call wrapped by the stand-in host (as `spaces.GPU` wraps it on a Space)."""
    import app_gpu
    from stages import gpu_budget

    monkeypatch.setenv("ZEROGPU_STANDIN_TIME_SCALE", "20")  # tiny CPU runs on a busy machine, not a GPU
    monkeypatch.setattr(standin, "TIME_SCALE", 20.0)
    monkeypatch.setattr(app_gpu, "gpu_stage_call", standin.GPU(duration=gpu_budget.request_seconds)(app_gpu.stage_call))
    return app_gpu


def test_a_run_is_a_gpu_call_per_stage_then_the_export_here(hosted, tmp_path):
    from stages.runs import new_run_dir

    plan = _tiny_plan()
    run_dir = new_run_dir(tmp_path, plan.prompt, 0)
    events = list(hosted.hosted_events(plan, str(run_dir), lambda: False))
    stages = [e.stage for e in events]
    assert stages[-1] == "done" and {"coarse", "refine", "export"} <= set(stages)
    assert any(e.preview is not None for e in events if e.stage == "coarse")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["finished_stages"] == ["coarse", "refine", "export"]
    assert record["stage_calls"] == 2 and record["device"] == "cpu"
    assert set(record["guidance_facts"]) == set(record["peak_memory"]) == {"coarse", "refine"}  # each call's own
    assert record["device_facts"]["gpu"] is None and record["device_facts"]["raster_backend"] == "torch"  # on the CPU
    assert all(Path(p).is_file() for p in events[-1].paths.values())
    elapsed = [e.elapsed for e in events]
    assert elapsed == sorted(elapsed)  # the run's clock across the calls, not each call's own
    requests = _requests(tmp_path / "requests.jsonl")
    from stages.gpu_budget import call_requests

    assert [r["seconds"] for r in requests] == [s for _, s in call_requests(plan.config, "primitives")]


def test_a_cancel_reaches_the_worker_through_the_run_folder(hosted, tmp_path):
    from stages.common import Cancelled
    from stages.runs import new_run_dir, request_stop

    plan = _tiny_plan()
    plan.config.coarse.iters = 400  # long enough to be cancelled mid-stage
    run_dir = new_run_dir(tmp_path, plan.prompt, 0)
    seen, outcome = [], {}

    def drive():
        try:
            for event in hosted.hosted_events(plan, str(run_dir), lambda: False):
                seen.append(event)
        except Cancelled as exc:
            outcome["cancelled"] = (str(exc), time.monotonic())

    thread = threading.Thread(target=drive)
    thread.start()
    deadline = time.monotonic() + 120
    while not any(e.stage == "coarse" and e.step >= 2 for e in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    asked = time.monotonic()
    request_stop(run_dir)
    thread.join(timeout=60)
    assert "cancelled" in outcome, [e.stage for e in seen[-3:]]
    assert outcome["cancelled"][1] - asked < 5
    assert json.loads((run_dir / "run.json").read_text())["status"] == "cancelled"


def test_a_failure_in_a_gpu_call_comes_back_as_an_event_with_its_message(hosted, tmp_path):
    from stages.plan import plan_payload
    from stages.runs import new_run_dir

    plan = _tiny_plan()
    run_dir = new_run_dir(tmp_path, plan.prompt, 0)
    events = list(hosted.gpu_stage_call(plan_payload(plan), str(run_dir), "refine", True))  # refine before coarse
    assert events[-1].stage == "failed" and "coarse stage is not finished" in events[-1].message
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------------------------- the app on a stand-in Space
@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tiny_pipelines import save_tiny_sd

    return str(save_tiny_sd(tmp_path_factory.mktemp("tiny-sd")))


@pytest.mark.server
@pytest.mark.slow
def test_the_app_on_a_zerogpu_space_runs_stable_diffusion_cancels_and_runs_again(tiny_sd, tmp_path):
    """What a Space owner sees with the real host's rules (the stand-in): a tiny SD run start to finish, a run
    over the cap refused at once, a cancel that stops the worker within seconds, and a second run after it."""
    from helpers import ROOT, launch_app, run_dir_from_status

    log = tmp_path / "requests.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(STANDIN), str(ROOT)]), "SPACES_ZERO_GPU": "true", "HF_HUB_OFFLINE": "1",
           "ZEROGPU_STANDIN_LOG": str(log), "ZEROGPU_STANDIN_TIME_SCALE": "20"}
    steps = [a for item in ["coarse.iters=3", "refine.iters=2", "refine.resolution=32"] for a in ("--set", item)]
    args = dict(prompt="a red cube", preset="fast", seed=0, guidance="stable-diffusion", model_id="")
    with launch_app(tmp_path, ["--model-id", tiny_sd, *steps], env) as (client, proc):
        gallery, status, model, files, latest, run_id = client.predict(**args, api_name="/generate")[:6]
        run_dir = run_dir_from_status(status, tmp_path)
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "finished" and record["guidance"] == "stable-diffusion" and record["stage_calls"] == 2
        assert model.endswith("model.glb") and sorted(Path(f).name for f in files) == ["model.glb", "model.zip"]
        assert gallery and latest is not None  # previews came back through the calls
        assert [r["refused"] for r in _requests(log)] == [False, False]

        with pytest.raises(Exception, match="choose the 'fast' preset"):
            client.predict(**dict(args, preset="standard", coarse_iters=20000), api_name="/generate")
        assert len(_requests(log)) == 2  # refused before any GPU call

        job = client.submit(**dict(args, coarse_iters=2000), api_name="/generate")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any((d / "coarse.pt").exists() or _step_seen(d) for d in _runs(tmp_path, run_dir)):
            time.sleep(0.2)
        cancelled = _runs(tmp_path, run_dir)[0]
        job.cancel()
        asked = time.monotonic()
        while time.monotonic() < asked + 30 and json.loads((cancelled / "run.json").read_text())["status"] == "running":
            time.sleep(0.2)
        assert json.loads((cancelled / "run.json").read_text())["status"] == "cancelled"
        assert time.monotonic() - asked < 10

        status = client.predict(**dict(args, prompt="a blue sphere"), api_name="/generate")[1]
        assert json.loads((run_dir_from_status(status, tmp_path) / "run.json").read_text())["status"] == "finished"
        assert proc.poll() is None


def _runs(root: Path, *besides: Path) -> list[Path]:
    return [d for d in root.iterdir() if (d / "run.json").exists() and d not in besides]


def _step_seen(run_dir: Path) -> bool:
    return json.loads((run_dir / "run.json").read_text()).get("started_at") is not None


def test_the_zerogpu_table_exits_0_only_when_the_default_preset_fits(monkeypatch, capsys):
    from bench import zerogpu_plan
    from bench.gpu_check import main

    assert main(["--zerogpu"]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "standard" in out and "OK" in out
    monkeypatch.setattr(zerogpu_plan, "ZEROGPU_PRESET", "standard")
    assert main(["--zerogpu"]) == 1
    assert "FAILS" in capsys.readouterr().out

"""Batch generation on a local Ray cluster of 2 one-CPU workers, with tiny run settings."""
import json
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray batch tests: pip install -r requirements-ray.txt")

import generate as cli  # noqa: E402
from batch import ray_runner  # noqa: E402
from batch.plan import BATCH_FILE, load_plan, new_plan  # noqa: E402
from helpers import TINY_CLI_SETTINGS, tiny_run_config  # noqa: E402

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a yellow torus"]
TINY = ["--guidance", "primitives", *TINY_CLI_SETTINGS]


@pytest.fixture(scope="module")
def cluster():
    """A local cluster of 2 CPUs (2 worker slots), started and stopped by the tests."""
    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    yield ray_runner.open_cluster(None, "cpu", 1)  # joins the cluster above
    ray.shutdown()


def _short_config():
    """tiny_run_config, and shorter still: the coarse stage's mesh exported, no turntable."""
    config = tiny_run_config(stop_after="coarse")
    config.export.turntable = False
    return config


def _prompts_file(tmp_path, lines):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch(root):
    return json.loads((root / BATCH_FILE).read_text())


def _run_json(folder):
    return json.loads((folder / "run.json").read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_four_prompts_on_two_workers_write_what_the_serial_batch_writes(cluster, tmp_path):
    prompts = _prompts_file(tmp_path, PROMPTS)
    serial, batch = tmp_path / "serial", tmp_path / "ray"
    assert cli.main(["--prompts", str(prompts), "--out", str(serial), *TINY]) == 0
    assert cli.main(["--prompts", str(prompts), "--out", str(batch), "--ray", *TINY]) == 0

    folders = sorted(p.name for p in serial.iterdir())
    assert len(folders) == 4
    assert sorted(p.name for p in batch.iterdir() if p.is_dir()) == folders
    for name in folders:
        assert sorted(p.name for p in (batch / name).iterdir()) == sorted(p.name for p in (serial / name).iterdir())
        ours, theirs = _run_json(batch / name), _run_json(serial / name)
        assert set(ours) == set(theirs)
        assert ours["status"] == "finished" and ours["prompt"] == theirs["prompt"]
        assert ours["config"] == theirs["config"] and ours["device"] == theirs["device"]

    record = _batch(batch)
    runs = record["runs"]
    assert record["status"] == "finished" and [r["run_dir"] for r in runs] == folders
    assert all(r["status"] == "finished" and r["attempts"] == 1 and r["error"] is None for r in runs)
    assert all(r["seconds"] > 0 and r["node"] for r in runs)
    pids = {r["pid"] for r in runs}
    assert len(pids) == 2  # both workers ran
    for pid in pids:  # each worker loaded the guidance model for its first run only
        loaded = [r["model_loaded"] for r in runs if r["pid"] == pid]
        assert loaded[0] is True and not any(loaded[1:])
    assert sum(r["model_loaded"] for r in runs) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_loses_no_run(cluster, tmp_path):
    plan = new_plan(tmp_path, PROMPTS[:3], _short_config())
    killed = []

    def kill_first_run_mid_way(entry, pid):
        if entry.index != 0 or killed:
            return
        run_json, deadline = tmp_path / entry.run_dir / "run.json", time.monotonic() + 120
        while time.monotonic() < deadline:  # until the run has started on the worker
            if run_json.exists() and _run_json(run_json.parent)["status"] == "running":
                break
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    ray_runner.run_batch(plan, cluster, on_dispatch=kill_first_run_mid_way, log=lambda *_: None)
    assert killed
    record = _batch(tmp_path)
    assert record["status"] == "finished"
    first = record["runs"][0]
    assert first["status"] == "finished" and first["attempts"] == 2 and first["pid"] != killed[0]
    assert all(r["status"] == "finished" for r in record["runs"])
    for run in record["runs"]:
        folder = tmp_path / run["run_dir"]
        assert _run_json(folder)["status"] == "finished"
        assert (folder / "model.glb").is_file() and (folder / "model.obj").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_bad_prompts_are_all_reported_before_any_run_starts(cluster, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(ray_runner, "start_workers", lambda *args: started.append(args))
    prompts = _prompts_file(tmp_path, ["a red cube", "", "a ceramic teapot", "# fine", "a red\tcube", "x" * 400])
    out = tmp_path / "out"
    code = cli.main(["--prompts", str(prompts), "--out", str(out), "--ray", *TINY])
    err = capsys.readouterr().err.strip()
    assert code == 1 and started == []
    assert err.startswith("error:") and "\n" not in err
    assert "3 bad prompts" in err and "line 3" in err and "line 5" in err and "line 6" in err
    assert "line 1:" not in err
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_a_failing_run_is_recorded_and_resume_runs_only_the_unfinished(cluster, tmp_path):
    plan = new_plan(tmp_path, PROMPTS[:3], _short_config())
    blocker = tmp_path / plan.runs[1].run_dir
    blocker.write_text("a file where the run's folder should go")  # the run raises when it makes its folder
    ray_runner.run_batch(plan, cluster, log=lambda *_: None)
    record = _batch(tmp_path)
    assert record["status"] == "failed"
    assert [r["status"] for r in record["runs"]] == ["finished", "failed", "finished"]
    assert "exists" in record["runs"][1]["error"].lower()

    blocker.unlink()
    finished = {r["run_dir"]: (tmp_path / r["run_dir"] / "run.json").stat().st_mtime_ns
                for r in record["runs"] if r["status"] == "finished"}
    handed = []
    ray_runner.run_batch(load_plan(tmp_path), cluster, resume=True, log=lambda *_: None,
                         on_dispatch=lambda entry, pid: handed.append(entry.index))
    assert handed == [1]
    assert _batch(tmp_path)["status"] == "finished"
    for name, mtime in finished.items():  # the finished runs were not touched
        assert (tmp_path / name / "run.json").stat().st_mtime_ns == mtime


@pytest.mark.ray
@pytest.mark.slow
def test_cancel_leaves_unstarted_runs_pending_and_resume_finishes_them(cluster, tmp_path):
    plan = new_plan(tmp_path, PROMPTS, _short_config())
    handed = []
    with pytest.raises(KeyboardInterrupt):
        ray_runner.run_batch(plan, cluster, log=lambda *_: None, should_stop=lambda: len(handed) >= 2,
                             on_dispatch=lambda entry, pid: handed.append(entry.index))
    record = _batch(tmp_path)
    statuses = [r["status"] for r in record["runs"]]
    assert record["status"] == "cancelled" and handed == [0, 1]
    assert statuses[2:] == ["pending", "pending"] and set(statuses[:2]) <= {"cancelled", "finished"}
    for run in record["runs"][:2]:  # a stopped run says so in its own run.json too
        assert _run_json(tmp_path / run["run_dir"])["status"] == run["status"]

    resumed = ray_runner.run_batch(load_plan(tmp_path), cluster, resume=True, log=lambda *_: None)
    assert all(r.status == "finished" for r in resumed.runs)
    assert all((tmp_path / r.run_dir / "model.glb").is_file() for r in resumed.runs)


@pytest.mark.ray
@pytest.mark.slow
def test_a_worker_that_cannot_see_the_output_folder_says_so(cluster, tmp_path):
    with pytest.raises(RuntimeError, match="could not start: .*not visible on .*--out must be on storage"):
        ray_runner.start_workers(cluster, tmp_path / "not-shared", 1)


def test_resume_counts_a_run_finished_only_when_its_own_run_json_says_so(tmp_path):
    plan = new_plan(tmp_path, PROMPTS[:3], tiny_run_config())
    for entry, status in zip(plan.runs, ["finished", "finished", "running"]):
        entry.status = status
    (tmp_path / plan.runs[0].run_dir).mkdir()
    (tmp_path / plan.runs[0].run_dir / "run.json").write_text(json.dumps({"status": "finished"}))
    plan.save("cancelled")  # run 1 claims to be finished but has no folder; run 2 was cut off
    with pytest.raises(ValueError, match="already holds a batch"):
        new_plan(tmp_path, PROMPTS[:3], tiny_run_config())
    resumed = load_plan(tmp_path)
    assert [r.status for r in resumed.runs] == ["finished", "pending", "pending"]
    assert [r.index for r in resumed.todo()] == [1, 2]
    assert resumed.config.prior.resolution == 16 and resumed.runs[2].prompt == PROMPTS[2]

import json
import os
import time

import pytest

from stages.runs import list_runs, new_run_dir, prune_runs, slugify


def test_slug_is_file_name_safe():
    assert slugify("a red cube") == "a-red-cube"
    for nasty in ["../../etc/passwd", "a; rm -rf / #", "ünïcödé ☃", "   ", "CON", "a\x00b", "x" * 500]:
        slug = slugify(nasty)
        assert slug and len(slug) <= 40
        assert all(c.isascii() and (c.isalnum() or c == "-") for c in slug)
        assert ".." not in slug and "/" not in slug


def test_run_dirs_stay_under_the_root(tmp_path):
    a = new_run_dir(tmp_path, "../../escape attempt", 3)
    b = new_run_dir(tmp_path, "../../escape attempt", 3)
    assert a != b
    for path in (a, b):
        assert path.parent == tmp_path and path.is_dir()


def _fake_run(root, name, status="finished", size=10):
    path = root / name
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"status": status}))
    (path / "model.glb").write_bytes(b"x" * size)
    return path


def test_prune_keeps_the_newest_and_spares_running(tmp_path):
    runs = []
    for i in range(5):
        runs.append(_fake_run(tmp_path, f"run{i}", status="running" if i == 0 else "finished"))
        stamp = time.time() - 100 + i
        os.utime(runs[-1] / "run.json", (stamp, stamp))
    (tmp_path / "not-a-run").mkdir()
    removed = prune_runs(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["run1", "run2"]
    assert sorted(p.name for p in list_runs(tmp_path)) == ["run0", "run3", "run4"]
    assert (tmp_path / "not-a-run").exists()


def test_prune_by_bytes(tmp_path):
    for i in range(4):
        path = _fake_run(tmp_path, f"run{i}", size=1000)
        stamp = time.time() - 100 + i
        os.utime(path / "run.json", (stamp, stamp))
    prune_runs(tmp_path, max_bytes=2500)
    assert sorted(p.name for p in list_runs(tmp_path)) == ["run2", "run3"]


# A run.json as the first versions wrote it: no start or end times, no device or guidance facts, the prior's
# settings flat in the config, and a key this version does not know.
OLD_RECORD = {
    "prompt": "a green cube", "seed": 3, "preset": "quick", "guidance": "primitives", "device": "cpu", "model_id": None,
    "config": {"seed": 3, "coarse": {"iters": 4}, "prior_renders_per_view": 5}, "packages": {"torch": "2.1.0"},
    "status": "failed", "stage_seconds": {"coarse": 1.5}, "finished_stages": ["coarse"],
    "stage_stats": {"coarse": {"final_loss": 0.25}}, "error": "refine stage failed", "traceback": "Traceback ...",
    "gpu_hours": 0.5,
}


def test_an_old_run_json_loads_with_defaults_and_keeps_what_it_does_not_know(tmp_path):
    from stages.runs import RunRecord, has_checkpoint, load_run_config

    (tmp_path / "run.json").write_text(json.dumps(OLD_RECORD))
    record = RunRecord.load(tmp_path)
    assert (record.prompt, record.seed, record.status, record.finished_stages) == ("a green cube", 3, "failed", ["coarse"])
    assert record.started_at is None and record.device_facts is None and record.guidance_facts == {}
    assert record.peak_memory == {} and record.stage_calls == 0 and record.outputs == {}
    assert record.extra == {"gpu_hours": 0.5}
    assert not has_checkpoint(record, tmp_path, "coarse")  # finished, but its checkpoint is gone
    prompt, config = load_run_config(tmp_path)  # what --resume reads
    assert prompt == "a green cube" and config.coarse.iters == 4 and config.prior.renders_per_view == 5
    record.finish_stage("refine", 2.0, {"nonfinite_skipped": 1})
    record.save(tmp_path)
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["gpu_hours"] == 0.5 and saved["traceback"] == "Traceback ..."
    assert saved["finished_stages"] == ["coarse", "refine"] and saved["nonfinite_skipped"] == {"refine": 1}
    assert RunRecord.load(tmp_path) == record


def test_unreadable_records_are_skipped_by_listings_and_refused_by_load(tmp_path):
    from stages.runs import RunRecord

    assert RunRecord.read(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a DreamLift run folder"):
        RunRecord.load(tmp_path)
    for text in ("{not json", "[1, 2]"):
        (tmp_path / "run.json").write_text(text)
        assert RunRecord.read(tmp_path) is None
        with pytest.raises(ValueError):
            RunRecord.load(tmp_path)


def test_ending_a_run_records_why_and_when(tmp_path):
    from stages.runs import RunRecord

    record = RunRecord(prompt="a red cube", status="running")
    record.end(tmp_path, "cancelled", "cancelled by the user")
    saved = RunRecord.load(tmp_path)
    assert saved.status == "cancelled" and saved.error == "cancelled by the user" and saved.ended_at > 0
    assert saved.traceback is None
    record.end(tmp_path / "missing", "failed", "x")  # a folder that cannot be written: left as it is
    assert not (tmp_path / "missing").exists()

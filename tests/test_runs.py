import json
import os
import time

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

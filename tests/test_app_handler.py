"""The app's Generate handler in-process (issue 8): disk bounds, one folder per run, no shell,
readable errors, bad server settings."""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

import app
from helpers import TINY_SETTINGS, run_dir_from_status
from stages import pipeline


# ---- the app's handler in-process: disk bounds, one folder per run, no shell ------------------------
def _fake_run(root: Path, name: str, size: int, age: float, status: str = "finished") -> Path:
    path = root / name
    path.mkdir()
    (path / "model.glb").write_bytes(b"x" * size)
    (path / "run.json").write_text(json.dumps({"status": status}))
    stamp = time.time() - age
    os.utime(path / "run.json", (stamp, stamp))
    return path


@pytest.mark.slow
def test_app_run_prunes_old_runs_by_count_and_bytes_writes_one_folder_and_runs_no_shell(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    root.mkdir()
    _fake_run(root, "running-old", 10, age=500, status="running")  # never pruned
    for i in range(4):
        _fake_run(root, f"old{i}", 1_000_000, age=400 - i)
    monkeypatch.setattr(app, "OUTPUT_ROOT", root)
    monkeypatch.setattr(app, "KEEP_RUNS", 4)  # keeps 3 earlier runs, then bytes: 2.5 MB keeps 2
    monkeypatch.setattr(app, "MAX_OUTPUT_BYTES", 2_500_000)
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY_SETTINGS))  # with the turntable video (ffmpeg)
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
    run = run_dir_from_status(status, root)
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
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY_SETTINGS))
    monkeypatch.setattr(pipeline.coarse_stage, "run", oom)
    with pytest.raises(gr.Error, match="out of memory.*coarse.resolution") as err:
        list(app.generate("a red cube", "quick", "0", "primitives", 0, 0, 0, "export"))
    assert "Traceback" not in str(err.value)


def test_app_refuses_bad_server_settings():
    for argv in (["--keep-runs", "0"], ["--max-output-gb", "-1"], ["--queue-size", "0"]):
        with pytest.raises(SystemExit) as err:
            app.main(argv)
        assert err.value.code == 2


@pytest.mark.parametrize("preset, guidance, stop_after, message", [
    ("huge", "auto", "export", "preset must be one of ['quick', 'fast', 'standard', 'high'], got 'huge'"),
    ("quick", "magic", "export", "guidance must be one of ['auto', 'primitives', 'stable-diffusion', 'deepfloyd-if'], "
                                 "got 'magic'"),
    ("quick", "auto", "never", "stop_after must be one of ['coarse', 'refine', 'export'], got 'never'"),
])
def test_app_names_a_bad_menu_value_once_checked_by_resolve(preset, guidance, stop_after, message):
    import gradio as gr

    with pytest.raises(gr.Error) as err:
        app.build_plan("a red cube", preset, "0", guidance, 0, 0, 0, stop_after)
    assert err.value.message == message


def test_the_viewer_shows_the_shape_while_it_trains_then_the_textured_model(tmp_path, monkeypatch):
    """Issue 30: the coarse surface and the refine stage's meshes go to the viewer (labelled in the status
    line) while the run trains; the export's model.glb replaces them."""
    root = tmp_path / "outputs"
    root.mkdir()
    monkeypatch.setattr(app, "OUTPUT_ROOT", root)
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY_SETTINGS) + ["refine.iters=6", "refine.model_every=2"])
    shown = []  # (file name, it exists, the status names it) of each view with a model
    for _, status, model, *_ in app.generate("a red cube", "quick", "0", "primitives", 0, 0, 0, "export"):
        if model:
            shown.append((Path(model).name, Path(model).is_file(), "In the viewer:" in status))
    names = [name for name, _, _ in shown]
    assert names[-1] == "model.glb" and not shown[-1][2], shown  # the final model, with no intermediate label
    live = [s for s in shown if s[0].startswith("preview-")]
    assert live and all(exists and labelled for _, exists, labelled in live), shown
    assert set(names) <= {"preview-coarse.glb", "preview-refine-2.glb", "preview-refine-4.glb", "model.glb"}, names
    assert names.index("model.glb") > max(names.index(n) for n, _, _ in live)  # the intermediates came first
    assert not list(root.rglob(".shown-*"))  # the page's links to them went with the handler


def test_the_viewer_keeps_its_model_when_the_worker_deletes_the_preview(tmp_path):
    """Gradio reads a yielded file after the handler yields; the worker may delete its preview meanwhile
    (the next one replaces it, the export clears them). The handler yields its own link instead, which
    lasts until it resumes."""
    first, second = tmp_path / "preview-refine-2.glb", tmp_path / "preview-refine-4.glb"
    first.write_bytes(b"two")
    second.write_bytes(b"four")
    snap = app.Snapshot(run_id="r", status="**Refine**", model=str(first), model_label="refine step 2")
    shown = app.ShownModel(tmp_path)
    model = Path(app.view(snap, None, shown)[2])
    first.unlink()  # the worker's next preview replaced it before Gradio read it
    assert model.name == first.name and model.read_bytes() == b"two"
    snap.model = str(second)
    later = Path(app.view(snap, None, shown)[2])  # the handler resumed: Gradio has cached the first one
    assert later.read_bytes() == b"four" and not model.exists()
    second.unlink()
    snap.model = str(first)  # a preview that is gone by the time the handler looks: no model, no error
    assert app.view(snap, None, shown)[2] is None
    shown.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing of the page's left in the run folder

import json

import numpy as np
import pytest
import trimesh

from guidance.primitive_shapes import UnknownPromptError
from helpers import NaNGuidance, tiny_run_config
from stages import pipeline
from stages.common import Cancelled, StageError
from stages.config import apply_overrides
from stages.pipeline import generate, run_to_completion
from stages.plan import PromptError, resolve
from stages.runs import load_run_config


def _drain(prompt, config, **kwargs):
    return list(generate(prompt, config, **kwargs))


@pytest.mark.slow
def test_full_run_streams_both_stages_and_writes_every_file(tmp_path):
    events = _drain("a red cube", tiny_run_config(), out_root=tmp_path)
    stages = [e.stage for e in events]
    assert stages[0] == "setup" and stages[-1] == "done"
    previews = [e.stage for e in events if e.preview is not None]
    assert "coarse" in previews and "refine" in previews
    assert previews.index("refine") > max(i for i, s in enumerate(previews) if s == "coarse")  # in order
    assert all(e.preview.dtype == np.uint8 and e.preview.ndim == 3 for e in events if e.preview is not None)
    done = events[-1]
    run_dir = tmp_path / done.run_dir.split("/")[-1]
    for name in ("model.obj", "model.mtl", "texture_kd.png", "model.glb", "model.zip", "turntable.mp4",
                 "run.json", "coarse.pt", "refine.pt"):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "finished" and record["prompt"] == "a red cube"
    assert record["guidance"] == "primitives" and record["device"] == "cpu" and record["seed"] == 0
    assert set(record["stage_seconds"]) == {"coarse", "refine", "export"}
    assert record["config"]["coarse"]["iters"] == 4 and record["packages"]["torch"]
    scene = trimesh.load(run_dir / "model.glb")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 0
    # Nothing but the run folder was written under the root.
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]


def test_stop_after_coarse_still_exports_a_model(tmp_path):
    config = tiny_run_config(stop_after="coarse", seed=5)
    done = run_to_completion("a blue sphere", config, run_dir=tmp_path / "run")
    assert done.stage == "done"
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["seed"] == 5 and record["config"]["coarse"]["seed"] == 5 and record["config"]["refine"]["seed"] == 5
    assert (tmp_path / "run" / "model.obj").is_file() and (tmp_path / "run" / "coarse.pt").is_file()
    assert not (tmp_path / "run" / "refine.pt").exists()


@pytest.mark.parametrize(
    "prompt, error, message",
    [("", PromptError, "empty"), ("   ", PromptError, "empty"), ("a" * 301, PromptError, "300"),
     ("a red\ncube", PromptError, "control"), ("a ceramic teapot", UnknownPromptError, "torus")],
)
def test_bad_prompts_fail_before_writing_anything(tmp_path, prompt, error, message):
    with pytest.raises(error, match=message):
        _drain(prompt, tiny_run_config(), out_root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cancel_stops_and_marks_the_run(tmp_path):
    seen = []

    def should_stop():
        return len(seen) >= 3

    with pytest.raises(Cancelled):
        for event in generate("a red cube", tiny_run_config(), run_dir=tmp_path / "run", should_stop=should_stop):
            seen.append(event)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "cancelled"
    assert not list((tmp_path / "run").glob("model.*"))
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_non_finite_guidance_stops_with_stage_and_step(tmp_path, monkeypatch):
    real = pipeline.guidance_for
    monkeypatch.setattr(pipeline, "guidance_for", lambda *a: NaNGuidance(real(*a)))
    config = tiny_run_config()
    config.coarse.max_nonfinite_steps = 2
    with pytest.raises(StageError, match=r"coarse stage failed at step 2: .*2 steps in a row were not finite"):
        _drain("a red cube", config, run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "coarse" in record["error"]


@pytest.mark.slow
def test_crash_in_refine_keeps_the_coarse_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pipeline.refine_stage, "run", crash)
    with pytest.raises(StageError, match="refine stage failed: simulated crash"):
        _drain("a green cube", tiny_run_config(), run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "coarse.pt").is_file()
    monkeypatch.undo()

    def no_coarse(*args, **kwargs):
        raise AssertionError("the coarse stage must not run again on resume")

    monkeypatch.setattr(pipeline.coarse_stage, "run", no_coarse)
    prompt, config = load_run_config(tmp_path / "run")
    assert prompt == "a green cube" and config.coarse.iters == 4
    done = run_to_completion(prompt, config, run_dir=tmp_path / "run", resume=True)
    assert done.stage == "done" and (tmp_path / "run" / "model.glb").is_file()
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "finished" and record["finished_stages"] == ["coarse", "refine", "export"]


def test_out_of_memory_names_the_setting_to_lower(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pipeline.refine_stage, "run", oom)
    with pytest.raises(StageError, match="refine.resolution"):
        _drain("a green cube", tiny_run_config(), run_dir=tmp_path / "run")


def test_one_prior_library_serves_every_background_level_of_the_same_cameras_and_light():
    # White objects train on a dark background: the cached prior is re-levelled, not rebuilt, where the cameras and
    # the light are the same. By default they are not: white objects keep the light around the camera in the coarse
    # stage.
    same_light = apply_overrides(tiny_run_config(), ["camera.light_jitter=0.0"])
    white, red = resolve("a white cube", same_light), resolve("a red cube", tiny_run_config())
    assert white.config.prior.background < red.config.prior.background == 1.0
    red_prior, white_prior = pipeline.guidance_for(red), pipeline.guidance_for(white)
    assert (red_prior.background, white_prior.background) == (red.config.prior.background, white.config.prior.background)
    assert white_prior.lib_u is red_prior.lib_u and pipeline.guidance_for(red) is red_prior
    default_white = resolve("a white cube", tiny_run_config())
    assert default_white.config.camera.light_jitter != red.config.camera.light_jitter
    assert pipeline.guidance_for(default_white).lib_u is not red_prior.lib_u
    # Their refine stages have the light at the camera: one library again.
    assert pipeline.guidance_for(red, "refine").lib_u is pipeline.guidance_for(default_white, "refine").lib_u


@pytest.mark.slow
def test_the_refine_stage_gets_cameras_without_pose_jitter_and_a_prior_drawn_from_them(tmp_path, monkeypatch):
    seen = {}
    real_coarse, real_refine = pipeline.coarse_stage.run, pipeline.refine_stage.run

    def coarse(guidance, prompt, config, camera, *args, **kwargs):
        seen["coarse"] = (camera, guidance.library_config.camera)
        return real_coarse(guidance, prompt, config, camera, *args, **kwargs)

    def refine(field, guidance, prompt, config, camera, *args, **kwargs):
        seen["refine"] = (camera, guidance.library_config.camera)
        return real_refine(field, guidance, prompt, config, camera, *args, **kwargs)

    monkeypatch.setattr(pipeline.coarse_stage, "run", coarse)
    monkeypatch.setattr(pipeline.refine_stage, "run", refine)
    events = _drain("a red cube", tiny_run_config(), run_dir=tmp_path / "run")
    assert events[-1].stage == "done"
    coarse_camera, coarse_library = seen["coarse"]
    refine_camera, refine_library = seen["refine"]
    assert coarse_camera == coarse_library and refine_camera == refine_library  # each library matches its cameras
    assert coarse_camera.target_jitter > 0 and coarse_camera.position_jitter > 0 and coarse_camera.up_jitter > 0
    assert refine_camera.target_jitter == refine_camera.position_jitter == refine_camera.up_jitter == 0.0
    assert refine_camera.light_jitter == coarse_camera.light_jitter  # only the pose's jitter goes
    assert refine_camera.distance_range == coarse_camera.distance_range
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["refine"]["camera_jitter"] == 0.0


def _forbid_plan_functions(monkeypatch) -> None:
    """Every function of stages.plan raises from now on, wherever a module holds it (`from stages.plan import ...`)."""
    import inspect
    import sys

    from stages import plan as plan_module

    functions = {id(f): (name, f) for name, f in vars(plan_module).items()
                 if inspect.isfunction(f) and f.__module__ == plan_module.__name__}

    def forbidden(name):
        def call(*args, **kwargs):
            raise AssertionError(f"stages.plan.{name} was called during a run")
        return call

    for module in list(sys.modules.values()):
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in functions and functions[id(value)][1] is value:
                monkeypatch.setattr(module, attr, forbidden(functions[id(value)][0]))


def test_a_run_takes_its_plan_once_and_never_comes_back_to_it(tmp_path, monkeypatch):
    plan = resolve("a red cube", tiny_run_config())
    assert plan.refine_config is not plan.config  # the primitives prior's refine stage has cameras of its own
    assert plan.refine_config.camera.target_jitter == 0.0 < plan.config.camera.target_jitter
    _forbid_plan_functions(monkeypatch)
    with pytest.raises(AssertionError, match="stages.plan.resolve"):
        pipeline.resolve("a red cube", tiny_run_config())  # the guard holds for the pipeline's own import
    events = list(pipeline.run_plan(plan, run_dir=tmp_path / "run", stages=("coarse", "refine")))  # the export: none
    assert events[-1].stage == "paused" and (tmp_path / "run" / "refine.pt").is_file()


def test_a_plan_crosses_a_process_with_the_refine_stages_cameras():
    from stages.plan import plan_from_payload, plan_payload

    plan = resolve("a red cube", tiny_run_config())
    again = plan_from_payload(plan_payload(plan))
    assert again.config == plan.config and again.refine_config == plan.refine_config
    assert again.refine_config.camera != again.config.camera

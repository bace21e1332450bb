"""Faults of a run (issue 8): a cancel by closing the generator, non-finite steps, out of memory,
crashes resumed from the command line, bad prompt files."""
import json
import threading
import time

import pytest
import torch

import generate as cli
from helpers import TINY_SETTINGS, NaNGuidance, tiny_run_config
from stages import pipeline
from stages.common import StageError
from stages.pipeline import generate


# ---- the pipeline: cancel by closing, faults -------------------------------------------------------
@pytest.mark.slow
def test_closing_returns_fast_and_the_next_run_waits_for_the_device(tmp_path, monkeypatch):
    real = pipeline.guidance_for
    slow = {"first": True}

    def slow_guidance(*args):
        if slow.pop("first", False):
            time.sleep(2.0)  # a long load that cannot look at the stop flag
        return real(*args)

    monkeypatch.setattr(pipeline, "guidance_for", slow_guidance)
    first = generate("a red cube", tiny_run_config(), run_dir=tmp_path / "first", close_wait=0.2)
    assert "loading" in next(first).message
    start = time.time()
    first.close()  # what Gradio does on Cancel, in its event loop
    assert time.time() - start < 1.0
    second = tiny_run_config(stop_after="coarse")
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


@pytest.mark.slow
def test_non_finite_loss_in_refine_names_the_stage_and_step_and_frees_the_frames(tmp_path, monkeypatch):
    on = {"nan": False}
    real_guidance, real_refine = pipeline.guidance_for, pipeline.refine_stage.run

    def refine_with_nan(*args, **kwargs):
        on["nan"] = True
        return real_refine(*args, **kwargs)

    monkeypatch.setattr(pipeline, "guidance_for", lambda *a: NaNGuidance(real_guidance(*a), on))
    monkeypatch.setattr(pipeline.refine_stage, "run", refine_with_nan)
    config = tiny_run_config()
    config.refine.max_nonfinite_steps = 2  # NaN at every step: skipped once, then the stage ends
    with pytest.raises(StageError, match=r"refine stage failed at step 2: .*2 steps in a row were not finite") as err:
        list(generate("a red cube", config, run_dir=tmp_path / "run"))
    # The stages' frames (and the tensors they hold) are not kept alive by the exception.
    assert not [f for f in _frames(err.value) if f.endswith(("refine.py", "coarse.py"))]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "refine stage failed at step" in record["error"]
    assert "refine.py" in record["traceback"]  # the text is kept for debugging
    assert (tmp_path / "run" / "coarse.pt").is_file() and not (tmp_path / "run" / "refine.pt").exists()


@pytest.mark.slow
def test_a_non_finite_step_now_and_then_is_skipped_counted_and_the_run_finishes(tmp_path, monkeypatch):
    """fp16 overflows: NaN noise predictions at two separate coarse steps are skipped, not fatal."""
    calls = {"n": 0}
    real_guidance = pipeline.guidance_for

    class Flaky(NaNGuidance):
        def predict_noise(self, x_t, t, cond, **kwargs):
            calls["n"] += 1
            self.on["nan"] = calls["n"] in (2, 4)
            return super().predict_noise(x_t, t, cond, **kwargs)

    monkeypatch.setattr(pipeline, "guidance_for", lambda *a: Flaky(real_guidance(*a), {"nan": False}))
    config = tiny_run_config()
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
        list(generate("a red cube", tiny_run_config(), run_dir=tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_cli_resume_finishes_a_run_whose_refine_crashed(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["a green cube", "--guidance", "primitives", "--out", str(out), "--set", "export.turntable=false"]
    argv += [a for item in [*TINY_SETTINGS, "coarse.iters=1", "refine.iters=1"] for a in ("--set", item)]

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


def test_resume_of_a_folder_that_is_not_a_run_fails_at_once(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="not a DreamLift run folder"):
        list(generate("a red cube", tiny_run_config(), run_dir=tmp_path, resume=True))
    assert cli.main(["--resume", str(tmp_path)]) == 1
    assert "not a DreamLift run folder" in capsys.readouterr().err

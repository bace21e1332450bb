"""Stable Diffusion and DeepFloyd IF through every stage: tiny random pipelines saved to local
folders (tests/tiny_pipelines.py) drive coarse -> refine -> export through the command line,
twice in one process with the cached model, and through --resume after a crash."""
import json

import pytest
import torch

import generate as cli
from helpers import TINY_SETTINGS, launch_app
from stages import pipeline, workers
from stages.pipeline import generate
from stages.plan import resolve

pytestmark = pytest.mark.slow  # whole runs through every stage with the tiny hub models

OUTPUTS = ("model.obj", "model.mtl", "texture_kd.png", "model.glb", "model.zip", "turntable.mp4", "run.json",
           "coarse.pt", "refine.pt")
# A few steps per stage, renders at the tiny models' 16 px (refine renders 32 px, box-filtered to 16).
STEPS = [*TINY_SETTINGS, "coarse.iters=3", "refine.iters=2", "refine.resolution=32"]


@pytest.fixture(scope="module")
def folders(sd_folder, if_folder):
    return {"stable-diffusion": sd_folder, "deepfloyd-if": if_folder}


def _argv(prompt, name, folder, out, extra=()):
    argv = [prompt, "--guidance", name, "--model-id", str(folder), "--device", "cpu", "--out", str(out), *extra]
    return argv + [a for item in STEPS for a in ("--set", item)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local folders only: no hub look-up


@pytest.mark.parametrize("name", ["stable-diffusion", "deepfloyd-if"])
def test_cli_runs_every_stage_then_a_second_prompt_on_the_cached_model(name, folders, tmp_path, capsys, one_thread):
    assert cli.main(_argv("a red cube", name, folders[name], tmp_path / "first")) == 0, capsys.readouterr().err
    plan = resolve("a red cube", cli.build_config(cli.parse_args(_argv("a red cube", name, folders[name], tmp_path))))
    assert workers.guidance_loaded(plan)
    model = workers.guidance_for(plan)
    encoded = model.embeddings.encoded_texts
    assert encoded == 5  # the coarse stage's 4 view prompts and "": the refine stage reused them
    assert cli.main(_argv("a blue sphere", name, folders[name], tmp_path / "second")) == 0, capsys.readouterr().err
    assert workers.guidance_for(plan) is model  # loaded once
    assert model.embeddings.encoded_texts == encoded + 4  # the new prompt's views; "" was cached
    for run in ("first", "second"):
        for file in OUTPUTS:
            assert (tmp_path / run / file).stat().st_size > 0, (run, file)
        record = json.loads((tmp_path / run / "run.json").read_text())
        assert record["status"] == "finished" and record["finished_stages"] == ["coarse", "refine", "export"]
        assert record["guidance"] == name and record["model_id"] == str(folders[name])
        assert record["nonfinite_skipped"] == {"coarse": 0, "refine": 0}
        assert record["stage_stats"]["refine"]["faces"] > 0


def test_resume_after_a_crash_in_refine_with_stable_diffusion(folders, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    real_refine = pipeline.refine_stage.run

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(pipeline.refine_stage, "run", crash)
    assert cli.main(_argv("a green cube", "stable-diffusion", folders["stable-diffusion"], out)) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: refine stage failed: simulated crash"
    assert (out / "coarse.pt").is_file() and not (out / "model.obj").exists()

    monkeypatch.setattr(pipeline.refine_stage, "run", real_refine)
    monkeypatch.setattr(pipeline.coarse_stage, "run", lambda *a, **k: pytest.fail("coarse must not run again"))
    assert cli.main(["--resume", str(out)]) == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["guidance"] == "stable-diffusion"
    assert all((out / file).stat().st_size > 0 for file in OUTPUTS)


def test_pipeline_runs_stable_diffusion_twice_in_a_row_in_one_process(folders, tmp_path, one_thread):
    """What an app server does: two generate() calls on the one cached model, the second after the first ended
    (and with the texture's own CFG scale: its gradient goes back through the VAE a second time)."""
    from stages.config import apply_overrides, preset

    def config(extra):
        c = apply_overrides(preset("quick"), [*STEPS, f"model_id={folders['stable-diffusion']}", "export.turntable=false", *extra])
        c.guidance, c.device = "stable-diffusion", "cpu"
        return c

    for i, (prompt, extra) in enumerate([("a red cube", []), ("a green sphere", ["refine.sds.texture_guidance_scale=7.5"])]):
        events = list(generate(prompt, config(extra), run_dir=tmp_path / str(i)))
        assert events[-1].stage == "done", events[-1]
        assert {e.stage for e in events} >= {"coarse", "refine", "export"}
        assert torch.isfinite(torch.tensor([e.loss for e in events if e.loss is not None])).all()


@pytest.mark.server
def test_app_runs_stable_diffusion_twice_then_deepfloyd_if_in_one_server(folders, tmp_path):
    """The path every GPU user takes, through the app's API: runs back to back in one server,
    on the model it keeps loaded (the server's --model-id; the page's Model id box for IF)."""

    steps = [a for item in ["coarse.iters=3", "refine.iters=2", "refine.resolution=32"] for a in ("--set", item)]
    args = ["--model-id", str(folders["stable-diffusion"]), *steps]
    with launch_app(tmp_path, args, {"HF_HUB_OFFLINE": "1"}) as (client, proc):
        runs = [("a red cube", "stable-diffusion", ""), ("a blue sphere", "stable-diffusion", ""),
                ("a green cube", "deepfloyd-if", str(folders["deepfloyd-if"]))]
        for prompt, name, model_id in runs:
            result = client.predict(prompt=prompt, preset="quick", seed=0, guidance=name, model_id=model_id,
                                    api_name="/generate")
            gallery, status, model, files, latest, run_id = result[:6]
            assert "Done" in status, status
            record = json.loads((tmp_path / run_id / "run.json").read_text())
            assert record["status"] == "finished" and record["guidance"] == name and record["prompt"] == prompt
            assert record["model_id"] == str(folders[name])
            assert model.endswith("model.glb") and all((tmp_path / run_id / f).stat().st_size > 0 for f in OUTPUTS)
        assert proc.poll() is None

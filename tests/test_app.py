"""The app, served on 127.0.0.1 with tiny settings and driven through gradio_client."""
import zipfile
from pathlib import Path

import pytest
import trimesh

from helpers import TINY_SETTINGS, launch_app


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("app-outputs")
    with launch_app(out) as (client, proc):
        yield client, out, proc


def _captions(gallery) -> list[str]:
    return [item.get("caption") or "" for item in (gallery or [])]


@pytest.mark.server
@pytest.mark.slow
def test_generate_streams_previews_of_both_stages_then_the_model(server):
    client, out, _ = server
    job = client.submit(prompt="a red cube", preset="quick", seed=0, guidance="primitives", api_name="/generate")
    outputs = list(job)
    assert outputs, "no streamed outputs"
    final = job.result()
    gallery, status, model, files, latest, run_id, turntable = final  # (the API leaves out the Generate button's state)
    captions = _captions(gallery)[::-1]  # the gallery shows the newest first
    stages = [c.split()[0] for c in captions]
    assert "coarse" in stages and "refine" in stages
    assert stages.index("refine") > max(i for i, s in enumerate(stages) if s == "coarse")
    assert "Done" in status and run_id in status and str(out) not in status  # the run id, not the server's path
    assert (out / run_id / "run.json").is_file()
    assert latest and Path(latest).is_file()  # the latest preview, enlarged
    assert model and model.endswith("model.glb")
    video = turntable.get("video", turntable) if isinstance(turntable, dict) else turntable  # the turntable is offered
    video = video.get("path") if isinstance(video, dict) else video
    assert video and Path(video).name == "turntable.mp4" and Path(video).stat().st_size > 0
    scene = trimesh.load(model)
    assert sum(len(g.faces) for g in scene.geometry.values()) > 0
    paths = [f if isinstance(f, str) else f.get("path") for f in files]
    assert sorted(Path(p).name for p in paths) == ["model.glb", "model.zip"]  # what the Downloads label promises
    zip_path = next(p for p in paths if p.endswith("model.zip"))
    with zipfile.ZipFile(zip_path) as z:
        assert sorted(z.namelist()) == ["model.mtl", "model.obj", "texture_kd.png"]
        z.extractall(Path(zip_path).parent / "unzipped")
    mesh = trimesh.load(Path(zip_path).parent / "unzipped" / "model.obj", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.uv is not None
    # Streamed updates came before the final one, and the run's folder is under the output root.
    assert len(outputs) >= 2
    assert any(p.name != "server.log" for p in out.iterdir())


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="a ceramic teapot"), "vocabulary"),
        (dict(prompt="a red cube", preset="turbo"), "quick"),  # Gradio lists the choices
        (dict(prompt="a red cube", preset="standard"), "GPU preset"),  # hours on this CPU: refused, naming quick
        (dict(prompt="a red cube", preset="high"), "choose quick"),
        (dict(prompt="a red cube", guidance="dall-e"), "primitives"),
        (dict(prompt="a red cube", seed=-4), "seed"),
        (dict(prompt="a red cube", seed="abc"), "seed"),
        (dict(prompt="a red cube", seed=2**40), "seed"),
        (dict(prompt="a red cube", seed=1.5), "seed"),
        (dict(prompt="a red cube", coarse_iters=10**9), "20000"),  # Gradio's slider check names the limit
        (dict(prompt="a red cube", texture_size=3.5), "texture_size"),
        (dict(prompt="a\x07red cube"), "control"),
        (dict(prompt="x" * 400), "300"),
        (dict(prompt="   "), "empty"),
        (dict(prompt=None), "prompt must be text"),
        (dict(prompt="a ceramic teapot"), "torus"),  # the message lists the vocabulary
        (dict(prompt="a red cube", seed=None), "seed"),
        (dict(prompt="a red cube", stop_after="everything"), "coarse"),  # Gradio lists the choices
        (dict(prompt="a red cube", refine_iters=-1), "minimum value 0"),  # Gradio's slider check
        (dict(prompt="a red cube", texture_size=32), "[64, 4096]"),
        (dict(prompt="a red cube", coarse_iters="many"), "expected a `float`"),
        (dict(prompt="a red cube", model_id="some/model"), "takes no model id"),
        (dict(prompt="a red cube", guidance="stable-diffusion", model_id="a\nb"), "one line"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server, kwargs, message):
    client, _, proc = server
    args = dict(preset="quick", seed=0, guidance="primitives")
    args.update(kwargs)
    with pytest.raises(Exception) as err:
        client.predict(api_name="/generate", **args)
    text = str(err.value)
    assert message.lower() in text.lower(), text
    assert "Traceback" not in text
    assert proc.poll() is None  # still serving


# ---- the app's helpers, in-process ---------------------------------------------------------------
def _event(stage, step, total, elapsed, **kw):
    from stages.pipeline import ProgressEvent

    return ProgressEvent(stage=stage, step=step, total=total, elapsed=elapsed, run_dir="/srv/outputs/RUN-ID", **kw)


def test_status_line_waits_for_enough_steps_then_estimates_from_the_latest_ones():
    from app_support import ETA_MIN_STEPS, StatusLine

    line = StatusLine()
    early = line(_event("coarse", 1, 100, 50.0))  # a slow first step (warm-up) must not set the estimate
    assert "estimating" in early and "step 1/100" in early and "left in this stage" not in early
    for step in range(2, ETA_MIN_STEPS + 1):
        text = line(_event("coarse", step, 100, 50.0 + (step - 1)))  # then one step a second
    assert "about 1 min 30 s left in this stage" in text, text
    assert text.count("<progress") == 1
    assert "estimating" in line(_event("refine", 1, 10, 70.0))  # a new stage starts its own estimate
    done = line(_event("done", 0, 0, 125.0))
    assert done.startswith("**Done** in 2 min 05 s") and "RUN-ID" in done and "/srv" not in done


def test_web_message_names_the_menu_not_the_command_line_flag():
    from app_support import web_message
    from guidance.hub import load_error

    exc = OSError("We couldn't connect to 'https://huggingface.co' to load the files")
    text = web_message(str(load_error("owner/model", "Stable Diffusion", exc, "owner/model")))
    assert "--guidance" not in text and '"primitives" in the Guidance model menu' in text
    assert "owner/model" in text and "\n" not in text


def test_a_finished_run_of_an_earlier_server_is_read_back_and_paths_outside_are_refused(tmp_path):
    import json

    from app_support import Runs

    run = tmp_path / "20260101-000000-a-red-cube-s0-abc123"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "finished", "total_seconds": 42,
                                              "outputs": {"glb": str(run / "model.glb")}}))
    snap = Runs().from_disk(tmp_path, run.name)
    assert snap.done and snap.paths["glb"].endswith("model.glb") and "42 s" in snap.status and not snap.error
    (tmp_path / "x.json").write_text("{}")
    for bad in ("../" + run.name, "/etc", "..", "", None, run.name + "/../" + run.name):
        assert Runs().from_disk(tmp_path, bad) is None


def test_the_server_model_id_applies_to_hub_models_and_the_page_box_overrides_it(monkeypatch):
    import app

    monkeypatch.setattr(app, "MODEL_IDS", {"stable-diffusion": "my/sd-model"})
    sd = app.build_plan("a teapot", "quick", "0", "stable-diffusion", 0, 0, 0, "coarse", "")
    assert sd.config.model_id == "my/sd-model"
    assert app.build_plan("a teapot", "quick", "0", "stable-diffusion", 0, 0, 0, "coarse", " other/id ").config.model_id == "other/id"
    assert app.build_plan("a red cube", "quick", "0", "primitives", 0, 0, 0, "coarse", "").config.model_id is None


def test_a_model_that_fails_to_load_ends_the_status_with_a_web_message(monkeypatch, tmp_path):
    import gradio as gr

    import app
    from guidance.hub import load_error
    from stages import pipeline

    def offline(plan, stage="coarse"):
        raise load_error("my/sd-model", "Stable Diffusion", OSError("offline"), "my/sd-model") from None

    monkeypatch.setattr(app, "OUTPUT_ROOT", tmp_path)
    monkeypatch.setattr(app, "SERVER_OVERRIDES", list(TINY_SETTINGS))
    monkeypatch.setattr(pipeline, "guidance_for", offline)
    shown = []
    with pytest.raises(gr.Error) as err:
        for outputs in app.generate("a teapot", "quick", "0", "stable-diffusion", 0, 0, 0, "export", "my/sd-model"):
            shown.append(outputs[1])
    assert shown[-1].startswith("**Error:**") and "loading" not in shown[-1].lower().split("error:")[0]
    for text in (shown[-1], err.value.message):
        assert "my/sd-model" in text and '"primitives" in the Guidance model menu' in text and "--guidance" not in text


def test_server_model_ids_are_kept_per_family_and_a_set_model_id_is_obeyed():
    from app_plan import server_model_ids

    ids, rest = server_model_ids(["/models/sd15", "deepfloyd-if=/models/if"], ["coarse.iters=3"], None)
    assert ids == {"stable-diffusion": "/models/sd15", "deepfloyd-if": "/models/if"} and rest == ["coarse.iters=3"]
    ids, rest = server_model_ids([], ["model_id=owner/sd-x", "refine.iters=2"], "owner/from-env")
    assert ids == {"stable-diffusion": "owner/sd-x"} and rest == ["refine.iters=2"]  # the later one wins
    with pytest.raises(ValueError, match="primitives has no weights"):
        server_model_ids(["primitives=x"], [], None)
    with pytest.raises(ValueError, match="one-line id"):
        server_model_ids(["deepfloyd-if="], [], None)


def test_the_server_model_id_of_one_family_is_not_used_by_another(monkeypatch):
    import app

    monkeypatch.setattr(app, "MODEL_IDS", {"stable-diffusion": "owner/sd-x"})
    monkeypatch.setattr(app, "SERVER_OVERRIDES", [])
    sd = app.build_plan("a teapot", "quick", 0, "stable-diffusion", None, None, None, "export", "")
    assert sd.config.model_id == "owner/sd-x"
    deepfloyd = app.build_plan("a teapot", "quick", 0, "deepfloyd-if", None, None, None, "export", "")
    assert deepfloyd.config.model_id is None  # IF's own default, not SD's id
    typed = app.build_plan("a teapot", "quick", 0, "deepfloyd-if", None, None, None, "export", " owner/if-y ")
    assert typed.config.model_id == "owner/if-y"

"""guidance.registry: the models a run can choose, and a fourth one added by this file alone.

`FAKE` below is everything a new guidance model needs: one spec, registered here. The pipeline,
the command line, the app and the batch's prompt check take it with no other change.
"""
import json

import pytest
import torch

import app
import generate as cli
from batch.plan import check_prompts
from guidance import registry
from guidance.registry import Guidance, GuidanceSpec
from helpers import tiny_run_config
from stages import pipeline, workers
from stages.plan import resolve


class StillGuidance:
    """A pixel-space model that predicts the noise of a clean image equal to x_t: SDS barely moves the scene."""

    space = "pixel"
    resolution = 16
    default_guidance_scale = 3.0
    view_dependent_uncond = False

    def __init__(self, device, dtype=None, model_id=None, strength: float = 1.0):
        self.device, self.strength, self.texts = torch.device(device), strength, []
        self.alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000), dim=0)  # [T]

    def encode_prompt(self, texts):
        self.texts.extend(texts)
        return torch.zeros(len(texts), 1)  # [N, 1]

    def predict_noise(self, x_t, t, cond):  # [B, 3, h, w]
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return self.strength * x_t * (1.0 - a.sqrt()) / (1.0 - a).sqrt()


def _check_prompt(prompt: str) -> None:
    if "teapot" in prompt:
        raise ValueError("the still model cannot draw teapots")


def _adapt(config, prompt: str) -> None:
    config.coarse.background = config.refine.background = "white"


FAKE = GuidanceSpec(
    name="still", title="the still model", build=StillGuidance, settings=lambda config: {"strength": 1.0},
    check_prompt=_check_prompt, adapt=_adapt, examples=lambda: ["a still cube"],
)


@pytest.fixture
def still_model():
    registry.register(FAKE)
    yield FAKE
    registry.unregister(FAKE.name)
    workers.forget_guidance()


def test_the_built_in_models_and_auto():
    assert registry.names() == ("primitives", "stable-diffusion", "deepfloyd-if")
    assert registry.choices() == ("auto", *registry.names())
    assert registry.resolve_name("auto", torch.device("cpu")) == "primitives"
    assert registry.resolve_name("auto", torch.device("cuda")) == "stable-diffusion"
    with pytest.raises(ValueError, match="guidance name must be one of"):
        registry.get("dall-e")
    assert not registry.get("primitives").takes_model_id and registry.get("deepfloyd-if").takes_model_id


def test_resolve_checks_once_and_leaves_the_callers_config_alone():
    config = tiny_run_config()
    plan = resolve("  a white cube ", config)
    assert plan.prompt == "a white cube" and plan.device == torch.device("cpu") and plan.guidance_name == "primitives"
    assert plan.config.prior.background < 1.0 and config.prior.background == 1.0  # adapted: a copy
    assert plan.config.coarse.seed == plan.config.refine.seed == config.seed
    with pytest.raises(AttributeError):
        plan.prompt = "a red cube"  # frozen
    with pytest.raises(ValueError, match="not in the primitives prior's vocabulary|vocabulary"):
        resolve("a ceramic teapot", config)


def test_a_fourth_model_registered_in_one_file_runs_through_the_pipeline(still_model, tmp_path, one_thread):
    config = tiny_run_config(guidance="still")
    plan = resolve("a still cube", config)
    assert plan.guidance is still_model and plan.config.coarse.background == "white"
    assert isinstance(workers.guidance_for(plan), Guidance)
    done = pipeline.run_to_completion("a still cube", config, run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "finished" and record["guidance"] == "still"
    assert (tmp_path / "run" / "model.obj").stat().st_size > 0 and "obj" in done.paths
    assert "a still cube, front view" in workers.guidance_for(plan).texts  # SDS asked this model
    with pytest.raises(ValueError, match="cannot draw teapots"):  # its own prompt check, at the boundary
        pipeline.run_to_completion("a teapot", config, run_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_the_command_line_the_app_and_the_batch_offer_the_new_model(still_model, tmp_path):
    args = cli.parse_args(["a still cube", "--guidance", "still", "--device", "cpu"])
    assert cli.build_config(args).guidance == "still"
    assert app.build_plan("a still cube", "quick", "0", "still", 0, 0, 0, "export", "").guidance_name == "still"
    with pytest.raises(app.gr.Error, match="has no weights"):
        app.build_plan("a still cube", "quick", "0", "still", 0, 0, 0, "export", "some/id")
    lines = [(1, "a still cube"), (2, "a teapot")]
    with pytest.raises(ValueError, match="line 2: the still model cannot draw teapots"):
        check_prompts(tmp_path / "prompts.txt", lines, tiny_run_config(guidance="still"), "cpu")


@pytest.mark.slow
def test_a_process_keeps_both_prior_libraries_of_a_run_and_one_model_of_another_kind(still_model):
    workers.forget_guidance()
    plan = resolve("a red cube", tiny_run_config())
    assert plan.refine_config is not plan.config and not workers.guidance_loaded(plan, "refine")
    coarse_prior, refine_prior = workers.guidance_for(plan), workers.guidance_for(plan, "refine")
    assert coarse_prior.library_config.camera != refine_prior.library_config.camera
    # The next run finds both libraries in memory (the primitives prior keeps 2).
    assert workers.guidance_loaded(plan) and workers.guidance_loaded(plan, "refine")
    assert workers.guidance_for(plan).lib_u is coarse_prior.lib_u
    # A third library (other settings) drops the least recently used one.
    smaller = tiny_run_config()
    smaller.prior.renders_per_view = 3
    other = resolve("a red cube", smaller)
    workers.guidance_for(other)
    assert workers.guidance_loaded(other) and workers.guidance_loaded(plan) and not workers.guidance_loaded(plan, "refine")
    # A model of another kind is kept alone, and its refine stage asks for the same model.
    still = resolve("a still cube", tiny_run_config(guidance="still"))
    assert still.refine_config is still.config
    workers.guidance_for(still, "refine")
    assert workers.guidance_loaded(still) and not workers.guidance_loaded(plan) and not workers.guidance_loaded(other)
    workers.forget_guidance()

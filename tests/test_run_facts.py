"""run.json's facts about the device and the guidance model (stages/run_facts.py), on the CPU with a
tiny Stable Diffusion pipeline built here (no network)."""
import json

import pytest
import torch

from guidance import registry
from stages.config import from_dict, preset, to_dict
from stages.run_facts import device_facts, guidance_facts, peak_memory, reset_peak_memory
from tiny_pipelines import save_tiny_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


def test_guidance_facts_of_a_loaded_model(tiny_sd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = preset("standard")
    config.guidance, config.model_id, config.model_dtype = "stable-diffusion", str(tiny_sd), "bf16"
    spec = registry.get("stable-diffusion")
    spec.adapt(config, "a red cube")
    config.refine.sds.guidance_scale, config.refine.sds.guidance_scale_end = 50.0, 20.0
    config.refine.sds.texture_guidance_scale = 7.5
    model = spec.load(config, torch.device("cpu"))
    facts = guidance_facts(model, config)
    assert json.loads(json.dumps(facts)) == facts  # plain JSON, as run.json stores it
    assert facts["model_id"] == str(tiny_sd) and facts["model_revision"] is None  # a local folder has no revision
    assert facts["model_dtype"] == "bfloat16" and facts["model_dtype_setting"] == "bf16"
    assert facts["load_seconds"] > 0
    # The coarse stage leaves the scale to the model (SD's 100); the refine stage's is annealed from 50 to 20.
    assert facts["guidance_scale"]["coarse"] == {"start": 100.0, "end": 100.0,
                                                 "texture": config.coarse.sds.texture_guidance_scale}
    assert facts["guidance_scale"]["refine"] == {"start": 50.0, "end": 20.0, "texture": 7.5}


def test_device_facts_on_the_cpu():
    reset_peak_memory("cpu")  # nothing to reset on the CPU; must not fail
    facts = device_facts("cpu")
    assert json.loads(json.dumps(facts)) == facts
    assert facts["gpu"] is None and facts["cuda"] is None and facts["driver"] is None
    assert facts["raster_backend"] == "torch"  # "auto" on the CPU
    assert device_facts("cpu", "nvdiffrast")["raster_backend"] is None  # nvdiffrast needs CUDA tensors
    before = peak_memory("cpu")["process_rss_gb"]
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MB touched: the peak RSS can only grow
    assert block.sum() > 0 and peak_memory("cpu")["process_rss_gb"] >= before > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_facts_on_cuda():
    device = torch.device("cuda")
    reset_peak_memory(device)
    block = torch.ones(256 * 2**20, dtype=torch.uint8, device=device)
    facts = device_facts(device)
    assert facts["gpu"] and facts["cuda"] == torch.version.cuda
    assert facts["peak_memory"]["reserved_gb"] >= facts["peak_memory"]["allocated_gb"] >= 0.25
    del block


def test_model_dtype_round_trips_through_run_json_and_defaults_for_old_runs():
    config = preset("fast")
    config.model_dtype = "fp32"
    assert from_dict(json.loads(json.dumps(to_dict(config)))).model_dtype == "fp32"
    old = to_dict(preset("fast"))
    del old["model_dtype"]  # run.json written before the setting existed
    assert from_dict(old).model_dtype == "auto"

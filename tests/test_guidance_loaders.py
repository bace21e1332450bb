"""The hub loaders on tiny random pipelines built and saved here (no network, no weights).

Each test writes a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/) with seeded tiny models, loads it through the real loader, and runs one
SDS step through it. The CLIP tokenizer is built from a vocab.json/merges.txt written
here; the T5 tokenizer from a small Unigram vocabulary (T5Tokenizer accepts one
directly, so no sentencepiece model file is needed) and loaded back through AutoTokenizer.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from guidance import DEFAULT_SD_MODEL_ID, REMOVED_SD_MODEL_ID, GuidanceLoadError, load
from guidance.sds import SDSConfig, SDSLoss

WORDS = ["a", "red", "cube", "blue", "sphere", "front", "side", "back", "overhead", "view", ","]


def _tiny_unet(in_channels: int, out_channels: int, sample_size: int, **kwargs):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        **kwargs,
    )


def _tiny_clip_tokenizer(folder: str):
    """A byte-level BPE tokenizer from files written here: whole words and a few merges."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz,":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c u", "cu b", "cub e</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=os.path.join(folder, "vocab.json"), merges=os.path.join(folder, "merges.txt"), model_max_length=16
    )
    return tokenizer, len(vocab)


def _tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0 - i * 0.1) for i, word in enumerate(WORDS)]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0), len(pieces)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny Stable Diffusion pipeline in the diffusers layout: latents 8 px, images 16 px."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("tiny-sd")
    torch.manual_seed(0)
    _tiny_unet(4, 4, 8).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(folder / "vae")
    tokenizer, vocab_size = _tiny_clip_tokenizer(str(folder / "tokenizer_files"))
    tokenizer.save_pretrained(folder / "tokenizer")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        folder / "scheduler"
    )
    return folder


@pytest.fixture(scope="module")
def if_folder(tmp_path_factory):
    """A tiny DeepFloyd-IF-style stage I: pixels 16 px, 6 output channels, T5 encoder."""
    from diffusers import DDPMScheduler
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("tiny-if")
    torch.manual_seed(0)
    # IF projects the T5 states (4096 wide) to the cross-attention width; here 16 -> 32.
    _tiny_unet(3, 6, 16, encoder_hid_dim=16, encoder_hid_dim_type="text_proj").save_pretrained(folder / "unet")
    tokenizer, vocab_size = _tiny_t5_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    t5_config = T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    T5EncoderModel(t5_config).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range").save_pretrained(
        folder / "scheduler"
    )
    return folder


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
    assert guidance.text_encoder is None  # released after the prompts were embedded
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

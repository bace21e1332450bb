"""Stable Diffusion as a frozen latent-space guidance model (diffusers components).

Loads the UNet, VAE, CLIP text encoder, tokenizer and the noise schedule of a diffusers
pipeline folder or hub id (default: the SD 2.1 base community mirror). Nothing is
trained: every module is frozen and in eval mode. The SDS loss lives in guidance/sds.py.
"""
from __future__ import annotations

import os
import time

import torch
from torch import Tensor

from guidance.hub import (
    DEFAULT_SD_MODEL_ID,
    default_dtype,
    freeze,
    load_component,
    load_or_explain,
    model_revision,
    quiet_loading,
)
from guidance.hub_tuning import adapt_to_hub_model, file_examples, hub_settings
from guidance.model_folders import Family, expand_home
from guidance.registry import GuidanceSpec, register
from guidance.text_side import EmbeddingCache, Placement

SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # diffusers layout of the parts we load
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SD_FAMILY = Family(  # SD 1.x/2.x: the img2img pipeline saves the same components
    name="a Stable Diffusion 1.x/2.x pipeline",
    pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    tokenizer_files=(("tokenizer.json",), ("vocab.json", "merges.txt")),  # CLIP's BPE
)


def epsilon_from_prediction(
    prediction: Tensor,  # [B, C, h, w] the UNet's output
    x_t: Tensor,  # [B, C, h, w] the noisy input
    alpha_bar: Tensor,  # [B, 1, 1, 1] cumulative alpha at t
    prediction_type: str,  # the scheduler's prediction_type
) -> Tensor:  # [B, C, h, w] the noise
    """Convert a v- or x0-prediction to the noise, from x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
        return alpha_bar.sqrt() * prediction + (1.0 - alpha_bar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - alpha_bar.sqrt() * prediction) / (1.0 - alpha_bar).sqrt()
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


class StableDiffusionGuidance:
    """Frozen Stable Diffusion: `encode_prompt`, `encode_images`, `predict_noise` (epsilon)."""

    space = "latent"  # SDS runs on VAE latents
    default_guidance_scale = 100.0  # DreamFusion's CFG scale for SDS
    view_dependent_uncond = False  # the empty prompt needs no view word

    def __init__(
        self,
        model_id: str | os.PathLike = DEFAULT_SD_MODEL_ID,  # hub id or local folder in the diffusers layout
        *,
        device: torch.device | str,
        dtype: torch.dtype | None = None,  # None: fp16 on CUDA, fp32 elsewhere
        local_files_only: bool | None = None,  # None: follow HF_HUB_OFFLINE (and go offline when the hub is unreachable)
    ):
        self.model_id = expand_home(str(model_id))
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        start = time.perf_counter()
        load_or_explain(self._load, self.model_id, "Stable Diffusion", SD_SUBFOLDERS, DEFAULT_SD_MODEL_ID,
                        local_files_only, family=SD_FAMILY)
        self.load_seconds = time.perf_counter() - start  # reading the files and building the modules (run.json)
        self.revision = model_revision(self.model_id, "unet/config.json")  # the hub commit; None for a local folder

    def _load(self, local_files_only: bool) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        half = self.dtype == torch.float16
        common = {"local_files_only": local_files_only}
        # The UNet first: a wrong id or a missing network fails here, before the big downloads.
        unet = load_component(
            UNet2DConditionModel, self.model_id, "unet", fp16_variant=half, torch_dtype=self.dtype, **common
        )
        vae = load_component(AutoencoderKL, self.model_id, "vae", fp16_variant=half, torch_dtype=self.dtype, **common)
        text_encoder = load_component(
            CLIPTextModel, self.model_id, "text_encoder", fp16_variant=half, dtype=self.dtype, **common
        )
        tokenizer = CLIPTokenizer.from_pretrained(self.model_id, subfolder="tokenizer", **common)
        # Any scheduler config of the repository (PNDM, DDIM, ...) gives the same training schedule.
        scheduler = DDPMScheduler.from_pretrained(self.model_id, subfolder="scheduler", **common)
        self._setup(unet, vae, text_encoder, tokenizer, scheduler)

    @classmethod
    def from_components(cls, unet, vae, text_encoder, tokenizer, scheduler, *, device, dtype, model_id="components"):
        """A model from modules already built (random-weight benchmarks); they are cast to `dtype`."""
        model = cls.__new__(cls)
        model.model_id, model.device, model.dtype = model_id, torch.device(device), dtype
        model.load_seconds, model.revision = None, None
        with quiet_loading():  # diffusers warns about casting a model it did not load
            model._setup(unet.to(dtype), vae.to(dtype), text_encoder.to(dtype), tokenizer, scheduler)
        return model

    def _setup(self, unet, vae, text_encoder, tokenizer, scheduler) -> None:
        self.unet, self.vae, self.text_encoder = freeze(unet), freeze(vae), freeze(text_encoder)
        self.tokenizer = tokenizer
        # CLIP's encoder is small (0.7 GB for SD 2.1): all three stay on the device.
        self.placement = Placement(self.device, {"unet": unet, "vae": vae, "text_encoder": text_encoder}, exclusive=False)
        self.embeddings = EmbeddingCache(self._encode)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T]
        vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        sample_size = self.unet.config.sample_size
        sample_size = sample_size if isinstance(sample_size, int) else int(sample_size[0])
        self.resolution = sample_size * vae_scale  # 512 for SD 2.1 base (64 latents x 8)

    def encode_prompt(self, texts: list[str]) -> Tensor:  # [N, 77, D] CLIP hidden states
        """Embeddings of `texts`; each text is encoded once and then served from the cache."""
        return self.embeddings(texts)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.placement.use("text_encoder")(tokens.input_ids.to(self.device))[0]

    def encode_images(
        self,
        images: Tensor,  # [B, 3, H, W] in [0, 1] at `resolution`, differentiable
    ) -> Tensor:  # [B, 4, H/8, W/8] scaled latents, in the model dtype
        # The posterior mean: deterministic, and the VAE's posterior std is tiny anyway.
        posterior = self.vae.encode((images * 2.0 - 1.0).to(self.dtype)).latent_dist
        return posterior.mean * self.vae.config.scaling_factor

    def predict_noise(
        self,
        x_t: Tensor,  # [B, 4, h, w] noisy latents
        t: Tensor,  # [B] integer timesteps
        cond: Tensor,  # [B, 77, D] from encode_prompt
    ) -> Tensor:  # [B, 4, h, w] predicted noise, in x_t's dtype
        t = t.to(self.device)
        unet = self.placement.use("unet")
        prediction = unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return epsilon_from_prediction(prediction.float(), x_t.float(), alpha_bar, self.prediction_type).to(x_t.dtype)


def build(device, dtype=None, model_id=None, **kwargs) -> StableDiffusionGuidance:
    return StableDiffusionGuidance(model_id or DEFAULT_SD_MODEL_ID, device=device, dtype=dtype, **kwargs)


SPEC = register(GuidanceSpec(
    name="stable-diffusion", title="Stable Diffusion", build=build, settings=hub_settings,
    default_model_id=DEFAULT_SD_MODEL_ID, adapt=adapt_to_hub_model, examples=file_examples,
))

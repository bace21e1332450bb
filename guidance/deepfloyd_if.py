"""DeepFloyd IF stage I as a frozen pixel-space guidance model (64 px).

Loads the stage-I UNet, the T5 text encoder and tokenizer and the noise schedule from
a diffusers IF folder or hub id (layout of diffusers' IFPipeline: unet/, text_encoder/,
tokenizer/, scheduler/). The UNet predicts 2 x 3 channels: the noise and a learned
variance; SDS uses the noise only. The hub repository is gated. On CUDA the T5 encoder
and the UNet take turns on the GPU (guidance/text_side.py), so a 16 GB card holds IF-I-XL.
"""
from __future__ import annotations

import os
import time

import torch
from torch import Tensor

from guidance.hub import (
    DEFAULT_IF_MODEL_ID,
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
from guidance.stable_diffusion import PREDICTION_TYPES, epsilon_from_prediction
from guidance.text_side import EmbeddingCache, Placement

IF_SUBFOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")  # the stage-I parts SDS needs
IF_FAMILY = Family(  # stage I: the img2img and inpainting pipelines save the same UNet and T5
    name="a DeepFloyd IF stage I pipeline",
    pipelines=("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline"),
    tokenizer_files=(("tokenizer.json",), ("spiece.model",)),  # T5's SentencePiece vocabulary
)
MAX_PROMPT_TOKENS = 77  # IF's T5 prompt length (as in diffusers' IFPipeline)
GATED_NOTE = (
    f" DeepFloyd IF is gated: accept its licence on https://huggingface.co/{DEFAULT_IF_MODEL_ID} "
    "(logged in) and set HF_TOKEN to a token of that account."
)


def cast_as_loaded(text_encoder: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`text_encoder` cast to `dtype` as transformers' from_pretrained keeps it: in fp16 the modules
    its class lists in `_keep_in_fp32_modules` (T5's feed-forward output `wo`, which overflows in
    fp16) stay fp32. The random-weight benchmarks then measure the memory the real loader takes."""
    text_encoder.to(dtype)
    keep = set(getattr(text_encoder, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    for name, module in text_encoder.named_modules():
        if keep & set(name.split(".")):
            module.to(torch.float32)
    return text_encoder


class DeepFloydIFGuidance:
    """Frozen DeepFloyd IF stage I: `encode_prompt`, `predict_noise` (epsilon) on 64 px pixels."""

    space = "pixel"  # SDS runs on the image in [-1, 1]
    default_guidance_scale = 20.0  # IF needs a far lower CFG scale than SD for SDS
    view_dependent_uncond = False  # the empty prompt needs no view word

    def __init__(
        self,
        model_id: str | os.PathLike = DEFAULT_IF_MODEL_ID,  # hub id or local folder in the diffusers IF layout
        *,
        device: torch.device | str,
        dtype: torch.dtype | None = None,  # None: fp16 on CUDA, fp32 elsewhere
        local_files_only: bool | None = None,  # None: follow HF_HUB_OFFLINE (and go offline when the hub is unreachable)
        offload_text_encoder: bool | None = None,  # park T5 on the CPU while the UNet runs; None = on CUDA
    ):
        self.model_id = expand_home(str(model_id))
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.offload_text_encoder = self.device.type == "cuda" if offload_text_encoder is None else offload_text_encoder
        note = "" if os.path.isdir(self.model_id) else GATED_NOTE
        start = time.perf_counter()
        load_or_explain(self._load, self.model_id, "DeepFloyd IF", IF_SUBFOLDERS, DEFAULT_IF_MODEL_ID, local_files_only,
                        note, family=IF_FAMILY)
        self.load_seconds = time.perf_counter() - start  # reading the files and building the modules (run.json)
        self.revision = model_revision(self.model_id, "unet/config.json")  # the hub commit; None for a local folder

    def _load(self, local_files_only: bool) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, T5EncoderModel

        half = self.dtype == torch.float16
        common = {"local_files_only": local_files_only}
        # The UNet first: a wrong id, a gated repository or no network fails here, before the T5 download.
        # Both load into CPU memory; the placement moves each to the GPU when it is used.
        unet = load_component(
            UNet2DConditionModel, self.model_id, "unet", fp16_variant=half, torch_dtype=self.dtype, **common
        )
        text_encoder = load_component(
            T5EncoderModel, self.model_id, "text_encoder", fp16_variant=half, dtype=self.dtype, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(self.model_id, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(self.model_id, subfolder="scheduler", **common)
        self._setup(unet, text_encoder, tokenizer, scheduler)

    @classmethod
    def from_components(cls, unet, text_encoder, tokenizer, scheduler, *, device, dtype, model_id="components",
                        offload_text_encoder: bool | None = None):
        """A model from modules already built (random-weight benchmarks); they are cast to `dtype`."""
        model = cls.__new__(cls)
        model.model_id, model.device, model.dtype = model_id, torch.device(device), dtype
        model.offload_text_encoder = model.device.type == "cuda" if offload_text_encoder is None else offload_text_encoder
        model.load_seconds, model.revision = None, None
        with quiet_loading():  # diffusers warns about casting a model it did not load
            model._setup(unet.to(dtype), cast_as_loaded(text_encoder, dtype), tokenizer, scheduler)
        return model

    def _setup(self, unet, text_encoder, tokenizer, scheduler) -> None:
        self.unet, self.text_encoder, self.tokenizer = freeze(unet), freeze(text_encoder), tokenizer
        self.placement = Placement(
            self.device, {"unet": unet, "text_encoder": text_encoder}, exclusive=self.offload_text_encoder
        )
        self.embeddings = EmbeddingCache(self._encode)
        self.channels = self.unet.config.in_channels  # 3: RGB
        if self.unet.config.out_channels < self.channels:
            raise ValueError(
                f"the IF UNet must predict at least in_channels={self.channels} channels, "
                f"got out_channels={self.unet.config.out_channels}"
            )
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {list(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T]
        sample_size = self.unet.config.sample_size
        self.resolution = sample_size if isinstance(sample_size, int) else int(sample_size[0])  # 64 for IF-I

    def encode_prompt(self, texts: list[str]) -> Tensor:  # [N, 77, D] T5 hidden states
        """Embeddings of `texts`; each text is encoded once and then served from the cache."""
        return self.embeddings(texts)

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> Tensor:
        # IFPipeline's text preprocessing without caption cleaning: lower case, no outer spaces.
        tokens = self.tokenizer(
            [text.lower().strip() for text in texts],
            padding="max_length",
            max_length=MAX_PROMPT_TOKENS,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        encoder = self.placement.use("text_encoder")
        hidden = encoder(tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device))
        return hidden[0]

    def predict_noise(
        self,
        x_t: Tensor,  # [B, 3, 64, 64] noisy image
        t: Tensor,  # [B] integer timesteps
        cond: Tensor,  # [B, 77, D] from encode_prompt
    ) -> Tensor:  # [B, 3, 64, 64] predicted noise, in x_t's dtype
        t = t.to(self.device)
        unet = self.placement.use("unet")
        output = unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype)).sample
        prediction = output[:, : self.channels]  # the rest is the learned variance
        alpha_bar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return epsilon_from_prediction(prediction.float(), x_t.float(), alpha_bar, self.prediction_type).to(x_t.dtype)


def build(device, dtype=None, model_id=None, **kwargs) -> DeepFloydIFGuidance:
    return DeepFloydIFGuidance(model_id or DEFAULT_IF_MODEL_ID, device=device, dtype=dtype, **kwargs)


SPEC = register(GuidanceSpec(
    name="deepfloyd-if", title="DeepFloyd IF", build=build, settings=hub_settings,
    default_model_id=DEFAULT_IF_MODEL_ID, adapt=adapt_to_hub_model, examples=file_examples,
))

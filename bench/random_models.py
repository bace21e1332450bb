"""Guidance models with the architectures of the real ones and random weights: nothing is
downloaded, so speed and memory can be measured on any machine (`bench.speed`, `bench.gpu_check`).

The configs are those of the published checkpoints (their unet/, vae/ and text_encoder/
config.json): Stable Diffusion 2.1 base (UNet 866 M parameters, VAE 84 M, OpenCLIP ViT-H text
encoder 340 M) and DeepFloyd IF-I-XL (UNet 4.3 B, T5 v1.1 XXL encoder 4.8 B). Modules are
built directly on the target device (fast on a GPU) and cast to the dtype. The tokenizers are
stand-ins that hash words to ids (the real vocabularies are downloads too).
"""
from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch

SD21_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, upcast_attention=False,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
)
SD_VAE = dict(  # shared by SD 1.x and 2.x
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
SD21_TEXT = dict(  # OpenCLIP ViT-H's text tower as a transformers CLIPTextModel
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)
IF_I_XL_UNET = dict(
    sample_size=64, in_channels=3, out_channels=6, layers_per_block=3, block_out_channels=(704, 1408, 2112, 2816),
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                      "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                    "ResnetUpsampleBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=2816, attention_head_dim=64,
    encoder_hid_dim=4096, encoder_hid_dim_type="text_proj", addition_embed_type="text",
    addition_embed_type_num_heads=64, act_fn="gelu", cross_attention_norm="group_norm",
    resnet_time_scale_shift="scale_shift",
)
T5_XXL = dict(  # google/t5-v1_1-xxl's encoder, which IF uses
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False,
)


class HashTokenizer:
    """Stands in for a real tokenizer (its vocabulary files are a download): words -> ids by hash."""

    def __init__(self, vocab_size: int, model_max_length: int = 77):
        self.vocab_size, self.model_max_length = vocab_size, model_max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def __call__(self, texts, padding=None, max_length: int | None = None, truncation: bool = True,
                 return_tensors="pt", add_special_tokens: bool = True):
        max_length = max_length or self.model_max_length
        ids = torch.full((len(texts), max_length), self.eos, dtype=torch.long)  # padded with end tokens, as SD 2
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            words = [zlib.crc32(w.encode()) % self.bos for w in text.split()][: max_length - 2]
            tokens = [self.bos, *words, self.eos]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


def _build(cls, device: torch.device, dtype: torch.dtype, *args, **kwargs):
    """cls(*args, **kwargs) with its parameters allocated and initialised on `device`, then cast
    (quietly: diffusers warns about casting a model it did not load)."""
    from guidance.hub import quiet_loading

    with torch.device(device), quiet_loading():
        return cls(*args, **kwargs).to(dtype)


def random_stable_diffusion(device: torch.device, dtype: torch.dtype, unet: dict = SD21_BASE_UNET,
                            vae: dict = SD_VAE, text: dict = SD21_TEXT):
    """StableDiffusionGuidance with random weights of the given architectures (default: SD 2.1 base)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from guidance.stable_diffusion import StableDiffusionGuidance

    device = torch.device(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return StableDiffusionGuidance.from_components(
        _build(UNet2DConditionModel, device, dtype, **unet), _build(AutoencoderKL, device, dtype, **vae),
        _build(CLIPTextModel, device, dtype, CLIPTextConfig(**text)), HashTokenizer(text["vocab_size"]), scheduler,
        device=device, dtype=dtype, model_id="random weights (SD 2.1 base architecture)",
    )


def random_deepfloyd_if(device: torch.device, dtype: torch.dtype, unet: dict = IF_I_XL_UNET, text: dict = T5_XXL,
                        offload_text_encoder: bool | None = None):
    """DeepFloydIFGuidance with random weights of the given architectures (default: IF-I-XL and T5-XXL).

    On CUDA the T5 is built on the GPU (fast) and parked on the CPU before the UNet is built, as
    the loader keeps them: the two never share the GPU when `offload_text_encoder` is on."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from guidance.deepfloyd_if import DeepFloydIFGuidance

    device = torch.device(device)
    offload = device.type == "cuda" if offload_text_encoder is None else offload_text_encoder
    text_encoder = _build(T5EncoderModel, device, dtype, T5Config(**text))
    if offload:
        text_encoder.to("cpu")
        torch.cuda.empty_cache() if device.type == "cuda" else None
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range")
    return DeepFloydIFGuidance.from_components(
        _build(UNet2DConditionModel, device, dtype, **unet), text_encoder, HashTokenizer(text["vocab_size"]), scheduler,
        device=device, dtype=dtype, model_id="random weights (IF-I-XL architecture)", offload_text_encoder=offload,
    )

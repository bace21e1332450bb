"""Tiny random Stable Diffusion and DeepFloyd IF pipelines, built from seeds and saved in the
diffusers layout (no network, no weights): the loaders' tests and the end-to-end runs use them.

The CLIP tokenizer is built from a vocab.json/merges.txt written here; the T5 tokenizer from
a small Unigram vocabulary (T5Tokenizer accepts one directly, so no sentencepiece model file
is needed) and is loaded back through AutoTokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

WORDS = ["a", "red", "cube", "blue", "sphere", "green", "front", "side", "back", "overhead", "view", ","]


def tiny_unet(in_channels: int, out_channels: int, sample_size: int, **kwargs):
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


def tiny_clip_tokenizer(folder: str):
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


def tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0 - i * 0.1) for i, word in enumerate(WORDS)]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0), len(pieces)


def save_tiny_sd(folder: str | os.PathLike) -> Path:
    """A tiny Stable Diffusion pipeline in the diffusers layout: latents 8 px, images 16 px."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(0)
    tiny_unet(4, 4, 8).save_pretrained(folder / "unet")
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
    tokenizer, vocab_size = tiny_clip_tokenizer(str(folder / "tokenizer_files"))
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


def save_tiny_if(folder: str | os.PathLike) -> Path:
    """A tiny DeepFloyd-IF-style stage I: pixels 16 px, 6 output channels, T5 encoder."""
    from diffusers import DDPMScheduler
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(0)
    # IF projects the T5 states (4096 wide) to the cross-attention width; here 16 -> 32.
    tiny_unet(3, 6, 16, encoder_hid_dim=16, encoder_hid_dim_type="text_proj").save_pretrained(folder / "unet")
    tokenizer, vocab_size = tiny_t5_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    t5_config = T5Config(
        vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    T5EncoderModel(t5_config).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range").save_pretrained(
        folder / "scheduler"
    )
    return folder

"""Tiny random-init diffusers pipelines saved by diffusers and transformers themselves, for offline tests: the real
directory layout (model_index.json, scheduler config, transformers text encoder and tokenizer) at toy widths.

The CLIP tokenizer is the real one: its vocab.json and merges.txt are written from the BPE table open_clip ships
(`write_clip_tokenizer_files`, which `genart export` uses too), so captions tokenize exactly as Stable Diffusion's
tokenizer does them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genart_lightning.nn.openclip_export import CLIP_VOCAB, write_clip_tokenizer_files

TEXT_WIDTH = 32


def clip_text_config():
    """A 2-layer CLIP text transformer of width 32 over CLIP's full vocabulary and 77 positions."""
    import transformers

    return transformers.CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=TEXT_WIDTH, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                       projection_dim=TEXT_WIDTH)


def tiny_diffusers_vae(**settings):
    """An AutoencoderKL taking 16px images to 4 x 8 x 8 latents; `settings` set its scaling and shift factors."""
    import diffusers

    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                   norm_num_groups=8, sample_size=16, **settings)


def tiny_diffusers_unet(**settings):
    """A two-level UNet2DConditionModel over 4-channel latents, cross-attending at its first level; `settings` add
    the text width and SDXL's extra conditioning."""
    import diffusers

    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                          layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
                                          norm_num_groups=8, **settings)


def tiny_sd_pipeline(root: Path, prediction_type: str = "epsilon") -> Path:
    """A Stable Diffusion 1.x-style pipeline: 16px images -> 4 x 8 x 8 latents, a 2-layer CLIP text encoder of width
    32, a DDIM scheduler with SD 1.5's settings (scaled_linear betas, leading spacing, steps_offset 1)."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(root / "clip_bpe"), model_max_length=77)
    text_encoder = transformers.CLIPTextModel(clip_text_config())
    vae, unet = tiny_diffusers_vae(), tiny_diffusers_unet(cross_attention_dim=TEXT_WIDTH)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading", prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    return root / "sd"


def tiny_sdxl_pipeline(root: Path) -> Path:
    """An SDXL-style pipeline: two CLIP text encoders of width 32 (the second with a 32-wide projection), token states
    concatenated to 64, a U-Net reading the pooled vector and six size ids (`addition_embed_type: text_time`), empty
    prompts as zeros, and SDXL's Euler scheduler settings."""
    import diffusers
    import transformers

    torch.manual_seed(1)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(root / "clip_bpe"), model_max_length=77)
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(root / "clip_bpe", model_max_length=77, pad_token="!")
    text_encoder = transformers.CLIPTextModel(clip_text_config())
    text_encoder_2 = transformers.CLIPTextModelWithProjection(clip_text_config())
    vae = tiny_diffusers_vae()
    unet = tiny_diffusers_unet(cross_attention_dim=2 * TEXT_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                               scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


T5_WORDS = ["a", "an", "the", "red", "green", "blue", "yellow", "circle", "square", "triangle", "small", "large", "big", "on", "of", "picture", "photo"]


def tiny_pixart_pipeline(root: Path, name: str = "PixArtSigmaPipeline") -> Path:
    """A PixArt-style pipeline: a 2-layer T5 encoder of width 32 with a Unigram tokenizer over a few words and the
    letters, a PixArt transformer (patch 2, learned variance: 8 output channels over 4 latent ones) cross-attending to
    its masked states, the tiny VAE, and PixArt's DPM-Solver++ scheduler settings."""
    import diffusers
    import transformers

    torch.manual_seed(2)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    pieces += [("\u2581" + w, -1.0 - i / 100) for i, w in enumerate(T5_WORDS)] + [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = transformers.T5Tokenizer(vocab=pieces, extra_ids=0)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(pieces), d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=2))
    transformer = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, caption_channels=TEXT_WIDTH, cross_attention_dim=16, norm_num_groups=1)
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                                                      timestep_spacing="trailing", final_sigmas_type="zero")
    pipe = getattr(diffusers, name)(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_diffusers_vae(),
                                    transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(root / "pixart")
    return root / "pixart"

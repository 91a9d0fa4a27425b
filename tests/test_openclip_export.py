"""An OpenCLIP-conditioned model out as a whole Stable Diffusion pipeline: the tiny OpenCLIP tower as a transformers
CLIPTextModel with CLIP's tokenizer (nn/openclip_export.py), and `genart export --diffusers` of a model over a diffusers
VAE and U-Net, loaded by `DiffusionPipeline.from_pretrained` and sampling what `genart sample` samples.

Tolerances. Token ids: equal. Token states: 1e-5 in float32 (measured 0.0 on these captions, up to 2e-6 on other
batches: OpenCLIP's nn.MultiheadAttention sums in another order than transformers' attention, over the same weights),
and 1e-12 in float64 (measured 4e-15): a wrong key, layer count or pad id is off by O(1) (a tower one block too deep:
3.3). Samples: 1e-5 on images in [0, 1], as in tests/test_pipelines.py (measured 2.5e-6).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import save_untrained
from tiny_pipelines import tiny_diffusers_unet, tiny_diffusers_vae

from genart_lightning.commands.export import openclip_pipeline_blocker
from genart_lightning.diffusion.flow import Flow
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.diffusers_parts import DiffusersUNetBackbone
from genart_lightning.nn.openclip_export import clip_text_model, clip_tokenizer
from genart_lightning.nn.text_encoder import FrozenTextEncoder

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red circle", "", "wow! a blue square, left of a green triangle",
            "a very long caption that runs past the tiny tower's context length of thirty-two tokens, " * 2]
SIZE = 16


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny AutoencoderKL (16px -> 4 x 8 x 8, no shift: StableDiffusionPipeline applies none) and a
    UNet2DConditionModel cross-attending to the tiny OpenCLIP tower's 64-wide tokens, each saved by diffusers."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vae, unet = tiny_diffusers_vae(scaling_factor=0.6), tiny_diffusers_unet(cross_attention_dim=64)
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    return {"vae": str(root / "vae"), "unet": str(root / "unet")}


def latent_model(pretrained: dict[str, str], **overrides) -> LatentDiffusion:
    settings = dict(image_size=SIZE, process=VP(schedule="scaled_linear", prediction="v", timestep_spacing="trailing"),
                    conditioning="tokens", text_layer="penultimate", sample_steps=2, guidance_scale=3.0,
                    first_stage={"class_path": "genart_lightning.nn.diffusers_parts.DiffusersAutoencoder",
                                 "init_args": {"path": pretrained["vae"]}},
                    backbone=DiffusersUNetBackbone(path=pretrained["unet"]))
    return LatentDiffusion(**(settings | overrides))


def padded(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as diffusers' pipelines ask for them: padded and truncated to the tokenizer's model_max_length."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@pytest.mark.parametrize("layer", ["final", "penultimate"])
def test_openclip_tower_converts_to_clip_text_model_exactly(layer):
    ours = FrozenTextEncoder(layer=layer)
    theirs, tokenizer = clip_text_model(ours), clip_tokenizer(ours)
    blocks = len(ours.clip.transformer.resblocks)
    assert theirs.config.num_hidden_layers == blocks - (layer == "penultimate")
    assert (theirs.config.hidden_act, theirs.config.layer_norm_eps, tokenizer.model_max_length) == ("gelu", 1e-5, 32)
    ids = padded(tokenizer, CAPTIONS)
    assert torch.equal(ids, ours.tokenize(CAPTIONS))  # every position: "!" of a caption, truncation and padding too
    with torch.no_grad():
        expected = ours(CAPTIONS)
        torch.testing.assert_close(theirs(ids).last_hidden_state, expected.tokens, atol=1e-5, rtol=0)
        ours64, theirs64 = copy.deepcopy(ours).double(), copy.deepcopy(theirs).double()
        expected64 = ours64(CAPTIONS)
        out64 = theirs64(ids)
        torch.testing.assert_close(out64.last_hidden_state, expected64.tokens, atol=1e-12, rtol=0)
        if layer == "final":  # CLIP's pooled end-token state; the projection is CLIP's own, not exported
            torch.testing.assert_close(out64.pooler_output @ ours64.clip.text_projection, expected64.pooled, atol=1e-12,
                                       rtol=0)
        # transformers' default pad (the end token) changes every state after the end token, which the U-Net reads
        eos_padded = ids.masked_fill(ids == 0, tokenizer.eos_token_id)
        other = theirs(eos_padded).last_hidden_state[0]
        end = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        torch.testing.assert_close(other[:end + 1], expected.tokens[0, :end + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(other[end + 1:], expected.tokens[0, end + 1:], atol=1e-3)


def test_openclip_model_exports_a_pipeline_diffusers_loads_and_samples_alike(pretrained, tmp_path, capsys):
    from safetensors.torch import load_file

    from genart_lightning.cli import main as genart

    torch.manual_seed(0)
    model = latent_model(pretrained)
    with torch.no_grad():  # EMA weights of their own, so the test sees which weights were written
        for p in model.ema.module.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ckpt = save_untrained(model, tmp_path / "model.ckpt")
    out = tmp_path / "out"
    genart(["export", "--ckpt", str(ckpt), "--diffusers", str(out)])
    assert f"wrote {out} (a diffusers pipeline: scheduler, text_encoder, tokenizer, unet, vae;" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert all(k.startswith("text_model.") for k in load_file(out / "text_encoder" / "model.safetensors"))
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}

    reloaded = load_model(ckpt)
    openclip = reloaded.text_encoder.tokenizer
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")
    for caption in CAPTIONS[:3]:
        ids = openclip([caption])[0].tolist()
        assert tokenizer(caption).input_ids == ids[:ids.index(openclip.eot_token_id) + 1]
    assert torch.equal(padded(tokenizer, CAPTIONS), reloaded.text_encoder.tokenize(CAPTIONS))

    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.num_hidden_layers == 1  # penultimate of the 2-block tower
    captions = CAPTIONS[:2] + CAPTIONS[3:]
    ours = (reloaded.sample(len(captions), captions, seed=3) + 1) / 2
    noise = torch.randn((len(captions), *reloaded.diffusion_shape()), generator=torch.Generator().manual_seed(3))
    theirs = pipe(captions, num_inference_steps=2, guidance_scale=3.0, latents=noise * pipe.scheduler.init_noise_sigma,
                  height=SIZE, width=SIZE, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_models_without_a_matching_pipeline_keep_unet_and_vae_with_the_reason(pretrained):
    assert openclip_pipeline_blocker(latent_model(pretrained)) is None
    assert openclip_pipeline_blocker(latent_model(pretrained, process=Flow())) == (
        "a flow process has no diffusers scheduler written by genart yet")
    masked = latent_model(pretrained, backbone=DiffusersUNetBackbone(path=pretrained["unet"], attention_mask=True))
    assert openclip_pipeline_blocker(masked) == ("its U-Net reads the caption mask or size ids, which "
                                                 "StableDiffusionPipeline does not pass")
    leading = latent_model(pretrained, process=VP(timestep_spacing="leading"))
    assert openclip_pipeline_blocker(leading) == ("'leading' timesteps with steps_offset 0 have no Stable Diffusion "
                                                  "pipeline: its constructor rewrites steps_offset to 1")

"""A whole diffusers pipeline in and out, on a tiny random-init Stable Diffusion pipeline saved by diffusers and
transformers themselves (tests/tiny_pipelines.py): one setting names the directory; backbone, first stage, CLIP
text encoder + tokenizer and process come from it; a fine-tune exports back to a directory that
`DiffusionPipeline.from_pretrained` loads and that samples what `genart sample` samples from the same noise.

Tolerance of the sample comparisons: 1e-5 on images in [0, 1]. Both sides run the same networks in float32; the
differences come from summation order (guidance in one doubled batch here, two halves of one batch there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import STEP, cpu_trainer, genart_in_process, save_untrained, shards_data, write_mixed_shards
from tiny_pipelines import tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

from genart_lightning import UserError
from genart_lightning.diffusion.diffusers_schedulers import process_from_scheduler, scheduler_for
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.latent_diffusion import LatentDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.transformers_text import TransformersTextEncoder

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CAPTIONS = ["a red circle", "a blue square"]
SIZE = 16


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sd_pipeline(tmp_path_factory.mktemp("pipelines"))


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("pipelines_xl"))


def ddim_like_ours(pipe):
    """The pipeline with its scheduler's DDIM ending on clean data, as genart's ddim does."""
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True, clip_sample=False)
    return pipe


def pipeline_images(pipe, captions: list[str], seed: int, steps: int, guidance: float, latent_shape: tuple[int, ...]):
    """The pipeline's images in [0, 1], started from the noise `genart sample` draws for `seed` (CPU generator)."""
    noise = torch.randn((len(captions), *latent_shape), generator=torch.Generator().manual_seed(seed))
    return pipe(captions, num_inference_steps=steps, guidance_scale=guidance, latents=noise * pipe.scheduler.init_noise_sigma,
                height=SIZE, width=SIZE, output_type="pt").images


def test_one_setting_reads_the_whole_pipeline_and_samples_as_it_does(sd_pipeline):
    model = LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), sample_steps=2, guidance_scale=3.0)
    process = model.process
    assert isinstance(process, VP) and isinstance(model.text_encoder, TransformersTextEncoder)
    assert (process.schedule, process.beta_start, process.beta_end, process.prediction, process.timestep_spacing,
            process.steps_offset) == ("scaled_linear", 0.00085, 0.012, "eps", "leading", 1)
    assert model.hparams.sampler == "ddim" and model.hparams.conditioning == "tokens"
    source = diffusers.DiffusionPipeline.from_pretrained(sd_pipeline)
    torch.testing.assert_close(process.alphas_cumprod.float(), source.scheduler.alphas_cumprod, atol=1e-6, rtol=0)
    # the pipeline's own DDIM ends at alphas_cumprod[0] (set_alpha_to_one false); ours ends on clean data
    ours = (model.sample(2, CAPTIONS, seed=0) + 1) / 2
    theirs = pipeline_images(ddim_like_ours(source), CAPTIONS, 0, 2, 3.0, model.diffusion_shape())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_fine_tune_exports_a_pipeline_diffusers_loads_and_samples_alike(sd_pipeline, shapes_shards_16px, tmp_path, capsys):
    from genart_lightning.cli import main as genart

    torch.manual_seed(0)
    model = LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), sample_steps=2, guidance_scale=2.0, lr=1e-3,
                            ema_decay=0.5, train_text_encoder=True, process={"class_path": "genart_lightning.diffusion.vp.VP",
                            "init_args": {"schedule": "scaled_linear", "timestep_spacing": "trailing"}})
    text_before = {k: v.clone() for k, v in model.text_encoder.model.state_dict().items()}
    cpu_trainer(tmp_path, 4).fit(model, datamodule=shards_data(shapes_shards_16px, batch_size=8))
    assert any(not torch.equal(v, model.text_encoder.model.state_dict()[k]) for k, v in text_before.items())
    ckpt = save_untrained(model, tmp_path / "tuned.ckpt")
    genart(["export", "--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out")])
    assert "a diffusers pipeline" in capsys.readouterr().out
    out = tmp_path / "out"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    from safetensors.torch import load_file

    assert all(k.startswith("text_model.") for k in load_file(out / "text_encoder" / "model.safetensors"))
    slow = transformers.CLIPTokenizer.from_pretrained(out / "tokenizer")  # reads vocab.json / merges.txt too
    assert slow(CAPTIONS[0]).input_ids == model.text_encoder.tokenizer(CAPTIONS[0]).input_ids

    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    reloaded = load_model(ckpt)
    ours = (reloaded.sample(2, CAPTIONS, seed=4) + 1) / 2
    torch.testing.assert_close(ours, pipeline_images(pipe, CAPTIONS, 4, 2, 2.0, reloaded.diffusion_shape()), atol=1e-5, rtol=0)
    source = diffusers.DiffusionPipeline.from_pretrained(sd_pipeline)  # the fine-tune moved away from the source
    source.scheduler = pipe.scheduler
    assert not torch.allclose(ours, pipeline_images(source, CAPTIONS, 4, 2, 2.0, reloaded.diffusion_shape()), atol=1e-3)


ZERO_SNR_V = dict(schedule="scaled_linear", beta_start=0.001, beta_end=0.015, prediction="v", zero_terminal_snr=True,
                 timestep_spacing="trailing")
COSINE_LEADING = dict(schedule="cosine", prediction="eps", timestep_spacing="leading", steps_offset=1)


@pytest.mark.parametrize(("sampler", "settings"), [(s, ZERO_SNR_V) for s in ("ddim", "dpmpp_2m", "ddpm")]  # no Karras
                         + [(s, COSINE_LEADING) for s in ("ddim", "dpmpp_2m", "euler", "ddpm")])  # sigmas at SNR 0
def test_scheduler_written_for_a_process_has_its_schedule_and_reads_back_to_it(sampler, settings):
    process = VP(**settings)
    name, config = scheduler_for(process, sampler)
    scheduler = getattr(diffusers, name).from_config(config)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), process.alphas_cumprod, atol=1e-6, rtol=0)
    if sampler in ("ddim", "ddpm"):
        scheduler.set_timesteps(7)
        assert scheduler.timesteps.tolist() == list(process.grid(sampler, 7, (4, 8, 8)).time[:-1])
    reading = process_from_scheduler(dict(scheduler.config) | {"_class_name": name})
    assert reading.sampler == sampler and reading.note is None
    assert {k: getattr(reading.process, k) for k in settings} == settings


def test_pipeline_mistakes_are_one_line(sd_pipeline, tmp_path):
    with pytest.raises(UserError, match="pipeline directory not found: /no/such/pipeline; copy"):
        LatentDiffusion(image_size=SIZE, pipeline="/no/such/pipeline")
    with pytest.raises(UserError, match="is not a diffusers pipeline directory \\(no model_index.json\\)"):
        LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline / "unet"))
    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UserError, match="holds a StableDiffusion3Pipeline, which genart does not read as a whole yet; readable: Stable"):
        LatentDiffusion(image_size=SIZE, pipeline=str(sd3))
    from genart_lightning.models.diffusion import PixelDiffusion

    with pytest.raises(ValueError, match="a diffusers pipeline diffuses latents; use .*LatentDiffusion"):
        PixelDiffusion(image_size=SIZE, pipeline=str(sd_pipeline))
    with pytest.raises(ValueError, match="backbone reads no image sizes \\(SDXL's U-Net does\\); drop original_size"):
        LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline)).sample(1, ["a"], original_size=(32, 32))
    flow = json.loads((sd_pipeline / "scheduler" / "scheduler_config.json").read_text()) | {
        "_class_name": "FlowMatchEulerDiscreteScheduler"}
    with pytest.raises(ValueError, match="is a flow-matching scheduler"):
        process_from_scheduler(flow)


def test_lora_on_unet_and_text_encoder_trains_exports_in_both_formats_and_loads_back(sd_pipeline, shapes_shards_16px,
                                                                                      tmp_path):
    """Alpha 8 over rank 4: a file that lost alpha would load at half the adapters' strength."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from genart_lightning.cli import main as genart

    torch.manual_seed(0)
    model = LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), lora={"rank": 4, "alpha": 8, "text_encoder": True},
                            ema_decay=0.5, lr=1e-3)
    text_adapters = {n: p.clone() for n, p in model.text_encoder.named_parameters() if p.requires_grad}
    assert text_adapters and all("lora_" in n for n in text_adapters)
    cpu_trainer(tmp_path, 2).fit(model, datamodule=shards_data(shapes_shards_16px, batch_size=8))
    assert any(not torch.equal(p, text_adapters[n]) for n, p in model.text_encoder.named_parameters() if p.requires_grad)
    with torch.no_grad():  # adapters of a visible size (two steps move them by about the learning rate)
        for network in (model.ema.module, model.text_ema.module):
            for name, p in network.named_parameters():
                if "lora_" in name:
                    p.add_(0.2 * torch.randn_like(p))
    ckpt = save_untrained(model, tmp_path / "lora.ckpt")
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all("lora_" in k for k in saved if k.startswith(("text_encoder.", "text_ema.module.")))  # the base stays out
    genart(["export", "--ckpt", str(ckpt), "--lora", "diffusers", "--out", str(tmp_path / "diffusers_lora")])
    genart(["export", "--ckpt", str(ckpt), "--lora", "kohya", "--out", str(tmp_path / "lora_kohya.safetensors")])
    kohya = load_file(tmp_path / "lora_kohya.safetensors")
    for name in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):  # transformers 4's (and kohya's) CLIP names
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(kohya)
        assert float(kohya[f"{name}.alpha"]) == 8.0

    net, text = model.ema.module.eval(), model.text_ema.module
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, 32)
    ids = text.tokenize(CAPTIONS)[0]
    with torch.no_grad():
        adapted, adapted_text = net(x, t, context=context), text(CAPTIONS).tokens
        for file in (tmp_path / "diffusers_lora" / "pytorch_lora_weights.safetensors", tmp_path / "lora_kohya.safetensors"):
            pipe = diffusers.DiffusionPipeline.from_pretrained(sd_pipeline)
            base, base_text = pipe.unet(x, t, encoder_hidden_states=context).sample, pipe.text_encoder(ids)[0]
            pipe.load_lora_weights(file)
            torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample, adapted, atol=1e-5, rtol=0)
            torch.testing.assert_close(pipe.text_encoder(ids)[0], adapted_text, atol=1e-5, rtol=0)
        assert not torch.allclose(base, adapted, atol=1e-3) and not torch.allclose(base_text, adapted_text, atol=1e-3)
        # the kohya file as the starting adapters of a new fine-tune, configured with another alpha
        restarted = LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), lora={
            "rank": 4, "alpha": 2, "text_encoder": True, "weights": str(tmp_path / "lora_kohya.safetensors")})
        torch.testing.assert_close(restarted.backbone.eval()(x, t, context=context), adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(restarted.ema.module.eval()(x, t, context=context), adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(restarted.text_encoder(CAPTIONS).tokens, adapted_text, atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="has rank 4 adapters, the config lora.rank 8; set lora.rank: 4"):
        LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), lora={
            "rank": 8, "text_encoder": True, "weights": str(tmp_path / "lora_kohya.safetensors")})
    with pytest.raises(UserError, match="adapts a text encoder this model does not .*lora.text_encoder"):
        LatentDiffusion(image_size=SIZE, pipeline=str(sd_pipeline), lora={
            "rank": 4, "weights": str(tmp_path / "lora_kohya.safetensors")})
    # merged into a whole pipeline: the text encoder's adapters are folded in as well
    genart(["export", "--ckpt", str(ckpt), "--merge-lora", "--diffusers", str(tmp_path / "merged")])
    merged = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged.text_encoder(ids)[0], adapted_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged.unet(x, t, encoder_hidden_states=context).sample, adapted, atol=1e-5, rtol=0)


def test_sdxl_pipeline_reads_both_text_encoders_and_size_ids_and_exports_back(sdxl_pipeline, shapes_shards_16px, tmp_path,
                                                                               capsys):
    from genart_lightning.cli import main as genart
    from genart_lightning.nn.transformers_text import TextEncoderPair

    model = LatentDiffusion(image_size=SIZE, pipeline=str(sdxl_pipeline), sample_steps=2, guidance_scale=3.0,
                            sampler="ddim", lr=1e-3, ema_decay=0.5)
    assert isinstance(model.text_encoder, TextEncoderPair) and model.reads_sizes
    assert (model.hparams.text_layer, model.hparams.conditioning) == ("penultimate", "both")
    empty = model.text_encoder([""])
    assert not empty.tokens.any() and not empty.pooled.any()  # force_zeros_for_empty_prompt
    ours = (model.sample(2, CAPTIONS, seed=1) + 1) / 2
    source = ddim_like_ours(diffusers.DiffusionPipeline.from_pretrained(sdxl_pipeline))
    torch.testing.assert_close(ours, pipeline_images(source, CAPTIONS, 1, 2, 3.0, model.diffusion_shape()), atol=1e-5,
                               rtol=0)
    # what the U-Net is told about sizes changes what it predicts
    cond = model.encode_text(CAPTIONS)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 600.0])
    ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    with torch.no_grad():
        outputs = [model.backbone(x, t, **cond, size_ids=ids + torch.tensor(change))
                   for change in ([0.0] * 6, [48.0, 8, 0, 0, 0, 0], [0.0, 0, 4, 0, 0, 0])]
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4) and not torch.allclose(outputs[0], outputs[2], atol=1e-4)
    # a 4-step full fine-tune, then export what it samples with
    cpu_trainer(tmp_path, 4).fit(model, datamodule=shards_data(shapes_shards_16px, batch_size=8))
    ckpt = save_untrained(model, tmp_path / "xl.ckpt")
    genart(["export", "--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out")])
    assert "a diffusers pipeline" in capsys.readouterr().out
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "out" / "tokenizer_2").iterdir()}
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "out")
    reloaded = load_model(ckpt)
    ours = (reloaded.sample(2, CAPTIONS, seed=2, original_size=(32, 24), crop_top_left=(4, 0)) + 1) / 2
    noise = torch.randn((2, *reloaded.diffusion_shape()), generator=torch.Generator().manual_seed(2))
    theirs = pipe(CAPTIONS, num_inference_steps=2, guidance_scale=3.0, latents=noise, height=SIZE, width=SIZE,
                  original_size=(32, 24), crops_coords_top_left=(4, 0), output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    code, _, err = genart_in_process("sample", "--ckpt", str(ckpt), "--num", "2", "--prompt", CAPTIONS[0], "--steps", "2",
                                     "--original-size", "32,24", "--crop-top-left", "4,0", "--out", str(tmp_path / "g.png"))
    assert code == 0 and (tmp_path / "g.png").is_file(), err
    code, _, err = genart_in_process("sample", "--ckpt", str(ckpt), "--original-size", "32")
    assert code == 2 and "'32' is not two integers A,B" in err


def test_bucketed_sdxl_fit_feeds_each_batch_its_own_size_ids(sdxl_pipeline, tmp_path):
    from lightning.pytorch import Callback

    from datamodules.webdataset import TextImageDataModule

    urls = write_mixed_shards(tmp_path / "mixed", 48, per_shard=24)
    model = LatentDiffusion(image_size=32, pipeline=str(sdxl_pipeline), lr=1e-4)
    received, expected = [], []
    model.backbone.unet.register_forward_pre_hook(
        lambda module, args, kwargs: received.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)

    class Batches(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            height, width = batch["image"].shape[-2:]
            target = torch.tensor([[height, width]] * len(batch["caption"]))
            expected.append(torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float())

    data = TextImageDataModule(urls, batch_size=4, num_workers=0, image_size=32, buckets="auto", bucket_step=STEP,
                               shuffle_buffer=8)
    cpu_trainer(tmp_path, 4, callbacks=[Batches()]).fit(model, datamodule=data)
    assert len(received) == len(expected) == 4
    assert len({tuple(e[0, 4:].tolist()) for e in expected}) > 1  # several buckets were drawn
    assert any(e[:, :2].ne(e[:, 4:]).any() for e in expected)  # original sizes that are not the bucket's
    for got, want in zip(received, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sdxl_lora_in_kohya_sgm_names_loads_in_diffusers_and_back(sdxl_pipeline, tmp_path):
    pytest.importorskip("peft")
    from genart_lightning.cli import main as genart

    torch.manual_seed(0)
    model = LatentDiffusion(image_size=SIZE, pipeline=str(sdxl_pipeline), lora={"rank": 2, "alpha": 6, "text_encoder": True})
    with torch.no_grad():
        for network in (model.ema.module, model.text_ema.module):
            for name, p in network.named_parameters():
                if "lora_" in name:
                    p.add_(0.2 * torch.randn_like(p))
    genart(["export", "--ckpt", str(save_untrained(model, tmp_path / "xl_lora.ckpt")), "--lora", "kohya",
            "--out", str(tmp_path / "xl_kohya.safetensors")])
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "xl_kohya.safetensors"))
    # tiny U-Net, 1 layer per block: down_blocks.0.attentions.0 -> input_blocks.1.1, up_blocks.1.attentions.1 ->
    # output_blocks.3.1, as kohya's SDXL scripts name them
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k.alpha" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    assert {"lora_te1_text_model_encoder_layers_1_self_attn_v_proj.alpha",
            "lora_te2_text_model_encoder_layers_1_self_attn_v_proj.alpha"} <= keys  # SDXL's two text encoders
    net = model.ema.module.eval()
    text = model.text_ema.module
    ids = [encoder.tokenize(CAPTIONS)[0] for encoder in text.encoders()]
    cond = model.encode_text(CAPTIONS) | {"size_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100.0, 600.0])
    with torch.no_grad():
        adapted = net(x, t, **cond)
        pipe = diffusers.DiffusionPipeline.from_pretrained(sdxl_pipeline)
        pipe.load_lora_weights(tmp_path / "xl_kohya.safetensors")
        added = {"text_embeds": cond["pooled"], "time_ids": cond["size_ids"]}
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["context"], added_cond_kwargs=added).sample
        torch.testing.assert_close(theirs, adapted, atol=1e-5, rtol=0)
        for encoder, theirs_text, token_ids in zip(text.encoders(), (pipe.text_encoder, pipe.text_encoder_2), ids,
                                                   strict=True):
            torch.testing.assert_close(theirs_text(token_ids, output_hidden_states=True).hidden_states[-2],
                                       encoder(CAPTIONS).tokens, atol=1e-5, rtol=0)
        restarted = LatentDiffusion(image_size=SIZE, pipeline=str(sdxl_pipeline), lora={
            "rank": 2, "text_encoder": True, "weights": str(tmp_path / "xl_kohya.safetensors")})
        torch.testing.assert_close(restarted.backbone.eval()(x, t, **cond), adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(restarted.text_encoder(CAPTIONS).tokens, text(CAPTIONS).tokens, atol=1e-5, rtol=0)


def test_sdxl_fit_from_shards_encoded_with_the_pipeline_matches_fit_from_images(sdxl_pipeline, shapes_shards_16px,
                                                                                  tmp_path):
    """`genart shards encode --pipeline` caches the VAE latents and both encoders' states (float32: losses equal to
    1e-4); caption dropout 0.5 swaps in the empty caption's states, zeros for SDXL, in both runs."""
    import lightning as L

    from datamodules.webdataset import TextImageDataModule

    code, _, err = genart_in_process("shards", "encode", "--pipeline", str(sdxl_pipeline), "--data",
                                     shapes_shards_16px["train_urls"], "--out", str(tmp_path / "latents"),
                                     "--image-size", str(SIZE), "--precision", "float32")
    assert code == 0, err
    losses = {}
    for kind, urls in (("images", shapes_shards_16px["train_urls"]), ("latents", str(tmp_path / "latents" / "train-{000000..000003}.tar"))):
        L.seed_everything(0)
        model = LatentDiffusion(image_size=SIZE, pipeline=str(sdxl_pipeline), caption_dropout=0.5, lr=1e-3)
        data = TextImageDataModule(urls, batch_size=8, num_workers=0, image_size=SIZE, kind=kind, shuffle_buffer=16)
        recorder = []
        model.on_train_batch_end = lambda outputs, batch, batch_idx, out=recorder: out.append(float(outputs["loss"]))
        cpu_trainer(tmp_path / kind, 3).fit(model, datamodule=data)
        losses[kind] = recorder
    assert len(losses["latents"]) == 3
    torch.testing.assert_close(torch.tensor(losses["latents"]), torch.tensor(losses["images"]), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def pixart_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pipelines_pixart"))


def pixart_images(pipe, captions: list[str], seed: int, guidance: float, latent_shape: tuple[int, ...]):
    noise = torch.randn((len(captions), *latent_shape), generator=torch.Generator().manual_seed(seed))
    return pipe(captions, num_inference_steps=2, guidance_scale=guidance, latents=noise, height=SIZE, width=SIZE,
                clean_caption=False, use_resolution_binning=False, output_type="pt").images


def test_pixart_pipeline_reads_t5_and_its_transformer_and_a_fine_tune_exports_back(pixart_pipeline, shapes_shards_16px,
                                                                                   tmp_path, capsys):
    from genart_lightning.cli import main as genart
    from genart_lightning.nn.diffusers_pixart import DiffusersPixArt

    torch.manual_seed(0)
    model = LatentDiffusion(image_size=SIZE, pipeline=str(pixart_pipeline), sample_steps=2, guidance_scale=3.0,
                            lr=1e-3, ema_decay=0.5)
    assert isinstance(model.backbone, DiffusersPixArt) and model.backbone.learned_variance
    assert model.text_encoder.context_length == 300 and model.text_encoder.use_mask  # PixArt-sigma's T5 length
    assert (model.hparams.sampler, model.hparams.conditioning) == ("dpmpp_2m", "tokens")
    source = diffusers.DiffusionPipeline.from_pretrained(pixart_pipeline)
    torch.testing.assert_close((model.sample(2, CAPTIONS, seed=0) + 1) / 2,
                               pixart_images(source, CAPTIONS, 0, 3.0, model.diffusion_shape()), atol=1e-5, rtol=0)
    cpu_trainer(tmp_path, 4).fit(model, datamodule=shards_data(shapes_shards_16px, batch_size=8))
    ckpt = save_untrained(model, tmp_path / "pixart.ckpt")
    genart(["export", "--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out")])
    assert "a diffusers pipeline" in capsys.readouterr().out
    source_tokenizer = {p.name for p in (pixart_pipeline / "tokenizer").iterdir()}
    assert source_tokenizer <= {p.name for p in (tmp_path / "out" / "tokenizer").iterdir()}
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "out")
    reloaded = load_model(ckpt)
    ours = (reloaded.sample(2, CAPTIONS, seed=5) + 1) / 2
    torch.testing.assert_close(ours, pixart_images(pipe, CAPTIONS, 5, 3.0, reloaded.diffusion_shape()), atol=1e-5, rtol=0)
    assert not torch.allclose(ours, pixart_images(source, CAPTIONS, 5, 3.0, reloaded.diffusion_shape()), atol=1e-3)

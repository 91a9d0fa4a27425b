"""`genart eval` end to end on real family checkpoints: metrics.json, guidance sweep table + plot, VAE PSNR/SSIM."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from genart_lightning.cli import main
from genart_lightning.models.base import FAMILY_KEY


def write_checkpoint(model, path) -> str:
    """What load_model reads from a `genart fit` checkpoint: family name, plain hyperparameters, weights."""
    family = f"{type(model).__module__}.{type(model).__qualname__}"
    torch.save({FAMILY_KEY: family, "hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, path)
    return str(path)


@pytest.fixture
def offline_cache(genart_cache, monkeypatch):
    monkeypatch.setenv("GENART_CACHE", str(genart_cache))  # judge trained once per session, FID stats cached
    return genart_cache


@pytest.mark.slow
def test_eval_gan_and_vae_checkpoints_write_metrics_json(shapes_shards, offline_cache, tmp_path):
    from genart_lightning.models.gan import DCGAN
    from genart_lightning.models.vae import VAE

    torch.manual_seed(0)
    gan = write_checkpoint(DCGAN(image_size=32, z_dim=16, g_channels=8, d_channels=8), tmp_path / "gan.ckpt")
    out = tmp_path / "gan.json"
    main(["eval", "--ckpt", gan, "--data", shapes_shards["val_urls"], "--num-samples", "20", "--batch-size", "8",
          "--fid-features", "judge", "--seed", "3", "--out", str(out)])
    metrics = json.loads(out.read_text())
    assert metrics["fid"] > 0 and "kid" in metrics
    assert (metrics["num_samples"], metrics["seed"], metrics["resolution"]) == (20, 3, 32)
    assert metrics["feature_extractor"]["id"].startswith("judge-32px")
    assert metrics["reference"]["count"] == shapes_shards["num_val"]
    assert metrics["prompts"] is None  # unconditional: no text metrics

    vae = write_checkpoint(VAE(image_size=32, base_channels=8, channel_mults=[1, 2]), tmp_path / "vae.ckpt")
    main(["eval", "--ckpt", vae, "--data", shapes_shards["val_urls"], "--num-samples", "8", "--fid-features", "judge",
          "--out", str(tmp_path / "vae.json")])
    metrics = json.loads((tmp_path / "vae.json").read_text())
    assert metrics["reference"]["reused"]  # same data, extractor and resolution as the GAN run
    # the reference computation: every val image reconstructed, PSNR per image in [0, 1] averaged, SSIM of the set
    from torchmetrics.functional.image import structural_similarity_index_measure

    from genart_lightning.metrics.reference_stats import real_loader
    from genart_lightning.models.loading import load_model

    model = load_model(vae).eval()
    images = torch.cat([b["image"] for b in real_loader(shapes_shards["val_urls"], 32, 64)])
    with torch.no_grad():
        recon = model.reconstruct(images) * 0.5 + 0.5
    mse = (recon - (images * 0.5 + 0.5)).square().flatten(1).mean(1)
    assert metrics["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)
    assert metrics["ssim"] == pytest.approx(float(structural_similarity_index_measure(
        recon, images * 0.5 + 0.5, data_range=1.0)), rel=1e-4)


@pytest.mark.slow
def test_guidance_sweep_writes_table_and_plot(shapes_shards, offline_cache, tmp_path):
    from genart_lightning.models.diffusion import PixelDiffusion

    torch.manual_seed(0)
    from genart_lightning.diffusion.vp import VP
    from genart_lightning.nn.unet import UNetBackbone

    unet = UNetBackbone(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], head_channels=8)
    model = PixelDiffusion(image_size=32, backbone=unet, process=VP(timesteps=100))
    with torch.no_grad():  # untrained, the backbone's zero-initialised output ignores text; give guidance something to scale
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.ema.module.load_state_dict(model.backbone.state_dict())
    ckpt = write_checkpoint(model, tmp_path / "diffusion.ckpt")
    out = tmp_path / "sweep.json"
    main(["eval", "--ckpt", ckpt, "--data", shapes_shards["val_urls"], "--num-samples", "16", "--batch-size", "16",
          "--fid-features", "judge", "--clip-model", "genart-tiny", "--guidance", "1", "4", "--steps", "2", "--out", str(out)])
    sweep = json.loads(out.read_text())["sweep"]
    assert [r["guidance"] for r in sweep] == [1.0, 4.0]
    # the reference computation: the evaluator's prompts and seed, sampled here, read by the judge directly
    from genart_lightning.metrics.evaluator import chunk_seed
    from genart_lightning.shapes.judge import ATTRIBUTES, load_or_train_judge
    from genart_lightning.shapes.suite import shapes_prompts

    captions, attributes = shapes_prompts(16, 0)
    judge = load_or_train_judge(32)
    for r in sweep:
        images = model.eval().sample(16, captions, seed=chunk_seed(0, 0), steps=2, guidance=r["guidance"])
        read = judge.predict(images.clamp(-1, 1))
        hits = [sum(p == a[name] for p, a in zip(read[name], attributes, strict=True)) / 16 for name in ATTRIBUTES]
        assert r["prompts"] == "shapes" and r["attribute_accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert all(r["clip_truncated_captions"] == 0 for r in sweep) and sweep[0]["clip_score"] != sweep[1]["clip_score"]
    assert "truncation" in sweep[0]["clip_model"] and sweep[0]["clip_model"]["context_length"] == 32
    assert sweep[0]["fid"] != sweep[1]["fid"]  # guidance changes the samples
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [float(r["guidance"]) for r in rows] == [1.0, 4.0] and float(rows[1]["fid"]) == pytest.approx(sweep[1]["fid"])
    assert "| guidance | fid | kid | clip_score | attribute_accuracy |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_inception_weights_is_one_clear_line(shapes_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache, as on a fresh compute node
    from genart_lightning.models.gan import DCGAN

    gan = write_checkpoint(DCGAN(image_size=32, z_dim=8, g_channels=8, d_channels=8), tmp_path / "gan.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ckpt", gan, "--data", shapes_shards["val_urls"], "--num-samples", "4"])
    message = str(exit_info.value)
    assert message.startswith("error: FID Inception weights not found") and "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "--fid-weights" in message


def _real_images_as_files(shards: dict, directory) -> list:
    from datamodules.shards import expand_urls
    from datamodules.stream import read_shard

    directory.mkdir()
    names = []
    for url in expand_urls(shards["val_urls"]):
        for sample in read_shard(url):
            ext = next(k for k in ("png", "jpg", "webp") if k in sample)
            names.append(directory / f"{sample['__key__']}.{ext}")
            names[-1].write_bytes(sample[ext])
    return names


@pytest.mark.slow
def test_eval_fake_folder_scores_files_against_shards_and_folders(shapes_shards, offline_cache, tmp_path):
    from PIL import Image

    real_files = _real_images_as_files(shapes_shards, tmp_path / "real")
    out = tmp_path / "same.json"
    main(["eval", "--fake", str(tmp_path / "real"), "--data", shapes_shards["val_urls"], "--fid-features", "judge",
          "--batch-size", "8", "--out", str(out)])
    same = json.loads(out.read_text())
    assert same["num_samples"] == len(real_files) == shapes_shards["num_val"]
    assert abs(same["fid"]) < 1e-3, same["fid"]  # the very images of the reference, through the same resize

    noise = tmp_path / "noise"
    noise.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(len(real_files)):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(noise / f"{i:06d}.png")
    main(["eval", "--fake", str(noise), "--data", shapes_shards["val_urls"], "--fid-features", "judge",
          "--out", str(tmp_path / "noise.json")])
    noisy = json.loads((tmp_path / "noise.json").read_text())
    assert noisy["fid"] > 100 * max(same["fid"], 1e-3) and noisy["fid"] > 1.0

    # the real data as a folder of files instead of shards: the same statistics
    main(["eval", "--fake", str(noise), "--data", str(tmp_path / "real"), "--fid-features", "judge",
          "--out", str(tmp_path / "noise_vs_folder.json")])
    assert json.loads((tmp_path / "noise_vs_folder.json").read_text())["fid"] == pytest.approx(noisy["fid"], rel=1e-6)


def test_comparability_warnings_name_the_reason():
    from genart_lightning.metrics.comparability import features_data_warning, sample_size_warning
    from genart_lightning.shapes.suite import ShapesSuite, shapes_prompts

    assert sample_size_warning(2000, 5000) is None
    assert sample_size_warning(200, 5000).startswith("FID on 200 generated images is biased upward (more so with fewer"
                                                     " images); compare only runs with the same counts, or use >= 2000")
    assert sample_size_warning(5000, 24).startswith("FID on 24 real images is biased upward")
    suites = [ShapesSuite()]  # its judge is only trained when its features or accuracy are asked for
    shapes, _ = shapes_prompts(8, 0)
    assert features_data_warning("judge", suites, shapes) is None
    assert features_data_warning("inception", suites, ["a photo of a cat"]) is None
    other = features_data_warning("judge", suites, ["a photo of a cat", *shapes])
    assert other == ("--fid-features judge uses the shapes judge, trained on the shapes dataset, and --data is not shapes"
                     " data (its captions are not shapes captions): its FID/KID compare only with runs on the same data"
                     " and features, never with Inception FID (--fid-features inception, the default)")
    assert "may not be shapes data (it has no captions to tell)" in features_data_warning("judge", suites, None)


def test_eval_on_few_images_warns_once_on_stderr(shapes_shards, tmp_path):
    from helpers import genart_in_process
    from PIL import Image

    features = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()))
    features.save(str(tmp_path / "features.pt"))  # a tiny offline extractor: 12 features
    (tmp_path / "fake").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 100, 200 - 30 * i)).save(tmp_path / "fake" / f"{i}.png")
    code, stdout, stderr = genart_in_process(
        "eval", "--fake", str(tmp_path / "fake"), "--data", shapes_shards["val_urls"], "--fid-features",
        str(tmp_path / "features.pt"), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "m.json"), cwd=tmp_path)
    assert code == 0, stderr[-2000:]
    assert "| fid | kid |" in stdout
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: FID on 6 generated and {shapes_shards['num_val']} real images is biased upward (more"
                        " so with fewer images); compare only runs with the same counts, or use >= 2000 of each"
                        " (--num-samples, real images in --data)"]

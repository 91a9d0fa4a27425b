"""LoRA fine-tuning: only the adapters train and are checkpointed, the base is rebuilt from its source (and refused
when it changed), EMA averages the adapters alone, and `--merge-lora` writes plain weights equal to the adapted model."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
from helpers import tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.webdataset import TextImageDataModule
from genart_lightning import UserError
from genart_lightning.commands.export import export_checkpoint
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.loading import load_model

pytest.importorskip("peft")

LORA = {"rank": 4, "alpha": 8}


def _model(**overrides) -> PixelDiffusion:
    settings = dict(image_size=16, process=VP(prediction="v"), backbone=tiny_unet(), lr=3e-3, ema_decay=0.9,
                    train_text_encoder=True)  # as the shapes configs do: the tiny tower is random-init
    return PixelDiffusion(**(settings | overrides))


def _fit(model: PixelDiffusion, data: TextImageDataModule, root, steps: int) -> None:
    checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=steps)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
              enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoint],
              default_root_dir=root).fit(model, datamodule=data)


def _outputs(net: torch.nn.Module, model: PixelDiffusion) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    cond = model.encode_text(["a red circle", "a blue square"])
    with torch.no_grad():
        return net.eval()(x, torch.tensor([10.0, 500.0]), **cond)


@pytest.fixture(scope="module")
def base(shapes_shards_16px, tmp_path_factory) -> dict:
    """A briefly trained pixel model: the pretrained weights the adapters go over."""
    root = tmp_path_factory.mktemp("base")
    L.seed_everything(0)
    data = TextImageDataModule(shapes_shards_16px["train_urls"], shapes_shards_16px["val_urls"], batch_size=16,
                               num_workers=0, image_size=16)
    model = _model()
    _fit(model, data, root, 10)
    return {"ckpt": root / "last.ckpt", "model": model, "data": data}


@pytest.mark.slow
def test_lora_trains_and_checkpoints_only_the_adapters_and_merges_to_the_same_outputs(base, tmp_path):
    L.seed_everything(1)
    model = _model(init_from=str(base["ckpt"]), lora=LORA)
    source = base["model"].ema.module.state_dict()
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if not p.requires_grad}
    adapters = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    for name, tensor in frozen.items():  # the base is the source's sampling (EMA) weights
        assert torch.equal(tensor, source[name.replace(".base_layer.", ".")]), name
    model.setup("fit")  # what fit does first: the text tower trained along comes from the source too
    for name, tensor in base["model"].text_encoder.state_dict().items():
        assert torch.equal(model.text_encoder.state_dict()[name], tensor), name
    _fit(model, base["data"], tmp_path, 8)

    for name, p in model.backbone.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} is a base weight but changed"
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means the adapters trained
    ema = dict(model.ema.module.named_parameters())
    assert all(ema[n].data_ptr() == p.data_ptr() for n, p in model.backbone.named_parameters() if n in frozen)
    assert all(not torch.equal(ema[n], p) for n, p in model.backbone.named_parameters() if "lora_B" in n)

    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    networks = [k for k in state if k.startswith(("backbone.", "ema.module."))]
    assert networks and all("lora_" in k for k in networks), [k for k in networks if "lora_" not in k][:3]
    backbone_group = checkpoint["optimizer_states"][0]["param_groups"][0]["params"]
    assert len(backbone_group) == len(adapters)  # the optimizer holds no base weight (nor state for one)
    stored = sum(t.numel() for k, t in state.items() if k in networks)
    full = sum(t.numel() for t in base["model"].backbone.state_dict().values())
    assert stored < 0.5 * full  # live and EMA adapters together; the test's tiny U-Net makes them relatively large

    loaded = load_model(tmp_path / "last.ckpt")  # rebuilds the base from init_from, then loads the adapters
    torch.testing.assert_close(_outputs(loaded.ema.module, loaded), _outputs(model.ema.module, model), atol=0, rtol=0)
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "merged.safetensors", merge_lora=True)
    plain = load_model(tmp_path / "merged.safetensors")
    assert plain.lora is None and not any("lora_" in k for k in plain.state_dict())
    for net in ("ema", "backbone"):
        adapted, merged = getattr(model, net), getattr(plain, net)
        assert not torch.allclose(_outputs(adapted, model), _outputs(base["model"].backbone, model), atol=1e-4)
        torch.testing.assert_close(_outputs(merged, plain), _outputs(adapted, model), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_changed_base_is_refused(base, tmp_path):
    source = tmp_path / "base.ckpt"
    source.write_bytes(base["ckpt"].read_bytes())
    L.seed_everything(1)
    _fit(_model(init_from=str(source), lora=LORA), base["data"], tmp_path, 2)
    changed = torch.load(source, weights_only=True)
    changed["state_dict"]["ema.module.out.2.weight"] += 1e-3  # another base at the same path
    torch.save(changed, source)
    with pytest.raises(ValueError, match="trained with the frozen lora base .* point it at the weights it was trained"):
        load_model(tmp_path / "last.ckpt")


def test_lora_settings_and_sources_are_one_line(base, monkeypatch):
    with pytest.raises(ValueError, match="backbone is random-init; set init_from"):
        _model(lora=LORA)
    with pytest.raises(ValueError, match="lora has no setting 'rnak'; its settings are rank, alpha"):
        _model(init_from=str(base["ckpt"]), lora={"rnak": 4})
    with pytest.raises(ValueError, match=r"lora.target_modules \['nope'\] match no layer .* named .*to_q"):
        _model(init_from=str(base["ckpt"]), lora={"target_modules": ["nope"]})
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UserError, match=r"lora needs peft, which is not installed: pip install 'genart-lightning\[diffusers\]'"):
        _model(init_from=str(base["ckpt"]), lora=LORA)


def test_merge_lora_refuses_a_checkpoint_without_adapters(base, tmp_path):
    with pytest.raises(UserError, match="has no LoRA adapters to merge; export it without --merge-lora"):
        export_checkpoint(base["ckpt"], tmp_path / "x.safetensors", merge_lora=True)

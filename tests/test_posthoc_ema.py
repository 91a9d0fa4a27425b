"""Post-hoc EMA (Karras et al. 2024): power-function EMA snapshots during fit, and `genart ema reconstruct` building
the EMA of another length from them, checked against that EMA tracked directly in the same run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import cpu_trainer, genart_in_process, shards_data, tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from genart_lightning.callbacks.posthoc_ema import PostHocEMA
from genart_lightning.commands.ema import reconstruct
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.loading import load_model
from genart_lightning.nn.posthoc_ema import PowerEMA, coefficients, gamma_of

STEPS, EVERY, TARGET = 20, 4, 0.08


def test_exponents_match_edm2_and_a_snapshot_profile_reconstructs_to_itself() -> None:
    # EDM2 (section 3.1) quotes gamma 16.97 for sigma_rel 0.05 and 6.94 for 0.10
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    snapshots = [(step, sigma) for step in (10, 20, 30) for sigma in (0.05, 0.10)]
    weights = coefficients(snapshots, (20, 0.10))
    assert weights[snapshots.index((20, 0.10))] == pytest.approx(1.0, abs=1e-6) and weights.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sigma_rel 0.4 is outside"):
        gamma_of(0.4)


def max_distance(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())


def test_reconstruction_matches_a_profile_tracked_directly_and_genart_reads_the_checkpoint(shapes_shards_16px: dict,
                                                                                            tmp_path: Path) -> None:
    """A third profile (sigma_rel 0.08) tracked step by step in the same run is the reference. The reconstruction is
    a least-squares fit of continuous-time profiles to a 20-step discrete EMA, so it is close, not equal: it must be
    at least 10x closer to the reference than either tracked profile is (measured: 0.0002 against 0.0044 and 0.0061)."""
    direct = {}

    class Third(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            direct["ema"] = PowerEMA(pl_module.backbone, (TARGET,))

        def on_train_batch_end(self, trainer, pl_module, *args):
            direct["ema"].update(pl_module.backbone, trainer.global_step)

    L.seed_everything(0)
    model = PixelDiffusion(image_size=16, backbone=tiny_unet(), lr=1e-2, text_encoder=None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=STEPS)
    cpu_trainer(tmp_path, STEPS, callbacks=[PostHocEMA(every_n_steps=EVERY), Third(), checkpoint]).fit(
        model, shards_data(shapes_shards_16px, batch_size=8))
    assert len(list((tmp_path / "phema").glob("phema-*.pt"))) == 2 * STEPS // EVERY
    rebuilt, step, count = reconstruct(tmp_path, TARGET)
    assert (step, count) == (STEPS, 2 * STEPS // EVERY)
    reference = direct["ema"].averages[0]
    tracked = [torch.load(f, weights_only=True)["state_dict"]  # the last snapshots: sigma_rel 0.05, then 0.10
               for f in sorted((tmp_path / "phema").glob(f"phema-{STEPS:09d}-*"))]
    assert max_distance(rebuilt, reference) < 0.1 * min(max_distance(t, reference) for t in tracked)

    code, out, err = genart_in_process("ema", "reconstruct", str(tmp_path), "--sigma-rel", str(TARGET))
    assert code == 0, err
    written = tmp_path / "phema" / f"ema-sigma{TARGET:.3f}-step{STEPS}.ckpt"
    assert str(written) in out
    ema = load_model(written).ema.module.state_dict()
    assert max_distance({k: v for k, v in rebuilt.items()}, ema) < 1e-6
    # the tracking state rides in the checkpoint: a resumed run continues the same averages
    resumed = PostHocEMA(every_n_steps=EVERY)
    resumed.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PostHocEMA"])
    resumed.on_fit_start(None, model)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(resumed.tracker.averages, tracked, strict=True) for k in a)
    code, _, err = genart_in_process("ema", "reconstruct", str(tmp_path / "nothing"), "--sigma-rel", "0.1")
    assert code == 2 and "no post-hoc EMA snapshots in" in err and "--posthoc_ema.every_n_steps" in err


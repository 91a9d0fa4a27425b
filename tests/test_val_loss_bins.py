"""Validation loss per noise level: equal-width log-SNR bins over each process's training levels, the unweighted loss
at each bin's centre with validation's fixed noise, the same every validation."""

from __future__ import annotations

import math
from itertools import islice, pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_trainer, save_untrained, shards_data, tiny_unet
from lightning.pytorch.loggers import CSVLogger

from genart_lightning.diffusion.edm import EDM
from genart_lightning.diffusion.flow import TIME_SCALE, Flow
from genart_lightning.diffusion.vp import VP
from genart_lightning.models.diffusion import VAL_SEED, PixelDiffusion
from genart_lightning.models.loading import load_model

BATCHES, BATCH_SIZE, BINS = 2, 8, 5
BULK = 0.5 * (1 + math.erf(3 / math.sqrt(2)))  # Phi(3): the bins span quantiles 1 - BULK .. BULK of the training levels


def processes() -> dict:
    """Settings off the defaults where they move the levels: v-prediction under Min-SNR (a weight the bins must drop),
    the paper's EDM density, a flow whose resolution shift is 2 at 16px."""
    return {"vp": VP(prediction="v"), "edm": EDM(p_mean=-1.2, p_std=1.2), "flow": Flow(shift_base_size=8)}


def expected_range(name: str, process) -> tuple[float, float]:
    """The documented log-SNR range of each process's bins, from its definition."""
    if name == "vp":  # timesteps drawn uniformly: the timesteps at quantiles 1 - BULK and BULK
        log_snr = (process.alphas_cumprod / (1 - process.alphas_cumprod)).log()
        return float(log_snr[int(BULK * process.timesteps)]), float(log_snr[int((1 - BULK) * process.timesteps)])
    if name == "edm":  # ln sigma ~ N(p_mean, p_std^2) and log-SNR = -2 ln sigma
        return -2 * process.p_mean - 6 * process.p_std, -2 * process.p_mean + 6 * process.p_std
    shift = math.sqrt(16 * 16) / process.shift_base_size  # logit(t) ~ N(m, s^2) + ln shift, log-SNR = -2 logit(t)
    centre = -2 * (process.logit_mean + math.log(shift))
    return centre - 6 * process.logit_std, centre + 6 * process.logit_std


def reference_loss(name: str, process, net, x0: torch.Tensor, noise: torch.Tensor, log_snr: float) -> torch.Tensor:
    """The unweighted training loss with every sample at this log-SNR, written out from each process's definition."""
    b = x0.shape[0]
    if name == "vp":  # the training timestep nearest in log-SNR; v = alpha eps - sigma x0
        a_bar = process.alphas_cumprod
        t = int(((a_bar / (1 - a_bar)).log() - log_snr).abs().argmin())
        alpha, sigma = math.sqrt(a_bar[t]), math.sqrt(1 - a_bar[t])
        out, target = net(alpha * x0 + sigma * noise, torch.full((b,), float(t))), alpha * noise - sigma * x0
    elif name == "edm":
        sigma = torch.tensor(math.exp(-log_snr / 2), dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = (float(c) for c in process.preconditioning(sigma))
        x = x0 + float(sigma) * noise
        out, target = net(c_in * x, torch.full((b,), c_noise)), (x0 - c_skip * x) / c_out
    else:  # (1 - t)^2 / t^2 = exp(log_snr); the network sees 1000 t and predicts eps - x0
        t = 1 / (1 + math.exp(log_snr / 2))
        out, target = net((1 - t) * x0 + t * noise, torch.full((b,), TIME_SCALE * t)), noise - x0
    return F.mse_loss(out, target)


def tiny_model(process, **settings) -> PixelDiffusion:
    torch.manual_seed(0)
    model = PixelDiffusion(image_size=16, process=process, backbone=tiny_unet(), text_encoder=None, **settings)
    with torch.no_grad():  # the U-Net's zero-init output layer would give one loss at every level
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def validate(model: PixelDiffusion, shards: dict) -> dict[str, float]:
    return cpu_trainer(None, 1, limit_val_batches=BATCHES).validate(model, shards_data(shards, BATCH_SIZE), verbose=False)[0]


@pytest.mark.parametrize("name", ["vp", "edm", "flow"])
def test_each_bin_logs_the_unweighted_loss_at_its_centre_with_the_fixed_noise(name: str, shapes_shards_16px: dict) -> None:
    process = processes()[name]
    model = tiny_model(process)
    before = torch.get_rng_state()
    logged = validate(model, shapes_shards_16px)
    assert torch.equal(torch.get_rng_state(), before)  # no global draws: a resumed run validates the same
    names = [f"val/loss_logsnr_bin{i}" for i in range(BINS)]
    assert set(names) <= set(logged) and all(math.isfinite(logged[k]) for k in names)

    edges = model.hparams.val_loss_bin_edges
    widths = [high - low for low, high in pairwise(edges)]
    assert len(edges) == BINS + 1 and widths == pytest.approx([widths[0]] * BINS, abs=1e-5) and widths[0] > 0
    assert (edges[0], edges[-1]) == pytest.approx(expected_range(name, process), abs=1e-6)  # rounded to 6 decimals

    centres = [(low + high) / 2 for low, high in pairwise(edges)]
    data = shards_data(shapes_shards_16px, BATCH_SIZE)
    data.setup("validate")
    totals, count = [0.0] * BINS, 0
    with torch.no_grad():
        for batch_idx, batch in enumerate(islice(data.val_dataloader(), BATCHES)):
            x0 = batch["image"]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(VAL_SEED + batch_idx))
            for i, centre in enumerate(centres):
                totals[i] += float(reference_loss(name, process, model.backbone, x0, noise, centre)) * len(x0)
            count += len(x0)
    expected = [total / count for total in totals]
    assert [logged[k] for k in names] == pytest.approx(expected, rel=1e-5)
    assert len(set(expected)) == BINS  # the levels differ, so a wrong level would show
    assert validate(model, shapes_shards_16px) == logged  # the same levels and noise every validation


def test_val_loss_bins_zero_logs_no_bins_and_val_loss_does_not_move(shapes_shards_16px: dict) -> None:
    with_bins = validate(tiny_model(EDM()), shapes_shards_16px)
    model = tiny_model(EDM(), val_loss_bins=0)
    without = validate(model, shapes_shards_16px)
    assert not [k for k in without if "bin" in k] and model.hparams.val_loss_bin_edges == []
    assert without["val/loss"] == with_bins["val/loss"]


def test_recorded_edges_rebuild_the_same_bins_and_given_edges_are_checked(tmp_path) -> None:
    flow = tiny_model(Flow(), val_loss_bins=3)
    loaded = load_model(save_untrained(flow, tmp_path / "flow.ckpt"))
    rebuilt = PixelDiffusion(**dict(flow.hparams))
    assert loaded.hparams.val_loss_bin_edges == rebuilt.hparams.val_loss_bin_edges == flow.hparams.val_loss_bin_edges
    assert loaded.val_loss_levels == flow.val_loss_levels and len(flow.val_loss_levels) == 3
    # one set of bins for two processes: their levels are the same log-SNRs
    common = {"val_loss_bin_edges": [-4.0, 0.0, 4.0], "backbone": tiny_unet(), "text_encoder": None}
    vp, edm = PixelDiffusion(process=VP(), **common), PixelDiffusion(process=EDM(), **common)
    assert vp.hparams.val_loss_bins == edm.hparams.val_loss_bins == 2 and vp.val_loss_levels == edm.val_loss_levels
    with pytest.warns(UserWarning, match=r"trains at no level inside bin0 \(-40, -30\)"):
        PixelDiffusion(process=EDM(), **common | {"val_loss_bin_edges": [-40.0, -30.0]})
    with pytest.raises(ValueError, match="val_loss_bins=-1 is out of range"):
        PixelDiffusion(backbone=tiny_unet(), text_encoder=None, val_loss_bins=-1)
    with pytest.raises(ValueError, match="are not bin edges"):
        PixelDiffusion(**common | {"val_loss_bin_edges": [1.0, 0.0]})


def test_a_fit_gives_the_edges_to_its_loggers(shapes_shards_16px: dict, tmp_path) -> None:
    model = tiny_model(EDM())
    logger = CSVLogger(tmp_path)
    cpu_trainer(tmp_path, 1, logger=logger, limit_val_batches=0).fit(model, shards_data(shapes_shards_16px, BATCH_SIZE))
    edges = [-6.0, -3.6, -1.2, 1.2, 3.6, 6.0]  # EDM's default ln sigma ~ N(0, 1): log-SNR 0 +- 6
    assert logger.experiment.hparams["val_loss_bin_edges"] == model.hparams.val_loss_bin_edges == edges
    assert "val_loss_bin_edges:\n- -6.0\n- -3.6\n" in (Path(logger.log_dir) / "hparams.yaml").read_text()


def test_zero_terminal_snr_bins_stay_finite() -> None:
    # 100 timesteps: quantile Phi(3) is the last timestep, whose SNR is 0 under zero_terminal_snr
    process = VP(timesteps=100, zero_terminal_snr=True, prediction="v")
    edges = process.log_snr_bins(BINS, (1, 3, 16, 16))
    log_snr = (process.alphas_cumprod / (1 - process.alphas_cumprod)).log()
    assert edges[0] == pytest.approx(float(log_snr[-2])) and all(math.isfinite(e) for e in edges)

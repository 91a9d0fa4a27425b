"""Throughput callback: images/s from a known clock, and gradient norms per optimizer in automatic and manual optimization."""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

import genart_lightning.callbacks.throughput as throughput_module
from genart_lightning.callbacks.throughput import Throughput, batch_size

BATCH = 4
C0 = torch.tensor([3.0, 4.0, 0.0, 0.0])  # gradient of the first objective: norm 5
C1 = torch.tensor([0.0, 0.0, 6.0, 8.0])  # gradient of the second: norm 10


class OneOptimizer(L.LightningModule):
    """Loss (w * C0).sum(): its gradient is C0 whatever w is, so the logged norm must be exactly 5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return (self.w * C0).sum() + 0 * batch["image"].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoOptimizersManual(OneOptimizer):
    """GAN-shaped step: manual optimization, two optimizers stepped one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.v = torch.nn.Parameter(torch.zeros(4))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_w, opt_v = self.optimizers()
        for opt, loss in ((opt_w, (self.w * C0).sum()), (opt_v, (self.v * C1).sum())):
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD([self.w], lr=0.1), torch.optim.SGD([self.v], lr=0.1)]


def fit(module: L.LightningModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steps: int = 6) -> list[dict]:
    clock = itertools.count(start=100.0, step=1.0)  # every perf_counter call is one second later
    monkeypatch.setattr(throughput_module.time, "perf_counter", lambda: next(clock))
    data = DataLoader([{"image": torch.zeros(3, 8, 8)}] * 64, batch_size=BATCH)
    trainer = L.Trainer(max_steps=steps, log_every_n_steps=2, callbacks=[Throughput()], logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def test_images_per_second_and_grad_norm_with_one_optimizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = fit(OneOptimizer(), tmp_path, monkeypatch)
    speed = [r for r in rows if "throughput/images_per_sec" in r]
    # Logged at steps 1, 3, 5 (every 2nd): 2 batches of 4 images per 1 s tick of the clock.
    assert [r["step"] for r in speed] == [1, 3, 5]
    assert [r["throughput/images_per_sec_per_device"] for r in speed] == [8.0, 8.0, 8.0]
    assert [r["throughput/images_per_sec"] for r in speed] == [8.0, 8.0, 8.0]  # world size 1
    assert [r["throughput/images_seen"] for r in speed] == [8.0, 16.0, 24.0]
    assert [r["grad_norm"] for r in rows if "grad_norm" in r] == [5.0, 5.0, 5.0]


def test_grad_norm_per_optimizer_under_manual_optimization(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = fit(TwoOptimizersManual(), tmp_path, monkeypatch, steps=12)  # 2 optimizer steps per batch: 6 batches
    assert [r["grad_norm/optimizer0"] for r in rows if "grad_norm/optimizer0" in r] == [5.0] * 3
    assert [r["grad_norm/optimizer1"] for r in rows if "grad_norm/optimizer1" in r] == [10.0] * 3


def test_batch_size_of_the_batch_contract_and_a_clear_error() -> None:
    assert batch_size({"image": torch.zeros(5, 3, 4, 4), "caption": [""] * 5}) == 5
    assert batch_size([torch.zeros(2, 1)]) == 2
    with pytest.raises(TypeError, match="yield dicts with an 'image' tensor"):
        batch_size({"caption": ["a"]})


class Linear(L.LightningModule):
    """One 192 -> 64 linear layer on flattened 8px images: its FLOPs per step are known (forward 2 B 192 64, and the
    same again in backward for the weight's gradient; the input needs none)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(192, 64, bias=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        time.sleep(0.02)  # a step of known length: the loader's share must not hang on how busy the machine is
        return self.layer(batch["image"].flatten(1)).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SlowImages(torch.utils.data.Dataset):
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> dict:
        if self.delay:
            time.sleep(self.delay)
        return {"image": torch.ones(3, 8, 8)}


class SlowSampling(L.Callback):
    """Works 30 ms after every batch, as a sample grid or periodic evaluation does now and then."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.03)


class SlowSave(SlowSampling, ModelCheckpoint):
    """The same 30 ms from a checkpoint callback, which Lightning runs after every other one."""


def test_efficiency_panel_sees_a_slow_loader_and_logs_mfu_as_flops_over_time_over_peak(tmp_path: Path) -> None:
    from genart_lightning.callbacks.efficiency import Efficiency

    shares = {}
    for delay in (0.0, 0.02):
        panel = Efficiency(every_n_steps=10)  # other callbacks' work between batches is neither step nor data wait
        L.Trainer(max_steps=10, callbacks=[panel, SlowSampling(), SlowSave(dirpath=tmp_path / "ckpt")],
                  logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(
            Linear(), DataLoader(SlowImages(delay), batch_size=BATCH))
        logged = panel.logged
        shares[delay] = logged["efficiency/data_wait_share"]
        with open(next(tmp_path.glob("lightning_logs/version_*/metrics.csv"))) as f:  # at the panel's cadence, not
            rows = [r for r in csv.DictReader(f) if r.get("efficiency/mfu")]  # only at log_every_n_steps (50)
        assert [int(r["step"]) for r in rows] == [10]
        for path in tmp_path.glob("lightning_logs/version_*/metrics.csv"):
            path.unlink()
        assert panel.flops_per_step == 2 * 2 * BATCH * 192 * 64  # counted once, on one step
        assert logged["efficiency/mfu"] == pytest.approx(panel.flops_per_step / logged["efficiency/step_time_median"]
                                                         / panel.peak, rel=1e-12)
        assert 0 < logged["efficiency/step_time_median"] <= logged["efficiency/step_time_p90"]
        assert logged["efficiency/peak_memory_gb"] > 0.05 and panel.peak_source.startswith("measured fp32 matmul")
    # 4 x 20 ms of loading per batch against a 20 ms step: about 0.8 of the time, against the loader's own overhead
    assert shares[0.0] < 0.3 and shares[0.02] > 0.6 and shares[0.02] > shares[0.0] + 0.3, shares

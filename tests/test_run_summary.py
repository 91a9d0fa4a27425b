"""metrics.json, the sweeps' "finished" marker: last logged values of a completed fit, absent after preemption."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from genart_lightning.callbacks.preemption import Preemption
from genart_lightning.callbacks.run_summary import RunSummary


class Quadratic(L.LightningModule):
    """Loss (w - 3)^2 from w = 0 by SGD: the logged loss after step k is known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = (self.w - 3) ** 2
        self.log("train/loss", loss, batch_size=1)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.25)


def fit(tmp_path: Path, callbacks: list[L.Callback], steps: int = 4) -> None:
    data = DataLoader([{"image": torch.zeros(1)}] * 16, batch_size=1)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, default_root_dir=tmp_path,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Quadratic(), data)


def test_completed_fit_writes_last_logged_values(tmp_path: Path) -> None:
    fit(tmp_path, [RunSummary(path=str(tmp_path / "metrics.json"))])
    summary = json.loads((tmp_path / "metrics.json").read_text())
    # w_k = 3 (1 - 0.5^k); the loss logged at step k (before its update) is (w_{k-1} - 3)^2 = 9 * 0.25^(k-1).
    assert summary["metrics"]["train/loss"] == pytest.approx(9 * 0.25**3)
    assert summary["global_step"] == 4 and summary["nonfinite"] == []


def test_preempted_fit_writes_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):  # no requeue outside a job
        monkeypatch.delenv(var, raising=False)
    preemption = Preemption(check_every_n_steps=1)
    preemption.requested = True  # as if SIGUSR1 had arrived: stop and checkpoint after the first step
    fit(tmp_path, [preemption, RunSummary(path=str(tmp_path / "metrics.json"))])
    assert preemption.history["preempted_at"] == [1]
    assert not (tmp_path / "metrics.json").exists()  # the requeued job finishes the run and writes it

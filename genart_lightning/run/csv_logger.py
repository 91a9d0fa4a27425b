"""A CSVLogger for a resumed run: it continues the run's metrics.csv instead of deleting it.

Lightning's CSV writer removes an existing metrics.csv when it opens a version directory again, so a requeued job
pinned to its run (see resume.py) would lose every metric logged before the preemption.
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuedExperimentWriter(ExperimentWriter):
    """Keeps the rows up to the resumed step; rows after it were logged by work the checkpoint does not hold."""

    def __init__(self, log_dir: str, resumed_step: int) -> None:
        self.resumed_step = resumed_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if int(float(row.get("step") or 0)) <= self.resumed_step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = header


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger whose writer continues metrics.csv of the run being resumed at `resumed_step`."""

    def __init__(self, *args: Any, resumed_step: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_step = resumed_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ContinuedExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ContinuedExperimentWriter(self.log_dir, self.resumed_step)
        return self._experiment

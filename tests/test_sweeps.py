"""Sweeps: spec -> runs with stable names and resolved configs; local runs, SLURM job arrays, reports."""

from __future__ import annotations

import csv
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import REPO, tiny_config

from genart_lightning.cli import lightning_cli, main
from genart_lightning.sweeps.launch import array_ranges
from genart_lightning.sweeps.report import markdown
from genart_lightning.sweeps.spec import (
    SpecError,
    expand,
    load_spec,
    load_yaml,
    resolved_config,
    write_configs,
)


@pytest.fixture
def sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`genart sweep ARGS` in this process, from tmp_path; the fits it launches are processes of their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # each fit on one core, as the tests share a small machine

    def run(*args: str) -> str:
        main(["sweep", *args])
        return capsys.readouterr().out

    return run


def write_spec(tmp_path: Path, base_config: dict, **spec) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_config))
    spec = {"base": str(tmp_path / "base.yaml"), "out_dir": str(tmp_path / "runs"), **spec}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expand_grid_random_seeds_into_stable_runs_and_resolved_configs(tmp_path: Path) -> None:
    base = {"model": {"class_path": "x.M", "init_args": {"lr": 0.1, "beta": 2}}, "trainer": {"max_steps": 5},
            "data": {"class_path": "datamodules.webdataset.TextImageDataModule", "init_args": {"seed": 0}}}
    path = write_spec(
        tmp_path, base,
        fixed={"trainer.max_steps": 7},
        grid={"model.init_args.lr": [1e-3, 3e-3], "data.init_args.batch_size": [4]},
        random={"samples": 2, "seed": 3, "params": {"model.init_args.beta": {"loguniform": [0.01, 1.0]}}},
        seeds=[0, 1],
    )
    spec = load_spec(path)
    runs = expand(spec)
    assert len(runs) == 2 * 1 * 2 * 2
    assert [r.index for r in runs] == list(range(8))
    assert len({r.name for r in runs}) == 8
    assert runs[0].name.startswith("lr=0.001,batch_size=4,beta=") and runs[0].name.endswith(",seed=0")
    assert [r.name for r in expand(load_spec(path))] == [r.name for r in runs]  # same spec, same names
    betas = {r.values["model.init_args.beta"] for r in runs}
    assert len(betas) == 2 and all(0.01 <= b <= 1.0 for b in betas)

    write_configs(spec, runs)
    config = load_yaml(runs[5].config_path)
    assert config["model"]["init_args"]["lr"] == runs[5].values["model.init_args.lr"]
    assert config["model"]["init_args"]["beta"] == runs[5].values["model.init_args.beta"]
    assert config["model"]["class_path"] == "x.M"  # base keys survive the merge
    assert config["data"]["init_args"]["batch_size"] == 4
    assert config["trainer"]["max_steps"] == 7
    assert config["seed_everything"] == runs[5].seed
    assert config["data"]["init_args"]["seed"] == runs[5].seed  # a seed replicate also reshuffles the data
    assert Path(config["trainer"]["default_root_dir"]) == runs[5].dir
    assert Path(config["run_summary"]["path"]) == runs[5].metrics_path
    lines = (tmp_path / "runs" / "runs.txt").read_text().splitlines()
    assert lines == [str(r.config_path) for r in runs]


def test_example_specs_expand_into_configs_that_genart_fit_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(REPO)  # spec paths are relative to the working directory, as when a user runs them
    specs = [p for p in sorted((REPO / "experiments" / "sweeps").glob("*.yaml")) if p.name != "wandb_sweep.yaml"]
    assert specs
    for path in specs:
        spec = load_spec(path)
        spec.out_dir = tmp_path / spec.name
        run = expand(spec)[-1]
        write_configs(spec, [run])
        with pytest.raises(SystemExit) as done:  # jsonargparse checks every key and type, then exits
            lightning_cli(["fit", "--config", str(run.config_path), "--print_config"])
        assert done.value.code in (0, None), path
        resolved = yaml.safe_load(capsys.readouterr().out)
        for key, value in {**run.values, "seed_everything": run.seed}.items():
            node = resolved
            for part in key.split("."):
                node = node[part]
            assert node == value, (path, key)


def test_array_ranges() -> None:
    assert array_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and array_ranges([3]) == "3"


def test_several_bases_merge_like_repeated_config_and_loggers_write_into_the_run(tmp_path: Path) -> None:
    base = {"trainer": {"max_steps": 5, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                   "init_args": {"save_dir": "runs/x", "default_hp_metric": False}}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"name": "s", "base": [str(tmp_path / "base.yaml"),
                                         str(REPO / "experiments" / "logger_wandb.yaml")], "seeds": [4]}))
    spec = load_spec(spec_path)
    (run,) = expand(spec)
    logger = resolved_config(spec, run)["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert "default_hp_metric" not in logger["init_args"]  # another class: the TensorBoard arguments are gone
    assert logger["init_args"]["save_dir"] == str(run.dir) and logger["init_args"]["group"] == "s"
    assert logger["init_args"]["project"] == "genart"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"trainer.max_steps": []}}, "grid key 'trainer.max_steps' needs a non-empty list"),
        ({"seeds": "0"}, "'seeds' must be a non-empty list of integers"),
        ({"random": {"samples": 2, "params": {"a.b": {"normal": [0, 1]}}}}, "random key 'a.b'"),
        ({"gird": {}}, "unknown key(s) ['gird']"),
        ({"base": "missing.yaml"}, "base config not found: missing.yaml"),
    ],
)
def test_bad_specs_fail_with_one_clear_line(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_spec(write_spec(tmp_path, {"trainer": {}}, **spec))
    assert message in str(err.value) and str(tmp_path / "spec.yaml") in str(err.value)
    assert "\n" not in str(err.value)


def test_slurm_dry_run_writes_array_whose_task_i_runs_config_i(tmp_path: Path, sweep) -> None:
    path = write_spec(tmp_path, {"trainer": {}}, grid={"model.init_args.lr": [1e-3, 2e-3, 4e-3]}, seeds=[0],
                      slurm={"partition": "debug", "time": "00:10:00", "max_parallel": 2})
    (tmp_path / "runs" / "lr=0.002,seed=0").mkdir(parents=True)
    (tmp_path / "runs" / "lr=0.002,seed=0" / "metrics.json").write_text("{}")  # finished: no task for it
    out = sweep(str(path), "--launcher", "slurm", "--dry-run")
    assert "2 of 3 runs pending" in out
    runs = expand(load_spec(path))
    script = (tmp_path / "runs" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0,2%2\n" in script and "#SBATCH --partition=debug\n" in script
    assert "#SBATCH --time=00:10:00\n" in script and "#SBATCH --job-name=sweep-spec\n" in script
    # Execute the script as SLURM would for each task, with an `srun` that records its command line.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/sh\necho "$@" > "$SRUN_OUT"\n')
    (bin_dir / "srun").chmod(stat.S_IRWXU)
    for task in (0, 2):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": str(task),
               "SRUN_OUT": str(tmp_path / f"srun{task}")}
        subprocess.run(["bash", str(tmp_path / "runs" / "sweep.sbatch")], env=env, check=True, cwd=tmp_path)
        srun_args = (tmp_path / f"srun{task}").read_text().split()
        at = srun_args.index("fit")
        assert srun_args[at + 1 : at + 3] == ["--config", str(runs[task].config_path)]


@pytest.mark.slow
def test_local_sweep_report_and_rerun_launches_nothing(tmp_path: Path, shapes_shards_16px: dict, sweep) -> None:
    """Two settings x one seed run locally (the grid x seeds expansion and the seed-noise marks are tested above
    without launching anything)."""
    path = write_spec(tmp_path, tiny_config(shapes_shards_16px), grid={"model.init_args.lr": [1e-3, 3e-3]},
                      seeds=[1], metric="train/loss")
    first = sweep(str(path))
    assert first.count(": running") == 2, first
    report = sweep("report", str(path))
    with open(tmp_path / "runs" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["train/loss"]) > 0 for r in rows)
    assert {(r["model.init_args.lr"], r["seed"]) for r in rows} == {("0.001", "1"), ("0.003", "1")}
    table = (tmp_path / "runs" / "report.md").read_text().splitlines()
    assert table[0].startswith("| # | lr | runs | train/loss |") and table[0].endswith("within seed noise of |")
    assert all(line.split(" | ")[2] == "1" and line.endswith("(one seed: no spread) |") for line in table[2:4])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in rows:  # each run's hparams summary: its swept value and seed, with its final metrics
        accumulator = EventAccumulator(str(tmp_path / "runs" / row["run"] / "lightning_logs" / "version_0" / "hparams"))
        accumulator.Reload()
        start = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # the HParams plugin's record
        assert b"lr" in start and b"seed" in start and "final/train/loss" in accumulator.Tags()["scalars"]
    assert (tmp_path / "runs" / "report.png").stat().st_size > 1000 and "report.png" in report
    assert rows[0]["train/loss"] != rows[1]["train/loss"]  # the settings really differ

    second = sweep(str(path))
    assert "running" not in second and second.count("finished, skipped") == 2


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)  # `genart sweep --wait` waits on `sbatch --wait` for as long as the array takes
def test_slurm_array_runs_every_config(tmp_path: Path, shapes_shards_16px: dict, sweep) -> None:
    if shutil.which("sinfo") is None or subprocess.run(["sinfo"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM cluster here (start one with slurm/local-cluster.sh up)")
    path = write_spec(tmp_path, tiny_config(shapes_shards_16px), seeds=[1, 2], slurm={"time": "00:05:00"})
    sweep(str(path), "--launcher", "slurm", "--wait")
    runs = expand(load_spec(path))
    assert all(r.finished for r in runs), list((tmp_path / "runs" / "slurm-logs").iterdir())
    logs = sorted((tmp_path / "runs" / "slurm-logs").glob("*.out"))
    assert len(logs) == 2 and all("array task" in log.read_text() for log in logs)
    assert "all 2 runs finished" in sweep(str(path), "--launcher", "slurm")


def test_sweep_runs_share_a_wandb_group_with_a_job_type_per_setting_and_the_report_marks_seed_noise(tmp_path: Path,
                                                                                                     shapes_shards_16px):
    config = tiny_config(shapes_shards_16px)
    config["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": True}}
    spec = load_spec(write_spec(tmp_path, config, grid={"model.init_args.lr": [1e-3, 3e-3]}, seeds=[1, 2]))
    loggers = [resolved_config(spec, run)["trainer"]["logger"]["init_args"] for run in expand(spec)]
    assert {logger["group"] for logger in loggers} == {spec.name}
    assert [logger["job_type"] for logger in loggers] == ["lr=0.001", "lr=0.001", "lr=0.003", "lr=0.003"]
    assert resolved_config(spec, expand(spec)[1])["run_summary"]["hparams"] == {"lr": 1e-3, "seed": 2}
    # three settings: two whose seeds overlap, one far from both; and one with a single seed
    summary = [{"lr": lr, "runs": runs, "loss": loss} for lr, runs, loss in
               [(1, 3, (0.50, 0.02)), (2, 3, (0.51, 0.02)), (3, 3, (0.90, 0.02)), (4, 1, (0.50, 0.0))]]
    rows = [line.rstrip(" |").rsplit(" | ", 1)[1] for line in markdown(summary, ["lr"], ["loss"], 0).splitlines()[2:6]]
    assert rows == ["2", "1", "none", "(one seed: no spread)"]

"""A non-editable install (the wheel) works away from the checkout: the sbatch templates ship in the package."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
from helpers import REPO

TEMPLATES = REPO / "genart_lightning" / "slurm"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the sources (so no stale build/ of the checkout leaks into it)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("genart_lightning", "datamodules"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("genart_lightning-*.whl")
    return wheel


def fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """A venv holding only the wheel; the dependencies come from this interpreter's site-packages via a .pth
    line (a plain path entry: the .pth files there, the editable finder among them, are not run)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    outer = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "zz_outer_site_packages.pth").write_text("".join(f"{path}\n" for path in outer))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    return env_dir


def test_wheel_install_ships_the_sbatch_templates(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"genart_lightning/slurm/train.sbatch", "genart_lightning/slurm/sweep.sbatch"} <= set(names), names
    env_dir = fresh_venv(tmp_path, wheel)

    work = tmp_path / "work"  # a user's project directory: experiment configs, no checkout
    shutil.copytree(REPO / "experiments", work / "experiments")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def run(*argv: str) -> str:
        result = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    # The package that imports is the wheel's, not the checkout's.
    where = run(str(env_dir / "bin" / "python"), "-c",
                "import genart_lightning, genart_lightning.slurm as s; "
                "print(genart_lightning.__file__); print(s.checkout_link('train.sbatch'))").split("\n")
    package_file = Path(where[0]).resolve()
    assert package_file.is_relative_to(env_dir.resolve()), where
    assert not package_file.is_relative_to(REPO), where
    assert where[1] == "None", where

    # genart slurm submit: the sbatch line names the packaged template, logs under ./slurm/logs.
    line = shlex.split(run(str(env_dir / "bin" / "genart"), "slurm", "submit", "--dry-run", "--nodes", "2",
                           "experiments/dcgan_shapes.yaml", "--trainer.max_steps=10").strip())
    assert line[0] == "sbatch" and f"--output={work}/slurm/logs/%x-%j.out" in line, line
    assert line[-2:] == ["experiments/dcgan_shapes.yaml", "--trainer.max_steps=10"], line
    script = Path(line[-3])
    assert script.resolve().is_relative_to(env_dir.resolve()), script
    text = script.read_text()
    assert "#SBATCH --signal=USR1@90" in text and "srun --kill-on-bad-exit=1 genart fit" in text
    assert text == (TEMPLATES / "train.sbatch").read_text()

    # genart sweep --launcher slurm --dry-run: the array script filled in from the packaged sweep.sbatch.
    out = run(str(env_dir / "bin" / "genart"), "sweep", "experiments/sweeps/vae_lr_beta.yaml",
              "--launcher", "slurm", "--dry-run")
    assert "wrote runs/vae_lr_beta/sweep.sbatch" in out, out
    sweep = (work / "runs" / "vae_lr_beta" / "sweep.sbatch").read_text()
    assert "#SBATCH --job-name=sweep-vae_lr_beta" in sweep and "#SBATCH --array=0-17" in sweep, sweep
    assert "#SBATCH --time=00:30:00" in sweep and "#SBATCH --requeue" in sweep, sweep
    assert f"{env_dir}/bin/python" in sweep or str((env_dir / "bin" / "python").resolve()) in sweep, sweep
    assert 'CONFIG=$(sed -n "${LINE}p" "$RUNS_FILE")' in sweep

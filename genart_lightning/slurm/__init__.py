"""The sbatch templates, shipped inside the package so that any install (wheel, `pip install .`) has them.

`train.sbatch`: one experiment on N nodes x G tasks; `genart slurm submit` builds its sbatch line.
`sweep.sbatch`: one job array per sweep; `genart sweep SPEC --launcher slurm` fills it in.
A source checkout also has them as `slurm/train.sbatch` and `slurm/sweep.sbatch` (symlinks to these
files), for `sbatch slurm/train.sbatch experiments/X.yaml` from the repository root.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "slurm"
"""`slurm/` of the source checkout this package runs from (meaningful only when `checkout_link` finds it)."""


def template(name: str) -> Path:
    """The packaged template `name` ("train.sbatch" or "sweep.sbatch") as a file on disk."""
    path = files(__name__) / name
    if not isinstance(path, Path) or not path.is_file():
        raise FileNotFoundError(f"sbatch template {name} is missing from the installed genart_lightning.slurm "
                                f"package ({path}); reinstall genart-lightning")
    return path


def checkout_link(name: str) -> Path | None:
    """`slurm/<name>` of the source checkout when it points at the packaged template (run from a checkout), else None."""
    link = CHECKOUT_DIR / name
    try:
        return link if link.is_file() and link.samefile(template(name)) else None
    except OSError:
        return None

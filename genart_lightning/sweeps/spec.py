"""Sweep specs (YAML) -> runs with stable names and resolved configs (launching is in `launch`).

A spec names a base experiment, a grid and/or random choices over any config key (the dotted keys
`genart fit` accepts on its command line) and a list of seeds. Every run gets its own directory
`<out_dir>/<run name>/` holding `config.yaml` (base merged with the run's values), the fit's logs
and `metrics.json`, which the fit writes when it completes: a run with it is finished and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.json"
"""Written by the `run_summary` callback at the end of a completed fit; its presence marks a run finished."""
SPEC_KEYS = {"name", "base", "fixed", "grid", "random", "seeds", "out_dir", "metric", "x", "slurm"}


class SpecError(ValueError):
    """A sweep spec that cannot be expanded; the message names the spec, the key and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML loader that reads `1e-3` as a float, as YAML 1.2 and jsonargparse do (PyYAML alone reads a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*(?:[eE][-+]?\d+)|\.\d+(?:[eE][-+]?\d+)?)$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file with floats like `1e-3` kept as floats."""
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass


@dataclass(frozen=True)
class Run:
    """One run of a sweep: the swept values of one setting and one seed."""

    index: int
    name: str
    values: dict[str, Any]
    seed: int
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def finished(self) -> bool:
        return self.metrics_path.is_file()


@dataclass
class SweepSpec:
    """A parsed sweep spec; see `load_spec` for the YAML layout."""

    path: Path
    name: str
    base: list[Path]
    out_dir: Path
    seeds: list[int]
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random_params: dict[str, Any] = field(default_factory=dict)
    random_samples: int = 0
    random_seed: int = 0
    metric: str | None = None
    x: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def swept_keys(self) -> list[str]:
        """Config keys whose values differ between settings, in spec order."""
        return [*self.grid, *self.random_params]


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and check a sweep spec.

    Layout (paths relative to the working directory, like every path in a config)::

        name: gan_lr                      # default: the spec's file name
        base: experiments/gan_shapes.yaml  # or a list of configs, merged in order like repeated --config
        fixed: {trainer.max_steps: 2000}   # set in every run
        grid: {model.init_args.lr: [1.0e-4, 3.0e-4]}
        random: {samples: 4, seed: 0, params: {model.init_args.beta1: {uniform: [0.0, 0.9]}}}
        seeds: [0, 1, 2]
        out_dir: runs/gan_lr               # default runs/<name>
        metric: val/fid                    # what `genart sweep report` plots
        x: model.init_args.lr              # against this swept key (default: the first one)
        slurm: {partition: gpu, time: "04:00:00", gres: "gpu:1", max_parallel: 8}   # #SBATCH options
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec not found: {path}; pass the path of a YAML file like experiments/sweeps/*.yaml")
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep spec is a YAML mapping with keys {sorted(SPEC_KEYS)}")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise SpecError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    name = str(raw.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SpecError(f"{path}: name {name!r} must use only letters, digits, '.', '_' and '-'")
    if "base" not in raw:
        raise SpecError(f"{path}: missing 'base'; name the experiment config, e.g. base: experiments/gan_shapes.yaml")
    base = [Path(p) for p in (raw["base"] if isinstance(raw["base"], list) else [raw["base"]])]
    for p in base:
        if not p.is_file():
            raise SpecError(f"{path}: base config not found: {p} (paths are relative to the working directory)")
    seeds = raw.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise SpecError(f"{path}: 'seeds' must be a non-empty list of integers, e.g. seeds: [0, 1, 2]")
    grid = raw.get("grid") or {}
    for key, values in grid.items():
        if not (isinstance(values, list) and values):
            raise SpecError(f"{path}: grid key {key!r} needs a non-empty list of values, e.g. {key}: [1, 2]")
    rnd = raw.get("random") or {}
    params = rnd.get("params") or {}
    for key, dist in params.items():
        _check_distribution(path, key, dist)
    if params and not isinstance(rnd.get("samples"), int):
        raise SpecError(f"{path}: 'random' needs 'samples: N' (how many random settings to draw)")
    both = set(grid) & set(params)
    if both:
        raise SpecError(f"{path}: key(s) {sorted(both)} are both in 'grid' and 'random'; keep each in one")
    spec = SweepSpec(
        path=path,
        name=name,
        base=base,
        out_dir=Path(raw.get("out_dir") or Path("runs") / name),
        seeds=seeds,
        fixed=raw.get("fixed") or {},
        grid=grid,
        random_params=params,
        random_samples=rnd.get("samples", 0) if params else 0,
        random_seed=int(rnd.get("seed", 0)),
        metric=raw.get("metric"),
        x=raw.get("x"),
        slurm=raw.get("slurm") or {},
    )
    if spec.x is not None and spec.x not in spec.swept_keys:
        raise SpecError(f"{path}: x: {spec.x!r} is not a swept key; choose one of {spec.swept_keys}")
    return spec


def _check_distribution(path: Path, key: str, dist: Any) -> None:
    if isinstance(dist, list) and dist:
        return
    if isinstance(dist, dict) and len(dist) == 1:
        kind, bounds = next(iter(dist.items()))
        if kind in ("uniform", "loguniform", "randint") and isinstance(bounds, list) and len(bounds) == 2:
            if kind == "loguniform" and min(bounds) <= 0:
                raise SpecError(f"{path}: random key {key!r}: loguniform bounds must be > 0, got {bounds}")
            return
    raise SpecError(
        f"{path}: random key {key!r} has {dist!r}; use a list of choices or one of "
        "{uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}"
    )


def _draw(rng: random.Random, dist: Any) -> Any:
    """One value of a random distribution; floats keep 4 significant digits so names and configs stay readable."""
    if isinstance(dist, list):
        return rng.choice(dist)
    (kind, (lo, hi)), = dist.items()
    if kind == "randint":
        return rng.randint(int(lo), int(hi))
    value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "loguniform" else rng.uniform(lo, hi)
    return float(f"{value:.4g}")


def settings(spec: SweepSpec) -> list[dict[str, Any]]:
    """The swept values of every setting: the grid's product times the random draws (the same draws for every grid point)."""
    grid_points = [dict(zip(spec.grid, combo, strict=True)) for combo in itertools.product(*spec.grid.values())]
    rng = random.Random(spec.random_seed)
    draws = [{k: _draw(rng, d) for k, d in spec.random_params.items()} for _ in range(spec.random_samples)] or [{}]
    return [{**point, **draw} for point in grid_points for draw in draws]


def short_keys(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that still tells the keys apart (`model.init_args.lr` -> `lr`)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k == suffix or k.endswith("." + suffix) for k in keys) == 1:
                break
        short[key] = suffix
    return short


def format_value(value: Any) -> str:
    """A config value as a short, filename-safe string (floats to 4 significant digits)."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:8]


def expand(spec: SweepSpec) -> list[Run]:
    """All runs of a sweep, in a stable order (settings x seeds) with stable, readable names."""
    short = short_keys(spec.swept_keys + ["seed"])
    runs, seen = [], set()
    for values in settings(spec):
        for seed in spec.seeds:
            name = ",".join(f"{short[k]}={format_value(v)}" for k, v in [*values.items(), ("seed", seed)])
            if len(name) > 100 or name in seen:  # long or rounded-together values: keep names short and unique
                name = f"{name[:80]},{_digest([values, seed])}"
            seen.add(name)
            out_dir = spec.out_dir.resolve()
            runs.append(Run(index=len(runs), name=name, values=values, seed=seed, dir=out_dir / name))
    return runs


def set_key(config: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating levels as needed (the same keys `genart fit --a.b.c=...` takes)."""
    *parents, last = dotted.split(".")
    node = config
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(f"cannot set {dotted}: {'.'.join(parents[: i + 1])} is {child!r}, not a mapping")
        node = child
    node[last] = value


def _merge(into: dict, other: dict) -> dict:
    """Deep-merge `other` into `into`; a section naming another class_path replaces the old one whole."""
    for key, value in other.items():
        old = into.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("class_path", old.get("class_path")) == old.get("class_path"):
            _merge(old, value)
        else:
            into[key] = value
    return into


def resolved_config(spec: SweepSpec, run: Run) -> dict:
    """Base configs merged, then fixed and swept values, the seed, and every output pointed into the run dir."""
    config: dict = {}
    for base in spec.base:
        _merge(config, load_yaml(base) or {})
    for key, value in {**spec.fixed, **run.values}.items():
        set_key(config, key, value)
    config["seed_everything"] = run.seed
    data = config.get("data")
    swept = {*spec.fixed, *spec.swept_keys}
    if isinstance(data, dict) and str(data.get("class_path", "")).endswith("TextImageDataModule") and "data.init_args.seed" not in swept:
        set_key(config, "data.init_args.seed", run.seed)  # a seed replicate also varies the data order
    set_key(config, "trainer.default_root_dir", str(run.dir))
    set_key(config, "run_summary.path", str(run.metrics_path))
    short = short_keys(spec.swept_keys)
    setting = {short[k]: v for k, v in run.values.items()}
    set_key(config, "run_summary.hparams", {**setting, "seed": run.seed})  # TensorBoard's HParams view
    loggers = config["trainer"].get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and "class_path" in logger:
            init = logger.setdefault("init_args", {})
            init["save_dir"] = str(run.dir)
            if logger["class_path"].endswith("WandbLogger"):  # one group per sweep, one job type per setting
                init["name"] = f"{spec.name}/{run.name}"
                init["group"] = spec.name
                init["job_type"] = ",".join(f"{k}={format_value(v)}" for k, v in setting.items()) or "base"
    return config


def write_configs(spec: SweepSpec, runs: list[Run]) -> None:
    """Write each unfinished run's config and the sweep's runs.txt (line i = run i's config, for array task i)."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        text = yaml.safe_dump(resolved_config(spec, run), sort_keys=False)
        if run.finished:
            if run.config_path.is_file() and run.config_path.read_text() != text:
                print(f"warning: {run.name} finished with a config that differs from the spec's now; "
                      f"delete {run.dir} to run it again", file=sys.stderr)
            continue
        run.dir.mkdir(parents=True, exist_ok=True)
        run.config_path.write_text(text)
    (spec.out_dir / "runs.txt").write_text("".join(f"{run.config_path}\n" for run in runs))

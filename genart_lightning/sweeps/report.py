"""A sweep's final metrics as a CSV (one row per run), a markdown table (mean and std over seeds) and a plot."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from genart_lightning.sweeps.spec import Run, SweepSpec, format_value, short_keys

BOOKKEEPING = ("throughput/", "grad_norm", "lr-", "epoch")
"""Logged values that describe the run's mechanics, not its result: in the CSV, not in the table."""


def collect(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per run: name, seed, swept values and the final metrics of finished runs (empty otherwise)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "seed": run.seed, **run.values, "finished": run.finished}
        if run.finished:
            summary = json.loads(run.metrics_path.read_text())
            row.update(global_step=summary["global_step"], **summary["metrics"])
        rows.append(row)
    return rows


def metric_names(rows: list[dict[str, Any]], spec: SweepSpec) -> list[str]:
    """Result metrics present in any row, sorted, without the bookkeeping ones."""
    fixed = {"run", "seed", "finished", "global_step", *spec.swept_keys}
    names = {k for row in rows for k in row if k not in fixed and not k.startswith(BOOKKEEPING)}
    return sorted(names)


def default_metric(names: list[str]) -> str | None:
    """A validation metric if there is one, else a loss: what a sweep is usually judged by."""
    for hint in ("val", "loss"):
        for name in names:
            if hint in name:
                return name
    return names[0] if names else None


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """All rows, all columns (missing values empty)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def summarize(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """Finished runs grouped by setting (swept values without the seed): run count, mean and std of each metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["finished"]:
            groups.setdefault(json.dumps([row[k] for k in keys], default=str), []).append(row)
    summary = []
    for members in groups.values():
        entry: dict[str, Any] = {k: members[0][k] for k in keys}
        entry["runs"] = len(members)
        for name in metrics:
            values = [float(m[name]) for m in members if name in m]
            entry[name] = (
                statistics.fmean(values) if values else math.nan,
                statistics.stdev(values) if len(values) > 1 else 0.0,
            )
        summary.append(entry)
    return summary


NOISE_SIGMAS = 2.0
"""Two settings' means differ within seed noise when the gap is at most this many standard errors of the difference
(sqrt(std_a^2 / n_a + std_b^2 / n_b)): about a 95% band under a normal approximation."""


def within_noise(a: dict[str, Any], b: dict[str, Any], metric: str) -> bool | None:
    """Whether settings `a` and `b` differ in `metric` by no more than seed noise; None when either has one seed."""
    if a["runs"] < 2 or b["runs"] < 2:
        return None
    (mean_a, std_a), (mean_b, std_b) = a[metric], b[metric]
    return abs(mean_a - mean_b) <= NOISE_SIGMAS * math.sqrt(std_a**2 / a["runs"] + std_b**2 / b["runs"])


def markdown(summary: list[dict[str, Any]], keys: list[str], metrics: list[str], pending: int) -> str:
    """A markdown table: one row per setting (numbered), `mean ± std` over its seeds, and which other settings its
    first metric (the one the sweep is judged by) cannot be told apart from given the spread over seeds."""
    short = short_keys(keys)
    header = ["#"] + [short[k] for k in keys] + ["runs"] + metrics
    if metrics:
        header.append(f"{metrics[0]} within seed noise of")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for number, entry in enumerate(summary, 1):
        cells = [str(number)] + [format_value(entry[k]) for k in keys] + [str(entry["runs"])]
        cells += [f"{mean:.4g} ± {std:.2g}" for mean, std in (entry[m] for m in metrics)]
        if metrics:
            if entry["runs"] < 2:
                cells.append("(one seed: no spread)")
            else:
                alike = [str(i) for i, other in enumerate(summary, 1) if other is not entry
                         and within_noise(entry, other, metrics[0])]
                cells.append(", ".join(alike) or "none")
        lines.append("| " + " | ".join(cells) + " |")
    if metrics and len(summary) > 1:
        lines.append(f"\nSettings listed together differ in {metrics[0]} by at most {NOISE_SIGMAS:g} standard errors of "
                     "the difference of their means (seed noise); more seeds narrow it.")
    if pending:
        lines.append(f"\n{pending} run(s) not finished yet; run `genart sweep SPEC.yaml` to finish them.")
    return "\n".join(lines) + "\n"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot(summary: list[dict[str, Any]], keys: list[str], x: str, metric: str, path: Path, title: str = "") -> Path:
    """Mean ± std of `metric` against swept key `x`; one line per combination of the other swept keys."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    others = [k for k in keys if k != x]
    short = short_keys(keys)
    xs_all = sorted({e[x] for e in summary}, key=lambda v: (str(type(v)), v))
    numeric = _numeric(xs_all)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    lines: dict[str, list[dict[str, Any]]] = {}
    for entry in summary:
        label = ", ".join(f"{short[k]}={format_value(entry[k])}" for k in others) or metric
        lines.setdefault(label, []).append(entry)
    for label, entries in lines.items():
        entries.sort(key=lambda e: xs_all.index(e[x]))
        pos = [e[x] if numeric else xs_all.index(e[x]) for e in entries]
        mean = [e[metric][0] for e in entries]
        std = [e[metric][1] for e in entries]
        ax.errorbar(pos, mean, yerr=std, marker="o", capsize=3, label=label)
    if numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(xs_all if numeric else range(len(xs_all)), [format_value(v) for v in xs_all])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the swept values are labelled
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title, fontsize="medium")
    if len(lines) > 1:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report(spec: SweepSpec, runs: list[Run], metric: str | None = None, x: str | None = None) -> dict[str, Path]:
    """Write report.csv, report.md and (with a swept key and a metric) report.png into the sweep's directory."""
    rows = collect(runs)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    out = {"csv": write_csv(rows, spec.out_dir / "report.csv")}
    metrics = metric_names(rows, spec)
    metric = metric or spec.metric or default_metric(metrics)
    if metric is not None and metric not in metrics and any(r["finished"] for r in rows):
        raise ValueError(f"metric {metric!r} was not logged by the runs of {spec.path}; logged: {metrics}")
    keys = spec.swept_keys
    if metric in metrics:  # the metric the sweep is judged by comes first in the table
        metrics = [metric] + [m for m in metrics if m != metric]
    summary = summarize(rows, keys, metrics)
    pending = sum(not r["finished"] for r in rows)
    (spec.out_dir / "report.md").write_text(markdown(summary, keys, metrics, pending))
    out["markdown"] = spec.out_dir / "report.md"
    x = x or spec.x or (keys[0] if keys else None)
    if x is not None and x not in keys:
        raise ValueError(f"--x {x!r} is not a swept key of {spec.path}; choose one of {keys}")
    if x is not None and metric is not None and summary:
        out["plot"] = plot(summary, keys, x, metric, spec.out_dir / "report.png", title=f"sweep {spec.name}")
    return out

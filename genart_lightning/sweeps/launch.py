"""Launch a sweep's unfinished runs: one after another here, or as one SLURM job array."""

from __future__ import annotations

import itertools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from genart_lightning.slurm import template as packaged_template
from genart_lightning.sweeps.spec import Run, SweepSpec

TEMPLATE = packaged_template("sweep.sbatch")  # shipped in the package (a checkout's slurm/sweep.sbatch links to it)


def fit_command(config_path: Path) -> list[str]:
    """`genart fit --config <config>` with this interpreter, so the runs use the same environment as the sweep."""
    return [sys.executable, "-m", "genart_lightning.cli", "fit", "--config", str(config_path)]


def launch_local(runs: list[Run], dry_run: bool = False) -> list[Run]:
    """Run unfinished runs one after another, each logging to `<run dir>/fit.log`; returns the runs that failed."""
    failed = []
    for run in runs:
        if run.finished:
            print(f"[{run.index}] {run.name}: finished, skipped")
            continue
        cmd = fit_command(run.config_path)
        if dry_run:
            print(f"[{run.index}] {run.name}: would run {shlex.join(cmd)}")
            continue
        print(f"[{run.index}] {run.name}: running (log: {run.dir / 'fit.log'})", flush=True)
        with open(run.dir / "fit.log", "w") as log:
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
        if code != 0 or not run.finished:
            print(f"[{run.index}] {run.name}: FAILED (exit {code}); see {run.dir / 'fit.log'}", file=sys.stderr)
            failed.append(run)
    return failed


def array_ranges(indices: list[int]) -> str:
    """Sorted task indices in SLURM's --array syntax, runs of consecutive ones as ranges: [0,1,2,5] -> "0-2,5"."""
    parts: list[str] = []
    for _, group in itertools.groupby(enumerate(sorted(indices)), key=lambda pair: pair[1] - pair[0]):
        block = [index for _, index in group]
        parts.append(str(block[0]) if len(block) == 1 else f"{block[0]}-{block[-1]}")
    return ",".join(parts)


def array_script(spec: SweepSpec, indices: list[int], template: Path = TEMPLATE) -> str:
    """The sweep's sbatch script: the template with this sweep's array, job name, log path and runs file filled in."""
    options = {k.replace("_", "-"): v for k, v in spec.slurm.items()}
    throttle = options.pop("max-parallel", None)  # SLURM's %N: at most N tasks of the array at once
    fill = {
        "job-name": f"sweep-{spec.name}",
        "array": array_ranges(indices) + (f"%{throttle}" if throttle else ""),
        "output": str(spec.out_dir.resolve() / "slurm-logs" / "%x-%A_%a.out"),
        **options,
    }
    lines, done = [], set()
    for line in template.read_text().splitlines():
        match = re.match(r"#SBATCH --([\w-]+)", line)
        if match and match.group(1) in fill:
            line = f"#SBATCH --{match.group(1)}={fill[match.group(1)]}"
            done.add(match.group(1))
        elif line.startswith("RUNS_FILE="):
            line = f"RUNS_FILE=${{1:-{shlex.quote(str(spec.out_dir.resolve() / 'runs.txt'))}}}"
        elif line.startswith("GENART="):
            line = f'GENART=${{GENART:-"{sys.executable} -m genart_lightning.cli"}}'
        lines.append(line)
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    extra = [f"#SBATCH --{k}={v}" for k, v in fill.items() if k not in done]
    return "\n".join(lines[: last + 1] + extra + lines[last + 1 :]) + "\n"


def _queued_jobs(job_name: str) -> list[str]:
    """Ids of this user's queued or running jobs with that name (none where squeue is missing)."""
    if shutil.which("squeue") is None:
        return []
    out = subprocess.run(["squeue", "--me", "--noheader", f"--name={job_name}", "--format=%i"],
                         capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


def launch_slurm(spec: SweepSpec, runs: list[Run], dry_run: bool = False, wait: bool = False) -> Path | None:
    """Write `<out_dir>/sweep.sbatch` (one array task per unfinished run) and submit it unless dry_run."""
    pending = [run.index for run in runs if not run.finished]
    if not pending:
        print(f"all {len(runs)} runs finished; nothing to submit")
        return None
    queued = _queued_jobs(f"sweep-{spec.name}")
    if queued and not dry_run:  # resubmitting would run the same unfinished runs twice, into the same dirs
        raise RuntimeError(f"sweep {spec.name} still has SLURM jobs {queued} queued or running; "
                           f"wait for them (squeue --name=sweep-{spec.name}) or scancel them, then re-run")
    script = spec.out_dir / "sweep.sbatch"
    script.write_text(array_script(spec, pending))
    (spec.out_dir / "slurm-logs").mkdir(exist_ok=True)
    cmd = ["sbatch", *(["--wait"] if wait else []), str(script)]
    print(f"{len(pending)} of {len(runs)} runs pending; array tasks {array_ranges(pending)}")
    if dry_run:
        print(f"wrote {script}; submit with: {shlex.join(cmd)}")
        return script
    code = subprocess.call(cmd)
    if code != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited with {code}; see {spec.out_dir / 'slurm-logs'}")
    return script

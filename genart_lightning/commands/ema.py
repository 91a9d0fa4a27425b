"""`genart ema reconstruct RUN --sigma-rel X`: the EMA of any length, after training, from the run's post-hoc EMA
snapshots (`--posthoc_ema.every_n_steps K` during fit; Karras et al. 2024), written as a checkpoint whose EMA
weights are the reconstruction, which `genart sample` and `genart eval` read like any other."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ema", help="post-hoc EMA: rebuild the EMA of any length from a run's snapshots",
                              description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    rebuild = actions.add_parser("reconstruct", help="a checkpoint with the EMA of relative width --sigma-rel",
                                 description=__doc__)
    rebuild.add_argument("run", help="the run folder (--trainer.default_root_dir of the fit), holding phema/")
    rebuild.add_argument("--sigma-rel", type=float, required=True,
                         help="relative EMA width (EDM2's sigma_rel: 0.05 short, 0.10 long; typical 0.01 to 0.25)")
    rebuild.add_argument("--step", type=int, help="the training step to reconstruct at (default: the last snapshot's)")
    rebuild.add_argument("--ckpt", help="checkpoint to take the rest of the model from (default RUN/checkpoints/last.ckpt)")
    rebuild.add_argument("--out", help="output checkpoint (default RUN/phema/ema-sigma<X>-step<N>.ckpt)")
    rebuild.set_defaults(func=run)


def reconstruct(run_dir: Path, sigma_rel: float, step: int | None = None) -> tuple[dict, int, int]:
    """The backbone state of the EMA of width `sigma_rel` at `step` (default: the last snapshot's), from the snapshots
    up to that step; also that step and the number of snapshots used."""
    import torch

    from genart_lightning import UserError
    from genart_lightning.callbacks.posthoc_ema import SNAPSHOT_DIR
    from genart_lightning.nn.posthoc_ema import coefficients

    files = sorted((run_dir / SNAPSHOT_DIR).glob("phema-*.pt"))
    if not files:
        raise UserError(f"no post-hoc EMA snapshots in {run_dir / SNAPSHOT_DIR}; fit with --posthoc_ema.every_n_steps K "
                        "(e.g. 1000) to write them")
    snapshots = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    step = step or max(s["step"] for s in snapshots)
    used = [s for s in snapshots if s["step"] <= step]
    if len(used) < 2:
        raise UserError(f"{len(used)} snapshot(s) up to step {step} in {run_dir / SNAPSHOT_DIR}; a reconstruction needs "
                        "at least two (take a later --step)")
    weights = coefficients([(s["step"], s["sigma_rel"]) for s in used], (step, sigma_rel))
    combined = {}
    for name, last in used[-1]["state_dict"].items():
        if last.is_floating_point():
            combined[name] = sum(float(w) * s["state_dict"][name] for w, s in zip(weights, used, strict=True))
        else:
            combined[name] = last
    return combined, step, len(used)


def run(args: argparse.Namespace) -> None:
    from genart_lightning import UserError
    from genart_lightning.models.loading import read_checkpoint
    from genart_lightning.run.checkpoint_io import atomic_torch_save

    run_dir = Path(args.run)
    state, step, count = reconstruct(run_dir, args.sigma_rel, args.step)
    ckpt = Path(args.ckpt) if args.ckpt else run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"checkpoint not found: {ckpt}; pass --ckpt, a checkpoint of this run (its config and "
                        "frozen parts are taken from it)")
    checkpoint = read_checkpoint(ckpt)
    model_state = checkpoint["state_dict"]
    missing = [k for k in state if f"ema.module.{k}" not in model_state]
    if missing:
        raise UserError(f"{ckpt} has no EMA weights named like the snapshots' ({missing[0]}, ...); give a checkpoint of "
                        "the run that wrote them")
    model_state.update({f"ema.module.{k}": v.to(model_state[f"ema.module.{k}"].dtype) for k, v in state.items()})
    checkpoint["genart_posthoc_ema"] = {"sigma_rel": args.sigma_rel, "step": step, "snapshots": count}
    out = Path(args.out) if args.out else run_dir / "phema" / f"ema-sigma{args.sigma_rel:.3f}-step{step}.ckpt"
    atomic_torch_save(checkpoint, out)
    print(f"wrote {out} (EMA sigma_rel {args.sigma_rel} at step {step}, from {count} snapshots; genart sample --ckpt "
          f"{out} reads it)")

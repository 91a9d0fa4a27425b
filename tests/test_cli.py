"""`genart` as a user meets it: the command list, a config typo, and a fit whose last.ckpt holds the final step."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from tracking_helpers import REPO, start_genart, tiny_config

from genart_lightning.cli import build_parser


def test_help_lists_every_command():
    help_text = build_parser().format_help()
    for command in ("fit", "validate", "shards", "sample", "eval", "export", "sweep", "slurm"):
        assert f"\n    {command} " in help_text


def test_config_typo_is_one_clear_error(tmp_path):
    proc = start_genart("fit", "--config", str(REPO / "experiments/dcgan_shapes.yaml"), "--model.init_args.lrr_g=1e-3",
                        "--print_config", cwd=tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "lrr_g" in out and "Traceback" not in out


def test_last_checkpoint_holds_final_step_when_interval_does_not_divide(shapes_shards_16px, tmp_path):
    config = tiny_config(shapes_shards_16px, max_steps=5)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["checkpoint"] = {"every_n_train_steps": 3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = start_genart("fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false", cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 5


def test_top_level_help_does_not_import_torch() -> None:
    # `genart --help` and `genart shards ...` answer at once: torch and Lightning load only in the commands using them.
    code = "import sys; from genart_lightning.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

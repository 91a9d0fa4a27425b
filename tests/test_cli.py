"""`genart` as a user meets it: the command list, a config typo, a fit whose last.ckpt holds the final step, and
the README's VAE -> latent diffusion chain run through the CLI."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from helpers import REPO, genart_in_process, tiny_config

from genart_lightning.cli import build_parser


def test_help_lists_every_command():
    help_text = build_parser().format_help()
    for command in ("fit", "validate", "shards", "sample", "eval", "export", "sweep", "slurm"):
        assert f"\n    {command} " in help_text


def test_config_typo_is_one_clear_error(tmp_path):
    code, _, err = genart_in_process("fit", "--config", str(REPO / "experiments/dcgan_shapes.yaml"),
                                     "--model.init_args.lrr_g=1e-3", "--print_config", cwd=tmp_path)
    assert code == 2 and "lrr_g" in err and "Traceback" not in err


def test_last_checkpoint_holds_final_step_when_interval_does_not_divide(shapes_shards_16px, tmp_path):
    config = tiny_config(shapes_shards_16px, max_steps=5)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["checkpoint"] = {"every_n_train_steps": 3}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = genart_in_process("fit", "--config", str(tmp_path / "config.yaml"), "--trainer.logger=false", cwd=tmp_path)
    assert code == 0, err[-3000:]
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 5


def test_top_level_help_does_not_import_torch() -> None:
    # `genart --help` and `genart shards ...` answer at once: torch and Lightning load only in the commands using them.
    code = "import sys; from genart_lightning.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_latent_diffusion_fits_through_the_cli_on_a_cli_trained_vae(shapes_shards_16px, tmp_path):
    # LightningCLI hands the outer model's arguments to any save_hyperparameters() during instantiation;
    # the first stage loaded inside LatentDiffusion once took the LDM's and failed ("no attribute latent_channels").
    vae_config = tiny_config(shapes_shards_16px, max_steps=2)
    vae_config["trainer"]["default_root_dir"] = str(tmp_path / "vae")
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(vae_config))
    assert genart_in_process("fit", "--config", str(tmp_path / "vae.yaml"), "--trainer.logger=false", cwd=tmp_path)[0] == 0
    vae_ckpt = tmp_path / "vae/checkpoints/last.ckpt"

    ldm_config = {**vae_config, "trainer": {**vae_config["trainer"], "default_root_dir": str(tmp_path / "ldm")}}
    ldm_config["model"] = {
        "class_path": "genart_lightning.models.latent_diffusion.LatentDiffusion",
        "init_args": {"first_stage_ckpt": str(vae_ckpt), "image_size": 16, "sample_steps": 2,
                      "backbone": {"class_path": "genart_lightning.nn.unet.UNetBackbone",
                                   "init_args": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
                                                 "attention_levels": [0], "head_channels": 8}}},
    }
    (tmp_path / "ldm.yaml").write_text(yaml.safe_dump(ldm_config))
    assert genart_in_process("fit", "--config", str(tmp_path / "ldm.yaml"), "--trainer.logger=false", cwd=tmp_path)[0] == 0
    saved = torch.load(tmp_path / "ldm/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
    vae_saved = torch.load(vae_ckpt, weights_only=True)["hyper_parameters"]
    assert saved["first_stage_hparams"] == {k: v for k, v in vae_saved.items() if not k.startswith("_")}


def test_every_shipped_experiment_config_validates(tmp_path):
    # A typo or a renamed option in a config we ship is one clear error here, not on a cluster after the queue wait.
    overlays = {"logger_wandb.yaml": "dcgan_shapes.yaml", "strategy_fsdp2.yaml": "ldm_laion_256.yaml",
                "own_data.yaml": "flow_shapes.yaml"}
    configs = sorted(p for p in (REPO / "experiments").glob("*.yaml") if p.name not in overlays)
    runs = {p.name: ["--config", str(p)] for p in configs}
    for overlay, base in overlays.items():  # added after a family's config
        runs[overlay] = ["--config", str(REPO / "experiments" / base), "--config", str(REPO / "experiments" / overlay)]
    failed, printed = {}, {}
    for name, args in runs.items():
        code, printed[name], err = genart_in_process("fit", *args, "--print_config", cwd=tmp_path)
        if code != 0 or "class_path" not in printed[name]:
            failed[name] = (printed[name] + err)[-1500:]
    assert len(configs) >= 9 and not failed, failed
    assert "strategy: fsdp2" in printed["strategy_fsdp2.yaml"]


def test_one_option_moves_the_whole_run_and_a_failed_start_uses_no_version(shapes_shards, tmp_path):
    # A shipped config with only --trainer.default_root_dir: checkpoints, logs, grids, config and provenance all land
    # in that folder (the configs once fixed the logger's save_dir, so grids went to runs/<config>/ whatever the run).
    run = tmp_path / "mine"
    args = ["fit", "--config", str(REPO / "experiments/dcgan_shapes.yaml"), f"--trainer.default_root_dir={run}",
            f"--data.init_args.train_urls={shapes_shards['train_urls']}", f"--data.init_args.val_urls={shapes_shards['val_urls']}",
            "--trainer.max_steps=4", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
            "--checkpoint.every_n_train_steps=2", "--sample_grid.every_n_steps=2", "--sample_grid.num_samples=4",
            "--data.init_args.num_workers=1"]
    run.mkdir()
    (run / "notes.txt").write_text("the user's own file")  # an existing folder: only what the failed start made goes
    code, _, err = genart_in_process(*args, "--data.init_args.batch_size=4096", cwd=tmp_path)
    assert code == 2 and "--data.batch_size" in err, err[-2000:]
    assert (run / "notes.txt").is_file()
    code, out, err = genart_in_process(*args, cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert not (tmp_path / "runs").exists()
    # The fit ends by saying where things are and what to run next; nothing nobody acts on is printed.
    report = out[out.index("[genart] fit finished at step 4"):]  # paths as the user sees them from the working dir
    assert "checkpoint:  mine/checkpoints/last.ckpt" in report and "sample grid: mine/lightning_logs/version_0/samples/" in report
    assert "metrics:     mine/lightning_logs/version_0/metrics.json" in report and "logs:        mine/lightning_logs/version_0" in report
    assert "genart sample --ckpt mine/checkpoints/last.ckpt" in report and "genart eval --ckpt mine/checkpoints/last.ckpt" in report
    for noise in ("Tip:", "LeafSpec", "module(s) in eval mode", "SLURM job None", "/-2"):
        assert noise not in out + err, noise
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "checkpoints/provenance.json").is_file()
    assert (run / "checkpoints/config.yaml").is_file()
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == ["version_0"]  # the failed start took none
    assert list((run / "lightning_logs/version_0").glob("events.out.tfevents.*")) and list((run / "lightning_logs/version_0/samples").glob("*.png"))

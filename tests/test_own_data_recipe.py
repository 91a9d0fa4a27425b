"""The README's "your own pictures in five commands", run as written on 60 captioned pictures in a fresh folder:
shards, fit, sample and eval all exit 0 and everything lands under the one run folder."""

from __future__ import annotations

import random
import re
import shlex

import pytest
from helpers import REPO, genart_in_process

from datamodules.synthetic import render_sample

QUICK = {"--trainer.max_steps": "4", "--num-samples": "8"}
"""The only changes to the recipe: the fit's steps (1,500 there) and eval's samples (64 there), so the test takes
seconds."""


def recipe() -> list[list[str]]:
    """The commands of the README section, continuation lines joined, each without its leading `genart`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your own pictures in five commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert all(c[0] == "genart" for c in commands) and [c[1] for c in commands] == ["shards", "fit", "sample", "eval"]
    return [c[1:] for c in commands]


@pytest.mark.slow
def test_readme_own_data_recipe_runs_as_written(tmp_path, genart_cache, monkeypatch):
    monkeypatch.setenv("GENART_CACHE", str(genart_cache))
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    pics = tmp_path / "my_pics"
    pics.mkdir()
    rng = random.Random(0)
    for i in range(60):
        image, _, caption = render_sample(rng, 40)
        image.resize((48, 40)).save(pics / f"pic{i:02d}.png")  # not square, not 32px: from-folder resizes
        (pics / f"pic{i:02d}.txt").write_text(caption)
    for command in recipe():
        for option, value in QUICK.items():
            if option in command:
                command[command.index(option) + 1] = value
        code, out, err = genart_in_process(*command, cwd=tmp_path)
        assert code == 0, f"genart {shlex.join(command)}: exit {code}\n{(out + err)[-3000:]}"
    run = tmp_path / "runs" / "mine"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "red_flower.png").is_file()
    assert (run / "eval.json").is_file() and list((run / "lightning_logs/version_0/samples").glob("*.png"))

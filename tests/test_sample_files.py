"""`genart sample --out-dir`: one PNG per sample whose pixels are the grid's tiles, samples.jsonl with the settings used,
prompts from a file, batches; small grids also written enlarged for viewing, captions under the columns; --height/--width off the trained square."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import genart_in_process, save_untrained, tiny_unet
from PIL import Image

from genart_lightning.cli import main as genart
from genart_lightning.diffusion.flow import Flow
from genart_lightning.models.diffusion import PixelDiffusion
from genart_lightning.models.grids import save_grid
from genart_lightning.nn.dit import DiTBackbone

CKPT = Path(__file__).parent / "fixtures" / "legacy" / "PixelDiffusion.ckpt"


def test_sample_files_are_the_grid_tiles(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"caption": "a large red circle in the centre, black background"}\n\n{"prompt": "a small blue square"}\n')
    out_dir, grid_path = tmp_path / "samples", tmp_path / "grid.png"
    genart(["sample", "--ckpt", str(CKPT), "--num", "5", "--batch-size", "2", "--prompts-file", str(prompts),
            "--out-dir", str(out_dir), "--out", str(grid_path), "--device", "cpu"])
    records = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == [f"{i:06d}.png" for i in range(5)]
    assert [r["caption"] for r in records] == ["a large red circle in the centre, black background", "a small blue square"] * 2 + [
        "a large red circle in the centre, black background"]
    assert len({r["seed"] for r in records}) == 3  # one seed per batch of 2
    assert records[0]["settings"] == {"sampler": "ddim", "steps": 4, "guidance": 4.0, "guidance_interval": None, "eta": 0.0,
                                      "height": 16, "width": 16}
    grid = np.asarray(Image.open(grid_path))
    side, nrow, pad = 16, 2, 2  # two prompts cycled: a column each
    factor = -(-512 // (nrow * (side + pad) + pad))  # a captioned grid is enlarged to be read on a screen
    for i, record in enumerate(records):
        tile = np.asarray(Image.open(out_dir / record["file"]))
        r, c = divmod(i, nrow)
        y, x = (pad + r * (side + pad)) * factor, (pad + c * (side + pad)) * factor
        np.testing.assert_array_equal(tile, grid[y : y + side * factor : factor, x : x + side * factor : factor])
    strip = grid[(3 * (side + pad) + pad) * factor:]  # under the third and last row: each column's caption
    assert all((strip[:, c * (side + pad) * factor : (c + 1) * (side + pad) * factor] < 128).any() for c in range(nrow))
    assert not (tmp_path / "grid_large.png").exists()


def test_small_grids_get_an_enlarged_copy_and_captions_go_under_columns_or_rows(tmp_path):
    images = torch.zeros(4, 3, 8, 8)
    plain = np.asarray(Image.open(save_grid(images, tmp_path / "plain.png")))
    assert plain.shape[:2] == (2 * 10 + 2,) * 2  # make_grid's layout, exact pixels
    large = Image.open(tmp_path / "plain_large.png")
    assert large.width >= 512 and large.width % plain.shape[1] == 0  # nearest neighbour by an integer factor

    def strips(captions: list[str], nrow: int) -> int:
        """Rows of the captioned grid that hold text (dark pixels on the white strips; the images are mid-grey)."""
        grid = np.asarray(Image.open(save_grid(images, tmp_path / "c.png", nrow=nrow, captions=captions)))
        dark = (grid < 64).all(axis=2).any(axis=1)
        return int(np.sum(dark[1:] & ~dark[:-1]) + dark[0])  # runs of text lines, counted by their starts

    per_column = strips(["red", "blue"] * 2, nrow=2)
    per_row = strips(["red", "blue", "green", "grey"], nrow=2)
    assert per_column == 1 and per_row == 2  # one-word captions: one text line per strip


def test_a_caption_word_wider_than_its_column_does_not_run_into_the_next(tmp_path):
    images = torch.zeros(8, 3, 8, 8)  # eight columns of 8px tiles: each column is 70 px wide when enlarged
    captions = [f"a small red circle on the {where}, black background," for where in "abcdefgh"]
    grid = np.asarray(Image.open(save_grid(images, tmp_path / "c.png", nrow=8, captions=captions)))
    factor = -(-512 // (8 * 10 + 2))
    pitch = 10 * factor
    strip = grid[10 * factor + 2 * factor:]  # under the row of tiles
    for column in range(1, 8):  # the 4 px before each caption's start belong to no caption
        assert (strip[:, column * pitch - 1: column * pitch + 4] > 200).all(), column


def test_same_seed_same_files(tmp_path):
    for name in ("a", "b"):
        genart(["sample", "--ckpt", str(CKPT), "--num", "3", "--batch-size", "2", "--prompt", "a red circle",
                "--out-dir", str(tmp_path / name), "--device", "cpu"])
    for i in range(3):
        assert (tmp_path / "a" / f"{i:06d}.png").read_bytes() == (tmp_path / "b" / f"{i:06d}.png").read_bytes()
    assert not (tmp_path / "grid.png").exists()  # --out-dir alone writes no grid


@pytest.mark.parametrize("backbone", ["dit", "unet"])
def test_height_and_width_draw_non_square_samples_and_a_size_the_backbone_cannot_take_is_one_line(tmp_path, backbone):
    spec = DiTBackbone(patch_size=2, hidden_size=32, depth=1, num_heads=2) if backbone == "dit" else tiny_unet()
    ckpt = save_untrained(PixelDiffusion(image_size=16, process=Flow(), backbone=spec, sample_steps=2), tmp_path / "m.ckpt")
    code, _, err = genart_in_process("sample", "--ckpt", str(ckpt), "--num", "3", "--batch-size", "2", "--height", "8",
                                     "--width", "24", "--prompt", "a red circle", "--out-dir", str(tmp_path / "out"),
                                     "--device", "cpu")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [Image.open(tmp_path / "out" / r["file"]).size for r in records] == [(24, 8)] * 3  # PIL: (width, height)
    assert {(r["settings"]["height"], r["settings"]["width"]) for r in records} == {(8, 24)}
    code, _, err = genart_in_process("sample", "--ckpt", str(ckpt), "--height", "15", "--width", "24", "--device", "cpu")
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot sample 15x24 (height x width) with the {backbone} backbone of this PixelDiffusion: height and "
        "width must be multiples of 2; nearest sizes that work: 14x24, 16x24"]
    assert not (tmp_path / "grid.png").exists()

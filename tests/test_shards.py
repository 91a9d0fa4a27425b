"""Shard writers and inspection: a user's folder + captions -> shards the datamodule reads; `genart shards` CLI."""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import pytest
from helpers import genart_in_process
from PIL import Image

from datamodules.shards import BadFolder, count_samples, expand_urls, from_folder, inspect_shards
from datamodules.webdataset import TextImageDataModule
from genart_lightning.cli import main


def _folder(root: Path) -> dict[str, str]:
    """Five images of mixed formats and sizes in a nested folder; returns file -> caption."""
    captions = {}
    for i, (ext, size) in enumerate([("jpg", (40, 30)), ("png", (20, 20)), ("png", (64, 48)), ("webp", (30, 60)),
                                     ("jpeg", (33, 33))]):
        name = f"{'sub/' if i == 2 else ''}img.{i}.{ext}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (50 * i, 80, 120)).save(root / name)
        captions[name] = f"picture number {i}, with a comma"
    return captions


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_from_folder_roundtrip(tmp_path, fmt):
    captions = _folder(tmp_path / "images")
    table = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        lines = ["file,caption,license"] + [f'{f},"{c}",cc-by' for f, c in captions.items()]
        table.write_text("\n".join(lines) + "\n")
    else:
        table.write_text("".join(json.dumps({"image": f, "text": c, "license": "cc-by"}) + "\n" for f, c in captions.items()))
    info = from_folder(tmp_path / "images", table, tmp_path / "out", resize=16, samples_per_shard=2)
    assert info["num_train"] == 5 and "val_urls" not in info
    urls = expand_urls(info["train_urls"])
    assert [count_samples(u) for u in urls] == [2, 2, 1]
    dm = TextImageDataModule(info["train_urls"], info["train_urls"], batch_size=1, num_workers=0, image_size=16)
    dm.setup("fit")
    got = {k: c for b in dm.val_dataloader() for k, c in zip(b["key"], b["caption"], strict=True)}
    assert got == {f.rsplit(".", 1)[0].replace("/", "__").replace(".", "_"): c for f, c in captions.items()}
    with tarfile.open(urls[1]) as tar:
        meta = json.loads(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))).read())
    assert meta["license"] == "cc-by" and min(meta["width"], meta["height"]) == 16


def test_from_folder_clear_errors(tmp_path):
    captions = _folder(tmp_path / "images")
    table = tmp_path / "c.csv"
    with pytest.raises(FileNotFoundError, match=r"captions file not found: .*c.csv \(from --captions\)"):
        from_folder(tmp_path / "images", table, tmp_path / "out")
    table.write_text("name,words\na,b\n")
    with pytest.raises(ValueError, match=r"need an image column \(file\|image\|filename\|path\)"):
        from_folder(tmp_path / "images", table, tmp_path / "out")
    table.write_text("file,caption\nimg.0.jpg,one\nnope.png,two\n")
    with pytest.raises(BadFolder, match=r"4 images without a caption \(add rows for them to .*c.csv, or pass"
                                        r" --empty-captions\), 1 caption row naming a missing image") as bad:
        from_folder(tmp_path / "images", table, tmp_path / "out")
    assert re.fullmatch(r"image not found: .*nope.png \(row 2 of .*c.csv\)", bad.value.bad[-1].line())
    table.write_text("file,caption\nimg.0.jpg,one\n")
    info = from_folder(tmp_path / "images", table, tmp_path / "out", empty_captions=True, val_fraction=0.5)
    assert info["num_train"] + info["num_val"] == len(captions) and info["num_val"] > 0



def _bad_folder(root: Path) -> Path:
    """Four good images with sidecar captions (one caption file blank), two unreadable images (not an image, a
    truncated PNG) with captions, two images without a caption."""
    for i in range(4):
        Image.new("RGB", (12, 10), (60 * i, 90, 30)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"good picture {i}" if i else "  \n")
    noise = io.BytesIO()
    Image.frombytes("RGB", (32, 32), random.Random(0).randbytes(32 * 32 * 3)).save(noise, format="PNG")
    (root / "truncated.png").write_bytes(noise.getvalue()[:-100])  # the end of the pixel data lost
    (root / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    for name in ("not_an_image", "truncated"):
        (root / f"{name}.txt").write_text("a caption")
    for name in ("uncaptioned_a.png", "uncaptioned_b.png"):
        Image.new("RGB", (12, 10)).save(root / name)
    return root


def _from_folder(tmp_path: Path, *flags: str) -> tuple[int, str, str]:
    return genart_in_process("shards", "from-folder", "--images", str(_bad_folder(tmp_path / "images")),
                             "--out", str(tmp_path / "out"), *flags, cwd=tmp_path)


def test_from_folder_lists_every_bad_file_in_one_run(tmp_path):
    (tmp_path / "images").mkdir()
    code, _, stderr = _from_folder(tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip() and "checking images" not in line]  # no progress bar
    assert code == 2, stderr
    images = tmp_path / "images"
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        f"  unreadable image: {images / 'not_an_image.png'}", f"  unreadable image: {images / 'truncated.png'}",
        f"  no caption: {images / 'uncaptioned_a.png'}", f"  no caption: {images / 'uncaptioned_b.png'}"]
    assert lines[0].endswith("(UnidentifiedImageError: cannot identify image file)")  # the path once, not twice
    assert lines[-1] == (
        f"error: {tmp_path / 'images'} has 2 unreadable images (re-save or remove them), 2 images without a caption (add"
        " IMAGE.txt captions beside them or give --captions FILE, or pass --empty-captions); or pass --skip-bad to write"
        " the other 4 images")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_from_folder_skip_bad_writes_the_rest_and_lists_what_it_skipped(tmp_path):
    (tmp_path / "images").mkdir()
    code, stdout, _ = _from_folder(tmp_path, "--skip-bad")
    assert code == 0
    skipped = [line for line in stdout.splitlines() if line.startswith("skipped ") and "--skip-bad" not in line]
    assert [line.split(": ")[0] for line in skipped] == ["skipped unreadable image"] * 2 + ["skipped no caption"] * 2
    assert {Path(line.split(": ")[1].split(" (")[0]).name for line in skipped} == {
        "not_an_image.png", "truncated.png", "uncaptioned_a.png", "uncaptioned_b.png"}
    assert "skipped (--skip-bad): 2 unreadable images, 2 images without a caption" in stdout
    assert "train: 4 samples -> " in stdout
    assert "1 empty caption (an empty caption file or cell): stored as unconditional samples" in stdout
    urls = expand_urls(str(tmp_path / "out" / "train-*.tar"))
    assert sum(count_samples(u) for u in urls) == 4
    assert inspect_shards(urls)["num_samples"] == 4  # what was written, decoded


def test_from_folder_counts_empty_captions(tmp_path):
    (tmp_path / "images").mkdir()
    code, stdout, _ = _from_folder(tmp_path, "--skip-bad", "--empty-captions")
    assert code == 0
    assert "skipped (--skip-bad): 2 unreadable images\n" in stdout and "train: 6 samples -> " in stdout
    assert "1 empty caption (an empty caption file or cell)" in stdout  # good0's blank caption file
    assert "2 images without a caption stored with an empty one (--empty-captions)" in stdout


def test_info_counts_unreadable_entries(shapes_shards, tmp_path):
    source = Path(shapes_shards["val_shards"][0])
    with tarfile.open(source) as src, tarfile.open(tmp_path / "mixed.tar", "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "val00000217.png":
                data = data[:40]  # corrupt image
            if member.name == "val00000220.txt":
                continue  # caption-less sample
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    report = inspect_shards(str(tmp_path / "mixed.tar"))
    assert report["num_samples"] == 22
    assert len(report["unreadable"]) == 2
    assert "val00000217" in report["unreadable"][0] and "no caption" in report["unreadable"][1]
    assert report["sizes"] == {(32, 32): 22}


def test_cli_shapes_then_info(tmp_path, capsys):
    main(["shards", "shapes", "--out", str(tmp_path), "--num-samples", "50", "--image-size", "16", "--seed", "1",
          "--shard-size", "20"])
    out = capsys.readouterr().out
    assert "train: 45 samples -> " in out and "train-{000000..000002}.tar" in out
    main(["shards", "info", str(tmp_path / "train-{000000..000002}.tar")])
    out = capsys.readouterr().out
    assert "3 shards, 45 usable samples" in out and "16x16 (45)" in out and "0 unreadable entries" in out
    with pytest.raises(SystemExit, match=r"shard not found: .*train-000008.tar \(2 missing\)"):
        main(["shards", "info", str(tmp_path / "train-{000008..000009}.tar")])


def test_globs_expand_like_the_brace_pattern(tmp_path):
    from datamodules.shards import expand_urls

    for i in range(3):
        (tmp_path / f"val-{i:06d}.tar").write_bytes(b"")
    brace = expand_urls(str(tmp_path / "val-{000000..000002}.tar"))
    assert expand_urls(str(tmp_path / "val-*.tar")) == brace
    assert expand_urls([str(tmp_path / "val-00000[0-1].tar"), str(tmp_path / "val-000002.tar")]) == brace
    assert expand_urls(str(tmp_path / "train-*.tar")) == [str(tmp_path / "train-*.tar")]  # named by the missing-shard error

"""`genart shards from-folder` caption sources: a CSV, Hugging Face imagefolder metadata and sidecar .txt give the same shards."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from datamodules.shards import BadFolder, from_folder, read_imagefolder, read_sidecar_captions
from genart_lightning.cli import main

CAPTIONS = {"a.png": "a red square", "b.v2.png": "a green, wide one", "sub/c.png": "a blue one, nested"}


def _images(root: Path) -> Path:
    """Three real PNGs (one nested, one with a dot in its stem); the same bytes every call."""
    for i, name in enumerate(CAPTIONS):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 + 4 * i, 8), (80 * i, 200 - 60 * i, 40)).save(root / name)
    return root


def _shards(tmp_path: Path, name: str, images: Path, *flags: str) -> dict[str, bytes]:
    """Run the CLI into tmp_path/name; every file written there -> its bytes."""
    out = tmp_path / name
    main(["shards", "from-folder", "--images", str(images), "--out", str(out), "--shard-size", "2", *flags])
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _csv_route(tmp_path: Path, license_column: bool) -> dict[str, bytes]:
    images = _images(tmp_path / "csv_images")
    header = "file,caption" + (",license" if license_column else "")
    rows = [f'{f},"{c}"' + (",cc-by" if license_column else "") for f, c in CAPTIONS.items()]
    (tmp_path / "captions.csv").write_text("\n".join([header, *rows]) + "\n")
    return _shards(tmp_path, f"csv_out_{license_column}", images, "--captions", str(tmp_path / "captions.csv"))


def _samples(shards: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes} across the tars."""
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in shards.items():
        if name.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_imagefolder_metadata_jsonl_matches_csv_route(tmp_path, capsys):
    expected = _csv_route(tmp_path, license_column=True)
    images = _images(tmp_path / "hf")
    # One metadata file at the top and one in a split folder; file_name is relative to the metadata file's folder.
    top = [{"file_name": f, "text": c, "license": "cc-by"} for f, c in CAPTIONS.items() if "/" not in f]
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in top))
    (images / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": CAPTIONS["sub/c.png"],
                                                               "license": "cc-by"}) + "\n")
    got = _shards(tmp_path, "hf_out", images)
    assert "train: 3 samples -> " in capsys.readouterr().out  # the metadata files are not images
    assert list(got) == ["sizes.json", "train-000000.tar", "train-000001.tar"]
    samples = _samples(got)
    assert {k: s["txt"].decode() for k, s in samples.items()} == {"a": "a red square", "b_v2": "a green, wide one",
                                                                  "sub__c": "a blue one, nested"}
    assert json.loads(samples["sub__c"]["json"])["license"] == "cc-by"
    assert got == expected


def test_imagefolder_metadata_csv_with_caption_column_matches_csv_route(tmp_path):
    expected = _csv_route(tmp_path, license_column=True)
    images = _images(tmp_path / "hf")
    rows = ["file_name,prompt,license", *(f'{f},"{c}",cc-by' for f, c in CAPTIONS.items())]
    (images / "metadata.csv").write_text("\n".join(rows) + "\n")
    assert _shards(tmp_path, "hf_out", images, "--caption-column", "prompt") == expected
    assert sorted(r[0] for r in read_imagefolder(images, "prompt")) == sorted(CAPTIONS)


def test_sidecar_txt_captions_match_csv_route(tmp_path):
    expected = _csv_route(tmp_path, license_column=False)
    images = _images(tmp_path / "kohya")
    for name, caption in CAPTIONS.items():
        (images / name).with_suffix(".txt").write_text(f"  {caption}\n", encoding="utf-8")
    assert _shards(tmp_path, "txt_out", images) == expected
    assert sorted(read_sidecar_captions(images)) == sorted((f, c, {}) for f, c in CAPTIONS.items())
    (images / "a.txt").unlink()
    with pytest.raises(SystemExit, match=r"error: .*kohya has 1 image without a caption \(add IMAGE\.txt captions beside"
                                          r" them or give --captions FILE, or pass --empty-captions\)"):
        _shards(tmp_path, "txt_out2", images)
    info = from_folder(images, None, tmp_path / "txt_out3", empty_captions=True)
    assert info["num_train"] == 3


def test_metadata_errors_name_the_file_and_the_fix(tmp_path):
    images = _images(tmp_path / "hf")
    meta = images / "metadata.jsonl"
    meta.write_text("".join(json.dumps({"file_name": f, "description": c}) + "\n" for f, c in CAPTIONS.items()))
    with pytest.raises(SystemExit, match=r"^error: .*metadata\.jsonl has columns \['file_name', 'description'\] but no"
                                         r" caption column \(text\|caption\); pass --caption-column NAME$"):
        _shards(tmp_path, "out", images)
    with pytest.raises(ValueError, match=r"metadata\.jsonl has no column 'prompt' \(from --caption-column\)"):
        from_folder(images, None, tmp_path / "out", caption_column="prompt")
    assert from_folder(images, None, tmp_path / "out", caption_column="description")["num_train"] == 3
    meta.write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(BadFolder, match=r"1 caption row naming a missing image") as bad:
        from_folder(images, None, tmp_path / "out")
    assert re.match(r"image not found: .*gone\.png \(row 1 of .*metadata\.jsonl", bad.value.bad[-1].line())
    meta.write_text(json.dumps({"image": "a.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"needs a file_name column"):
        from_folder(images, None, tmp_path / "out")

"""Write WebDataset shards (img2dataset layout) from any sample stream, and inspect existing shards."""

from __future__ import annotations

import csv
import fcntl
import glob
import io
import json
import os
import statistics
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls as wds_expand_urls
from webdataset.tariterators import base_plus_ext

from datamodules.buckets import Bucketing, nearest_bucket, parse_buckets
from datamodules.latents import LATENT_MEMBER, TEXT_MEMBER, load_array, load_text
from datamodules.stream import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    has_payload_and_caption,
    open_image,
    oversized_problem,
    read_shard,
)
from datamodules.tarstream import MAX_MEMBER_BYTES

SIZES_FILE = "sizes.json"
"""Per-directory JSON {shard file name: sample count}; lets the datamodule plan epochs without scanning tars."""


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str, samples_per_shard: int) -> list[tuple[str, int]]:
    """Write `{prefix}-NNNNNN.tar` shards byte-reproducibly; returns [(path, count)] and records counts in sizes.json."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}; pass --shard-size N with N >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, int]] = []
    writer, count = None, 0

    def close() -> None:
        if writer is not None:
            writer.close()
            written[-1] = (written[-1][0], count)

    for sample in samples:
        if writer is None or count >= samples_per_shard:
            close()
            path = out / f"{prefix}-{len(written):06d}.tar"
            # Fixed mtime/owner/mode: the same samples give the same tar bytes. An int mtime: a float one makes
            # tarfile write a PAX header before every member, doubling what readers parse.
            writer = wds.TarWriter(str(path), encoder=False, mtime=0, user="genart", group="genart", mode=0o644)
            written.append((str(path), 0))
            count = 0
        writer.write(sample)
        count += 1
    close()
    record_sizes(out, {Path(p).name: n for p, n in written})
    return written


def record_sizes(out: Path, sizes: dict[str, int]) -> None:
    """Merge shard counts into out/sizes.json (other splits in the same directory keep theirs); under a lock, so the
    ranks of a distributed encode writing into one directory do not lose each other's counts."""
    path = out / SIZES_FILE
    directory = os.open(out, os.O_RDONLY)  # the lock is on the directory: no lock file is left behind
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        known = json.loads(path.read_text()) if path.exists() else {}
        known.update(sizes)
        temporary = path.with_name(f".{SIZES_FILE}.{os.getpid()}")
        temporary.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
        os.replace(temporary, path)
    finally:
        os.close(directory)  # releases the lock


def brace_pattern(paths: list[str]) -> str:
    """The brace URL pattern covering consecutively numbered shards, e.g. out/train-{000000..000004}.tar."""
    if len(paths) <= 1:
        return paths[0] if paths else ""
    first, last = paths[0], paths[-1]
    head, tail = first[: -len("000000.tar")], ".tar"
    return f"{head}{{{first[len(head):-len(tail)]}..{last[len(head):-len(tail)]}}}{tail}"


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from brace patterns, globs (local paths: `data/val-*.tar`, sorted), '::'-separated strings or a list
    of any of them. A glob that matches nothing stays as it is, so the missing-shard error names it."""
    items = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u for item in items for u in wds_expand_urls(item)]
    return [m for u in expanded for m in (sorted(glob.glob(u)) if is_local(u) and glob.has_magic(u) else []) or [u]]


def is_local(url: str) -> bool:
    """Whether a shard URL is a plain file path (so it can be checked and scanned without streaming)."""
    return not url.startswith("pipe:") and "://" not in url


def count_samples(url: str, require_caption: bool = True, kind: str = "images") -> int:
    """Samples of a shard that have an image or latent (and a caption); from sizes.json beside it when present, else a
    scan."""
    if is_local(url):
        sizes = Path(url).parent / SIZES_FILE
        if sizes.exists() and require_caption:
            known = json.loads(sizes.read_text()).get(Path(url).name)
            if known is not None:
                return int(known)
    return _scan_count(url, require_caption, kind)


def _scan_count(url: str, require_caption: bool, kind: str) -> int:
    keys: dict[str, dict] = {}
    # Local tars are read by seeking from header to header; streams (pipe:, http) must be read through.
    mode, source = ("r:*", url) if is_local(url) else ("r|*", gopen(url))
    try:
        with tarfile.open(source, mode) if mode == "r:*" else tarfile.open(fileobj=source, mode=mode) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if member.isreg() and key is not None:
                    keys.setdefault(key, {})[ext.lower()] = True
    except (tarfile.TarError, OSError, EOFError):
        pass  # a truncated tail: count what is readable; the loader reports the error when it gets there
    finally:
        if not isinstance(source, str):
            source.close()
    return sum(has_payload_and_caption(v, require_caption, kind) for v in keys.values())


IMAGE_COLUMNS = ("file", "image", "filename", "path")
CAPTION_COLUMNS = ("caption", "text")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
"""Hugging Face imagefolder metadata: one per folder, `file_name` relative to that folder, other columns as features."""
METADATA_CAPTION_COLUMNS = ("text", "caption")

CaptionRows = list[tuple[str, str, dict]]
"""(image path relative to the images folder, caption, other columns) — what every caption source returns."""


def _read_table(path: Path) -> list[dict]:
    """Rows of a CSV with a header, or of a JSONL file (one object per line)."""
    if path.suffix.lower() not in (".jsonl", ".json"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exn:
                raise ValueError(f"{path} line {number} is not JSON ({exn.msg}); one object per line") from None
    return rows


def _caption_column(path: Path, columns: list[str], chosen: str | None, defaults: tuple[str, ...]) -> str | None:
    """The --caption-column when given (it must exist), else the first of `defaults` present, else None."""
    if chosen is not None and chosen not in columns:
        raise ValueError(f"{path} has no column {chosen!r} (from --caption-column); its columns: {columns}")
    return chosen if chosen is not None else next((c for c in defaults if c in columns), None)


def read_captions(captions_file: str | os.PathLike, caption_column: str | None = None) -> CaptionRows:
    """(image file, caption, other columns) rows of a CSV with a header or a JSONL file."""
    path = Path(captions_file)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path} (from --captions); give a CSV or JSONL file")
    rows = _read_table(path)
    columns = list(rows[0]) if rows else []
    image_col = next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = _caption_column(path, columns, caption_column, CAPTION_COLUMNS)
    if image_col is None or caption_col is None:
        raise ValueError(
            f"{path} has columns {columns}; need an image column ({'|'.join(IMAGE_COLUMNS)}) and a caption column"
            f" ({'|'.join(CAPTION_COLUMNS)}), e.g. a CSV header 'file,caption'"
        )
    extra = [c for c in columns if c not in (image_col, caption_col)]
    return [(str(r[image_col]), str(r[caption_col] or ""), {c: r.get(c) for c in extra}) for r in rows]


def _metadata_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("metadata.*") if p.name in METADATA_FILES and p.is_file())


def read_imagefolder(images_dir: str | os.PathLike, caption_column: str | None = None,
                     bad: list[BadFile] | None = None) -> CaptionRows:
    """(image file, caption, other columns) rows of the Hugging Face imagefolder metadata.jsonl/csv files in a folder;
    a row naming a missing image goes to `bad` when given, else raises."""
    root, rows = Path(images_dir), []
    for meta in _metadata_files(root):
        table = _read_table(meta)
        columns = list(table[0]) if table else []
        if "file_name" not in columns:
            raise ValueError(f"{meta} has columns {columns}; an imagefolder metadata file needs a file_name column"
                             " (image paths relative to its folder)")
        caption_col = _caption_column(meta, columns, caption_column, METADATA_CAPTION_COLUMNS)
        if caption_col is None:
            raise ValueError(f"{meta} has columns {columns} but no caption column (text|caption);"
                             " pass --caption-column NAME")
        extra = [c for c in columns if c not in ("file_name", caption_col)]
        for number, r in enumerate(table, 1):
            image = meta.parent / str(r.get("file_name"))
            if not image.is_file():
                problem = BadFile("image not found", image, f"row {number} of {meta}; file_name is relative to its folder")
                if bad is None:
                    raise FileNotFoundError(f"{problem.line()}: fix the name or drop the row")
                bad.append(problem)
                continue
            rows.append((os.path.relpath(image, root), str(r.get(caption_col) or ""), {c: r.get(c) for c in extra}))
    return rows


def read_sidecar_captions(images_dir: str | os.PathLike, bad: list[BadFile] | None = None) -> CaptionRows:
    """(image file, caption, {}) rows from the IMAGE.txt caption beside each image in a folder (kohya layout); an
    unreadable caption file goes to `bad` when given, else raises."""
    root, rows = Path(images_dir), []
    for image in _images(root):
        text = image.with_suffix(".txt")
        if text.is_file():
            try:
                rows.append((str(image.relative_to(root)), text.read_text(encoding="utf-8-sig").strip(), {}))
            except UnicodeDecodeError as exn:
                if bad is None:
                    raise ValueError(f"caption file is not UTF-8: {text} ({exn.reason}); re-save it as UTF-8") from None
                bad.append(BadFile("caption not UTF-8", image, f"{text.name}: {exn.reason}"))
    return rows


def _caption_rows(root: Path, captions_file: str | os.PathLike | None, caption_column: str | None,
                  bad: list[BadFile]) -> tuple:
    """Rows from --captions, else the folder's imagefolder metadata, else sidecar .txt; with their source and fix."""
    if captions_file is not None:
        return read_captions(captions_file, caption_column), str(captions_file), f"add rows for them to {captions_file}"
    if _metadata_files(root):
        return read_imagefolder(root, caption_column, bad), "its metadata.jsonl/csv", "add file_name rows for them"
    if caption_column is not None:
        raise ValueError(f"--caption-column {caption_column} given but {root} has no metadata.jsonl/csv"
                         " and no --captions file; drop it or add one")
    return read_sidecar_captions(root, bad), "sidecar .txt files", "add IMAGE.txt captions beside them or give --captions FILE"


def _images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())


@dataclass(frozen=True)
class BadFile:
    """An image (or a caption row) `from_folder` cannot make a sample of: what is wrong, the file, details."""

    kind: str
    """One of BAD_KINDS."""
    path: Path
    """The image: the one left out, or the one a caption row names that is not there."""
    detail: str = ""

    def line(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


BAD_KINDS = {  # kind -> (one, several, the fix; None: the caption source's own), in the order they are listed
    "unreadable image": ("unreadable image", "unreadable images", "re-save or remove them"),
    "no caption": ("image without a caption", "images without a caption", None),
    "caption not UTF-8": ("caption file not UTF-8", "caption files not UTF-8", "re-save them as UTF-8"),
    "image not found": ("caption row naming a missing image", "caption rows naming a missing image",
                        "fix the names or drop the rows"),
}


def count_bad(bad: Sequence[BadFile]) -> str:
    """'2 unreadable images, 1 image without a caption': how many of each kind."""
    counts = Counter(b.kind for b in bad)
    return ", ".join(f"{n} {BAD_KINDS[kind][0 if n == 1 else 1]}" for kind, n in counts.items())


class BadFolder(ValueError):
    """Every bad file of an image folder, found in one scan; `bad` lists them, the message counts them and names fixes."""

    def __init__(self, root: Path, bad: list[BadFile], good: int, caption_fix: str) -> None:
        self.bad, self.good = bad, good
        counts = Counter(b.kind for b in bad)
        kinds = [f"{count_bad([b for b in bad if b.kind == kind])} ({BAD_KINDS[kind][2] or caption_fix})" for kind in counts]
        rest = f"or pass --skip-bad to write the other {good} image{'s' * (good != 1)}" if good else "no image is left to write"
        super().__init__(f"{root} has {', '.join(kinds)}; {rest}")


def from_folder(
    images_dir: str | os.PathLike,
    captions_file: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    resize: int | None = None,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.0,
    empty_captions: bool = False,
    caption_column: str | None = None,
    skip_bad: bool = False,
) -> dict:
    """Turn a folder of images plus captions into train (and val) shards; returns url patterns and counts.

    Captions come from `captions_file` (CSV/JSONL) when given, else from Hugging Face imagefolder metadata.jsonl/csv
    files in the folder, else from IMAGE.txt files beside the images; `caption_column` overrides the caption column.
    Images are stored as they are unless `resize` is given (shorter side to `resize`, re-encoded in their format).
    The val split takes the samples whose key hashes into `val_fraction`, so it is stable when images are added.
    Every image is decoded before anything is written: unreadable images, images without a caption (unless
    `empty_captions`) and caption rows naming no image raise one BadFolder listing them all, or with `skip_bad` are
    left out and listed in the result's "skipped". Counts of written samples with a blank caption: "empty_captions"
    (an empty caption file or cell: stored as unconditional samples), "uncaptioned" (none, kept by `empty_captions`).
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (from --images)")
    bad: list[BadFile] = []
    rows, source, fix = _caption_rows(root, captions_file, caption_column, bad)
    captions = {}
    for number, (name, caption, extra) in enumerate(rows, 1):
        if (root / name).is_file():
            captions[(root / name).resolve()] = (caption, extra)
        else:
            bad.append(BadFile("image not found", root / name, f"row {number} of {source}"))
    images = _images(root)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root} (from --images)")
    known_bad = {b.path.resolve() for b in bad}
    uncaptioned = [p for p in images if p.resolve() not in captions and p.resolve() not in known_bad]
    if not empty_captions:
        bad += [BadFile("no caption", p, f"none in {source}") for p in uncaptioned]
    bad += [problem for p in tqdm(images, desc="checking images", unit="img") if (problem := _unreadable(p))]
    bad.sort(key=lambda b: (list(BAD_KINDS).index(b.kind), b.path))
    known_bad = {b.path.resolve() for b in bad}
    good = [p for p in images if p.resolve() not in known_bad]
    if (bad and not skip_bad) or not good:
        raise BadFolder(root, bad, len(good), f"{fix}, or pass --empty-captions")
    samples = {"train": [], "val": []}
    for path in good:
        key = _key(path.relative_to(root))
        split = "val" if zlib.crc32(key.encode()) % 10_000 < val_fraction * 10_000 else "train"
        samples[split].append((key, path))
    blank = [p for p in good if not captions.get(p.resolve(), ("",))[0].strip()]  # no caption, or an empty one
    result: dict = {"skipped": bad, "uncaptioned": len(set(blank) & set(uncaptioned)),
                    "empty_captions": len(set(blank) - set(uncaptioned))}
    with tqdm(total=len(good), desc="writing shards", unit="img") as progress:
        for split, items in samples.items():
            if not items:
                continue
            encoded = (_folder_sample(key, path, root, captions, resize, progress) for key, path in items)
            written = write_shards(encoded, out_dir, split, samples_per_shard)
            result[f"{split}_urls"] = brace_pattern([p for p, _ in written])
            result[f"num_{split}"] = len(items)
    return result


def _key(relative: Path) -> str:
    """Sample key from a relative path; WebDataset keys may not contain dots (the extension starts at the first)."""
    return str(relative.with_suffix("")).replace(os.sep, "__").replace(".", "_")


def _unreadable(path: Path) -> BadFile | None:
    """The problem of an image PIL cannot decode to the end (truncated, not an image), else None."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exn:
        return BadFile("unreadable image", path, f"{type(exn).__name__}: {str(exn).replace(f' {str(path)!r}', '')}")
    return None


def _folder_sample(key: str, path: Path, root: Path, captions: dict, resize: int | None, progress: tqdm) -> dict:
    caption, extra = captions.get(path.resolve(), ("", {}))
    data = path.read_bytes()
    ext = path.suffix.lower().lstrip(".")
    try:
        with Image.open(io.BytesIO(data)) as image:  # decoded once by _unreadable already: here only to resize
            size = image.size
            if resize is not None:
                image = image.convert("RGB")
                scale = resize / min(size)
                image = image.resize((round(size[0] * scale), round(size[1] * scale)), Image.Resampling.LANCZOS)
                size = image.size
                buffer = io.BytesIO()
                fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
                image.save(buffer, format=fmt, **({"quality": 95} if fmt != "PNG" else {}))
                data = buffer.getvalue()
    except Exception as exn:  # changed since the check
        raise ValueError(f"unreadable image: {path} ({type(exn).__name__}: {exn}); re-save or remove it") from None
    progress.update()
    meta = {"source": str(path.relative_to(root)), "width": size[0], "height": size[1], **extra}
    return {"__key__": key, ext: data, "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}


def inspect_shards(urls: str | list[str], require_caption: bool = True) -> dict:
    """Decode every sample of the shards: counts, image sizes, caption lengths and every unusable entry."""
    report: dict = {"shards": {}, "sizes": Counter(), "latent_shapes": Counter(), "caption_chars": [], "unreadable": [],
                    "ignored": Counter()}
    for url in tqdm(expand_urls(urls), desc="reading shards", unit="shard"):
        count, key = 0, "-"
        try:
            for sample in read_shard(url, everything=True):
                key = sample["__key__"]
                report["ignored"].update(e for e in sample if e != "__key__" and e not in KNOWN_MEMBERS)
                problem = _sample_problem(sample, require_caption, report)
                if problem:
                    report["unreadable"].append(f"{url}: {key}: {problem}")
                else:
                    count += 1
        except Exception as exn:
            report["unreadable"].append(f"{url}: after {key}: unreadable tar ({type(exn).__name__}: {exn})")
        report["shards"][url] = count
    report["num_samples"] = sum(report["shards"].values())
    return report


KNOWN_MEMBERS = (*IMAGE_EXTENSIONS, LATENT_MEMBER, TEXT_MEMBER, "txt", "json")


def _sample_problem(sample: dict, require_caption: bool, report: dict) -> str:
    if (oversized := oversized_problem(sample)) is not None:
        return f"{oversized[0]}: {oversized[1]}"
    if LATENT_MEMBER in sample:  # a latent shard (genart shards encode)
        try:
            report["latent_shapes"][tuple(load_array(sample[LATENT_MEMBER]).shape)] += 1
            if TEXT_MEMBER in sample:
                load_text(sample[TEXT_MEMBER])
        except Exception as exn:
            return f"corrupt latent: {type(exn).__name__}: {exn}"
        report["caption_chars"].append(len(sample.get("txt", b"").decode("utf-8", "replace").strip()))
        return "" if "txt" in sample or not require_caption else "no caption"
    if not has_payload_and_caption(sample, require_caption):
        return "no image" if not has_payload_and_caption(sample, False) else "no caption"
    ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
    try:
        with open_image(sample[ext], MAX_IMAGE_PIXELS) as image:
            image.load()
            report["sizes"][image.size] += 1
        report["caption_chars"].append(len(sample.get("txt", b"").decode("utf-8").strip()))
    except Exception as exn:
        return f"{type(exn).__name__}: {exn}"
    return ""


def format_report(report: dict) -> str:
    """Human-readable summary of `inspect_shards`."""
    lines = [f"{len(report['shards'])} shards, {report['num_samples']} usable samples"]
    if report["sizes"]:
        widths = [w for (w, _), n in report["sizes"].items() for _ in range(n)]
        heights = [h for (_, h), n in report["sizes"].items() for _ in range(n)]
        common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in report["sizes"].most_common(3))
        lines.append(f"image width {min(widths)}..{max(widths)}, height {min(heights)}..{max(heights)}; most common: {common}")
    if report["latent_shapes"]:
        lines.append("latents: " + ", ".join(f"{'x'.join(map(str, shape))} ({n})"
                                             for shape, n in report["latent_shapes"].most_common(3)))
    if report["caption_chars"]:
        chars = report["caption_chars"]
        empty = sum(c == 0 for c in chars)
        lines.append(
            f"caption length (chars) min {min(chars)}, median {statistics.median(chars):g}, mean {statistics.mean(chars):.1f},"
            f" max {max(chars)}; {empty} empty"
        )
    if report["ignored"]:
        lines.append("ignored members (never decoded): " + ", ".join(f".{e} x{n}" for e, n in report["ignored"].items()))
    lines.append(f"{len(report['unreadable'])} unreadable entries" + (":" if report["unreadable"] else ""))
    lines.extend("  " + entry for entry in report["unreadable"])
    return "\n".join(lines)


def scan_buckets(url: str, buckets: Sequence[tuple[int, int]], require_caption: bool, max_member_bytes: int,
                 max_image_pixels: int) -> list[tuple[str, int | None]]:
    """(key, bucket) of every sample of a shard that the loader would read, in shard order, from the image headers
    (nothing is decoded); None where the header is unreadable (the loader then counts it as a corrupt image)."""
    out: list[tuple[str, int | None]] = []
    try:
        for sample in read_shard(url, max_member_bytes=max_member_bytes):
            if oversized_problem(sample) is not None or not has_payload_and_caption(sample, require_caption):
                continue
            ext = next(e for e in IMAGE_EXTENSIONS if e in sample)
            try:
                with open_image(sample[ext], max_image_pixels) as image:
                    bucket = nearest_bucket(image.height, image.width, buckets)
            except Exception:
                bucket = None
            out.append((sample["__key__"], bucket))
    except Exception:
        pass  # a truncated tail: what was readable; the loader reports the error when it gets there
    return out


def bucket_histogram(urls: list[str], spec: str | Sequence[Sequence[int]], image_size: int, step: int,
                     require_caption: bool = True) -> dict[tuple[int, int], int]:
    """Samples per bucket over `urls`, as the datamodule would deal them (what `genart shards info --buckets` shows)."""
    sizes = parse_buckets(spec, image_size, step)
    of = {url: dict(scan_buckets(url, sizes, require_caption, MAX_MEMBER_BYTES, MAX_IMAGE_PIXELS)) for url in urls}
    return Bucketing(sizes, of).histogram()

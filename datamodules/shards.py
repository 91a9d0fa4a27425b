"""Write WebDataset shards (img2dataset layout) from any sample stream, and inspect existing shards."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import webdataset as wds

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
            # Fixed mtime/owner/mode: the same samples give the same tar bytes.
            writer = wds.TarWriter(str(path), encoder=False, mtime=0.0, user="genart", group="genart", mode=0o644)
            written.append((str(path), 0))
            count = 0
        writer.write(sample)
        count += 1
    close()
    _record_sizes(out, {Path(p).name: n for p, n in written})
    return written


def _record_sizes(out: Path, sizes: dict[str, int]) -> None:
    """Merge shard counts into out/sizes.json (other splits in the same directory keep theirs)."""
    path = out / SIZES_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    known.update(sizes)
    path.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")


def brace_pattern(paths: list[str]) -> str:
    """The brace URL pattern covering consecutively numbered shards, e.g. out/train-{000000..000004}.tar."""
    if len(paths) <= 1:
        return paths[0] if paths else ""
    first, last = paths[0], paths[-1]
    head, tail = first[: -len("000000.tar")], ".tar"
    return f"{head}{{{first[len(head):-len(tail)]}..{last[len(head):-len(tail)]}}}{tail}"


def expand_urls(urls: str | list[str]) -> list[str]:
    """Shard URLs from a brace pattern, a '::'-separated string or a list of either."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = [urls] if isinstance(urls, str) else list(urls)
    return [u for item in items for u in wds_expand(item)]


def is_local(url: str) -> bool:
    """Whether a shard URL is a plain file path (so it can be checked and scanned without streaming)."""
    return not url.startswith("pipe:") and "://" not in url


def count_samples(url: str, require_caption: bool = True) -> int:
    """Samples of a shard that have an image (and a caption); from sizes.json beside it when present, else a scan."""
    if is_local(url):
        sizes = Path(url).parent / SIZES_FILE
        if sizes.exists() and require_caption:
            known = json.loads(sizes.read_text()).get(Path(url).name)
            if known is not None:
                return int(known)
    return _scan_count(url, require_caption)


def _scan_count(url: str, require_caption: bool) -> int:
    import tarfile

    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext

    from datamodules.stream import has_image_and_caption

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
    return sum(has_image_and_caption(v, require_caption) for v in keys.values())

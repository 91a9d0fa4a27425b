"""Shards are untrusted: mutated archives end in a counted problem within bounded time and memory, in `shards info`
and in the training stream alike; oversized members and pixel bombs are refused before they are held or decoded."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, add_member
from PIL import Image

from datamodules.shards import inspect_shards
from datamodules.stream import ShardStream, StreamConfig, Transform
from datamodules.synthetic import write_shapes_shards
from datamodules.tarstream import BLOCK, Oversized, TarError, tar_members


def base_shard(tmp_path: Path) -> bytes:
    write_shapes_shards(tmp_path / "base", 12, image_size=16, seed=0, samples_per_shard=12)
    return next((tmp_path / "base").glob("train-*.tar")).read_bytes()


def tar_of(members: list[tuple[str, bytes]], pax: dict | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data, pax)
    return out.getvalue()


def with_size_field(data: bytes, block_index: int, size: int) -> bytes:
    """Set the size field of the header at `block_index` to `size` in GNU base-256 and fix its checksum."""
    block = bytearray(data[block_index * BLOCK:(block_index + 1) * BLOCK])
    block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return data[:block_index * BLOCK] + bytes(block) + data[(block_index + 1) * BLOCK:]


def header_blocks(data: bytes) -> list[int]:
    """Indices of the header blocks of an uncompressed tar."""
    blocks, i = [], 0
    while i * BLOCK < len(data) and data[i * BLOCK:(i + 1) * BLOCK] != bytes(BLOCK):
        blocks.append(i)
        size = int(data[i * BLOCK + 124:i * BLOCK + 136].split(b"\0")[0].strip() or b"0", 8)
        i += 1 + -(-size // BLOCK)
    return blocks


def mutations(shard: bytes, count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    headers = header_blocks(shard)
    out = [("random bytes", rng.randbytes(rng.randrange(1, 4 * BLOCK))) for _ in range(10)]
    out += [("size 2**33", with_size_field(shard, h, 2**33)) for h in headers[:5]]
    out += [("size 2**40", with_size_field(shard, h, 2**40)) for h in headers[5:10]]
    endless_pax = b"".join(tar_of([("x.txt", b"")], {"comment": "a" * 2000})[:3 * BLOCK] for _ in range(300))
    out += [("endless PAX", endless_pax), ("PAX size 2**40", tar_of([("k.txt", b"hi")], {"size": str(2**40)})),
            ("PAX header over the cap", with_size_field(tar_of([("k.txt", b"hi")], {"comment": "x"}), 0, 2**21))]
    while len(out) < count:
        kind = rng.choice(["flip header", "flip data", "cut tail"])
        data = bytearray(shard)
        if kind == "flip header":
            start = rng.choice(headers) * BLOCK
            for _ in range(rng.randrange(1, 8)):
                data[start + rng.randrange(BLOCK)] = rng.randrange(256)
        elif kind == "flip data":
            for _ in range(rng.randrange(1, 32)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            del data[rng.randrange(1, len(data)):]  # a cut in padding or between members is just a shorter archive
        out.append((kind, bytes(data)))
    return out


FUZZ = textwrap.dedent("""
    import json, resource, sys, time
    from datamodules.shards import inspect_shards
    from datamodules.stream import ShardStream, StreamConfig, Transform
    paths = json.load(open(sys.argv[1]))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + 768 * 2**20, hard))  # 768 MiB over what the imports took
    results = []
    for path in paths:
        start = time.perf_counter()
        report = inspect_shards([path])
        config = StreamConfig(urls=[path], stage="val", mode="exact", batch_size=4, transform=Transform(16, True, True, False),
                              rank=0, world_size=1, num_workers=0, seed=0, epoch=0, require_caption=True, strict=False,
                              shuffle_buffer=1)
        batches = list(ShardStream(config))
        samples = sum(len(b["key"]) for b in batches if "key" in b)
        counts = batches[-1]["__skipped__"][0]
        results.append({"path": path, "info_ok": report["num_samples"], "info_problems": len(report["unreadable"]),
                        "train_ok": samples, "train_problems": sum(counts.values()), "reasons": sorted(counts),
                        "seconds": time.perf_counter() - start})
    print(json.dumps(results))
""")


@pytest.mark.timeout(600)
def test_mutated_shards_end_in_a_counted_problem_within_bounded_time_and_memory(tmp_path):
    shard = base_shard(tmp_path)
    cases = mutations(shard, 240)
    paths = []
    for i, (_, data) in enumerate(cases):
        path = tmp_path / f"mutated-{i:04d}.tar"
        path.write_bytes(data)
        paths.append(str(path))
    (tmp_path / "paths.json").write_text(json.dumps(paths))
    run = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path / "paths.json")], cwd=REPO, capture_output=True,
                         text=True, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for (kind, _), r in zip(cases, results, strict=True):
        assert r["seconds"] < 10, (kind, r)
        assert r["info_ok"] == r["train_ok"], (kind, r)  # both paths keep the same samples
        assert (r["info_problems"] > 0) == (r["train_problems"] > 0), (kind, r)  # and both count a problem, or neither
    hostile = [r for (kind, _), r in zip(cases, results, strict=True) if kind.startswith(("random", "size", "endless", "PAX"))]
    assert all(r["train_problems"] > 0 for r in hostile), hostile
    print(f"{len(cases)} mutated shards; {sum(r['train_problems'] > 0 for r in results)} with counted problems; "
          f"slowest {max(r['seconds'] for r in results):.2f} s")


def test_an_oversized_member_is_skipped_and_counted_never_held(tmp_path):
    members = [("a.txt", b"caption"), ("a.png", b"x" * 5000), ("b.txt", b"fine"), ("b.png", b"y" * 10)]
    got = list(tar_members(io.BytesIO(tar_of(members)), lambda n: n, max_member_bytes=4096))
    assert got == [("a.txt", b"caption"), ("a.png", Oversized(5000, 4096)), ("b.txt", b"fine"), ("b.png", b"y" * 10)]
    with pytest.raises(TarError, match="truncated member"):
        list(tar_members(io.BytesIO(with_size_field(tar_of(members), 0, 2**40)), lambda n: n))


def test_a_pixel_bomb_is_refused_from_its_header(tmp_path):
    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, format="PNG")  # 81 Mpx of zeros: a few hundred KB compressed
    path = tmp_path / "bomb.tar"
    path.write_bytes(tar_of([("k.png", big.getvalue()), ("k.txt", b"a bomb")]))
    report = inspect_shards([str(path)])
    assert report["num_samples"] == 0 and "over max_image_pixels=67108864" in report["unreadable"][0]
    config = StreamConfig(urls=[str(path)], stage="val", mode="exact", batch_size=1, transform=Transform(16, True, True, False),
                          rank=0, world_size=1, num_workers=0, seed=0, epoch=0, require_caption=True, strict=False,
                          shuffle_buffer=1)
    counts = list(ShardStream(config))[-1]["__skipped__"][0]
    assert counts == {"corrupt image": 1}

"""The shard tar reader agrees with Python's tarfile on every tar flavour writers produce, and fails on broken ones."""

from __future__ import annotations

import io
import tarfile

import pytest

from datamodules.stream import read_shard
from datamodules.tarstream import TarError, tar_members

LONG = "deep/" * 30 + "sample000001.png"  # 166 characters: needs ustar's prefix field, a PAX or a GNU header


def _tar(fmt: int, compression: str = "", mtime: float = 0) -> bytes:
    """An archive with short, long and non-ASCII names, a directory, a symlink and an empty file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}", format=fmt) as tar:
        tar.addfile(_info("data", tarfile.DIRTYPE, 0, mtime))
        for name, data in [("a.png", b"x" * 700), (LONG, b"long"), ("data/Ünïcode.txt", "é".encode()),
                           ("empty.txt", b""), ("b.json", b"{}" * 300)]:
            tar.addfile(_info(name, tarfile.REGTYPE, len(data), mtime), io.BytesIO(data))
        link = _info("link.png", tarfile.SYMTYPE, 0, mtime)
        link.linkname = "a.png"
        tar.addfile(link)
    return buffer.getvalue()


def _info(name: str, kind: bytes, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, mtime
    return info


def _ours(data: bytes, select=lambda name: name) -> list[tuple[str, bytes]]:
    return list(tar_members(io.BytesIO(data), select))


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    data = _tar(fmt, mtime=0.5)  # in PAX format a float mtime gives every member a PAX header, as webdataset's writer
    members = _ours(data)
    assert members == _reference(data)
    assert [n for n, _ in members][1] == LONG and len(members) == 5


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_archives(compression):
    data = _tar(tarfile.PAX_FORMAT, compression)
    assert _ours(data) == _reference(data)


def test_select_skips_members_and_maps_names():
    data = _tar(tarfile.PAX_FORMAT)
    assert _ours(data, lambda name: name.upper() if name.endswith(".png") else None) == [
        ("A.PNG", b"x" * 700), (LONG.upper(), b"long")]


class _Trickle:
    """A stream that returns at most 100 bytes per read, as sockets and pipes may."""

    def __init__(self, data: bytes):
        self.data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self.data.read(min(size, 100) if size >= 0 else 100)


@pytest.mark.parametrize("compression", ["", "gz"])
def test_short_reads(compression):
    data = _tar(tarfile.PAX_FORMAT, compression)
    assert list(tar_members(_Trickle(data), lambda name: name)) == _reference(data)


def test_pipe_urls_read_like_files(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for key in ("a", "b"):
            for ext, data in (("png", b"image " + key.encode()), ("txt", b"caption"), ("pyd", b"never read")):
                tar.addfile(_info(f"{key}.{ext}", tarfile.REGTYPE, len(data), 0), io.BytesIO(data))
    expected = [{"__key__": k, "png": b"image " + k.encode(), "txt": b"caption"} for k in ("a", "b")]
    assert list(read_shard(str(path))) == expected
    assert list(read_shard(f"pipe:cat {path}")) == expected


def test_broken_archives_raise():
    data = _tar(tarfile.PAX_FORMAT)
    with pytest.raises(TarError, match="empty file"):
        _ours(b"")
    with pytest.raises(TarError, match="truncated member"):
        _ours(data[: 512 * 2 + 100])  # the directory's and a.png's headers, then the cut inside its contents
    with pytest.raises(TarError, match="truncated header"):
        _ours(data[: 512 + 100])
    with pytest.raises(TarError, match="not a tar archive"):
        _ours(b"this is not a tar archive" * 40)
    corrupt = bytearray(data)
    corrupt[10] ^= 1  # a flipped bit in the first header's name
    with pytest.raises(TarError, match="checksum"):
        _ours(bytes(corrupt))

"""Streaming tar reader for shards, several times faster than `tarfile` on archives of small members.

Why: a shard of small images is mostly headers. Python's tarfile parses every header field by field (and
webdataset's writer gives each member an extra PAX header), which costs ~4x the PNG decode of a 32px image. Here a
header is a few slices of one 512-byte block. Reads ustar, PAX (path and size records) and GNU long-name archives,
plain or gzip/bzip2/xz compressed, from any object with `read` (local files and `pipe:` streams alike).

Shards are untrusted input: a member over `max_member_bytes` is read past in chunks and stands as `Oversized`
(never allocated), PAX and GNU long-name headers are capped at MAX_HEADER_BYTES, and every malformed archive ends
in a TarError after at most one pass over its bytes.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

T = TypeVar("T")

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
DECOMPRESSORS = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
REGULAR = frozenset(b"0\x007")
NO_DATA = frozenset(b"123456")
"""Links, devices, directories and fifos: their size field does not announce data blocks."""
PAX, GNU_LONG_NAME = ord("x"), ord("L")
MAX_MEMBER_BYTES = 64 * 2**20
"""Default cap on a member read into memory (the largest web image is far smaller)."""
MAX_HEADER_BYTES = 2**20
"""Cap on a PAX or GNU long-name header's data: real ones are a few hundred bytes."""
SKIP_CHUNK = 2**20
_SIGNED_BYTES = struct.Struct("148b8x356b")


class TarError(ValueError):
    """The stream is not a tar archive, or it ends inside a member."""


@dataclass(frozen=True)
class Oversized:
    """In place of the contents of a member larger than the cap, which were read past, not kept."""

    size: int
    limit: int


def tar_members(
    stream: BinaryIO, select: Callable[[str], T | None], max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[T, bytes | Oversized]]:
    """(select(name), contents) of every regular file whose `select` is not None; other members are read past.

    A selected member over `max_member_bytes` yields `Oversized` instead of its contents.
    """
    stream, block = _open(stream)
    if not block:
        raise TarError("empty file")
    pending: dict[str, str] = {}  # path/size from a PAX or GNU long-name header, for the next member
    while block and block != ZERO_BLOCK:
        if len(block) < BLOCK:
            raise TarError(f"truncated header ({len(block)} of {BLOCK} bytes)")
        name, size, kind = _parse_header(block)
        if kind in (PAX, GNU_LONG_NAME) and size > MAX_HEADER_BYTES:
            raise TarError(f"{'PAX' if kind == PAX else 'GNU long-name'} header of {size} bytes (the cap is {MAX_HEADER_BYTES})")
        if kind == PAX:
            pending.update(_pax_records(_read_data(stream, size)))
        elif kind == GNU_LONG_NAME:
            pending["path"] = _cstring(_read_data(stream, size))
        else:
            name, size = pending.get("path", name), _pax_size(pending.get("size"), size)
            pending = {}
            selected = select(name) if kind in REGULAR else None
            if selected is not None and size <= max_member_bytes:
                yield selected, _read_data(stream, size)
            elif selected is not None:
                _skip_data(stream, size)
                yield selected, Oversized(size, max_member_bytes)
            elif kind not in NO_DATA:
                _skip_data(stream, size)  # read, not seek: a member cut short must show as a truncated archive
        block = _read_up_to(stream, BLOCK)
    if not block:  # every tar writer ends with zero blocks: a stream that just stops was cut (a killed writer)
        raise TarError("archive ends without its end-of-archive blocks (truncated)")


def _open(stream: BinaryIO) -> tuple[BinaryIO, bytes]:
    """The stream to parse and its first block; compression is recognised from the first bytes, as tar does."""
    head = _read_up_to(stream, BLOCK)
    for magic, decompressor in DECOMPRESSORS:
        if head.startswith(magic):
            plain = decompressor(_Prefixed(head, stream))
            return plain, _read_up_to(plain, BLOCK)
    return stream, head


def _parse_header(block: bytes) -> tuple[str, int, int]:
    """(name, size, type byte) of a header block, after checking its checksum."""
    try:
        stored = _number(block[148:156])
        size = _number(block[124:136])
    except ValueError:
        raise TarError("invalid header (not a tar archive, or corrupt)") from None
    unsigned = sum(block) - sum(block[148:156]) + 256
    if stored != unsigned and stored != sum(_SIGNED_BYTES.unpack(block)) + 256:  # old tars summed signed bytes
        raise TarError("bad header checksum (not a tar archive, or corrupt)")
    name = _cstring(block[:100])
    if block[257:263] == b"ustar\x00" and block[345]:  # POSIX ustar: long paths are split into prefix/name
        name = _cstring(block[345:500]) + "/" + name
    return name, size, block[156]


def _number(field: bytes) -> int:
    """Octal number field, or GNU base-256 (first byte 0x80) for values too large for octal."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    if digits and not digits.isdigit():
        raise ValueError(f"not an octal number: {digits!r}")
    return int(digits, 8) if digits else 0


def _cstring(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """The path and size records of a PAX header ("LEN key=value\\n" each, LEN counting the whole record)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length <= space - pos:
            raise TarError("invalid PAX header")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if key in (b"path", b"size"):
            records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _pax_size(record: str | None, header_size: int) -> int:
    if record is None:
        return header_size
    if not record.isdigit():
        raise TarError(f"invalid PAX size record {record[:20]!r}")
    return int(record)


def _skip_data(stream: BinaryIO, size: int) -> None:
    """Read past a member and its padding in bounded chunks (a size field may claim terabytes)."""
    left = -(-size // BLOCK) * BLOCK
    while left > 0:
        got = len(stream.read(min(left, SKIP_CHUNK)))
        if not got:
            if left > -(-size // BLOCK) * BLOCK - size:  # only padding may be missing at the very end
                raise TarError(f"truncated member (claims {size} bytes)")
            return
        left -= got


def _read_data(stream: BinaryIO, size: int) -> bytes:
    """A member's contents, consuming its padding to the next block (missing padding at the very end is fine)."""
    data = _read_up_to(stream, -(-size // BLOCK) * BLOCK)
    if len(data) < size:
        raise TarError(f"truncated member ({len(data)} of {size} bytes)")
    return data[:size] if len(data) != size else data


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """`size` bytes, fewer only at the end of the stream (raw streams, e.g. sockets, may return less per read)."""
    data = stream.read(size)
    while 0 < len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


class _Prefixed:
    """`head` followed by the rest of `stream`: the decompressor must also read the bytes that revealed it."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:size], self.head[size:]
        return out

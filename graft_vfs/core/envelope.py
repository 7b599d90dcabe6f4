"""The checksummed envelope of every metadata object the server writes, and field checks.

Layout (integers big-endian)::

    b"GRFM" | kind (4 bytes: the object type and its version) | u32 body length | body
    | u32 crc32(everything before)

The checksum covers the whole encoded object, header included, and is checked before
anything is decoded; a compressed body is decompressed only after it passed. Then
``Fields`` checks the type and range of every decoded field, so a damaged or edited
object is ``CorruptData``, never data.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TypeAlias, TypeGuard

import msgpack
import zstandard

from graft_vfs.core.errors import CorruptData

MAGIC = b"GRFM"
# Kinds an older format wrote, and the kind that replaced each: refused with a message
# that says how to move the data, not as damage.
RETIRED_KINDS = {b"LOG2": b"LOG3", b"CKP2": b"CKP3"}
_HEADER = struct.Struct(">4s4sI")
_CRC = struct.Struct(">I")
ZSTD_LEVEL = 3
# A decompressed body larger than this is damage (a checkpoint of MAX_PAGES pages
# would be far larger, but no store holds one: 8 TiB of pages).
MAX_BODY = 1 << 31

# What ``pack`` seals: the values msgpack encodes, nested in lists and string-keyed maps.
Packable: TypeAlias = (
    "None | bool | int | float | str | bytes | Sequence[Packable] | Mapping[str, Packable]"
)


def seal(kind: bytes, body: bytes) -> bytes:
    """``body`` in the envelope of type ``kind`` (4 bytes)."""
    assert len(kind) == 4
    head = _HEADER.pack(MAGIC, kind, len(body)) + body
    return head + _CRC.pack(zlib.crc32(head))


def unseal(kind: bytes, data: bytes, what: str) -> bytes:
    """The body of a sealed object of type ``kind``; CorruptData unless every check passes."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(MAGIC):
        raise CorruptData(
            f"{what} is not a checksummed graft object (damaged, or written by a graft server "
            "from before metadata checksums): export the volume with the server that wrote "
            "it and import it into an empty store"
        )
    if len(data) < _HEADER.size + _CRC.size:
        raise CorruptData(f"{what} is truncated")
    _, found, length = _HEADER.unpack_from(data)
    if found in RETIRED_KINDS and kind == RETIRED_KINDS[found]:
        raise CorruptData(
            f"{what} was written by a graft server from before frame checksums bound their "
            "page (segment format 1): export the volume with the server that wrote it and "
            "import it into an empty store"
        )
    if found != kind:
        raise CorruptData(f"{what} is a {found!r} object, expected {kind!r}")
    if length != len(data) - _HEADER.size - _CRC.size:
        framing = _HEADER.size + _CRC.size
        raise CorruptData(f"{what} has {len(data)} bytes, its header says {length} + {framing}")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[: -_CRC.size]) != crc:
        raise CorruptData(f"{what} fails its checksum")
    return bytes(data[_HEADER.size : -_CRC.size])


def pack(kind: bytes, fields: Mapping[str, Packable], *, compress: bool = False) -> bytes:
    """A msgpack map, optionally zstd-compressed, sealed as ``kind``."""
    body: bytes = msgpack.packb(fields)
    if compress:
        body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(body)
    return seal(kind, body)


def unpack(kind: bytes, data: bytes, what: str, *, compressed: bool = False) -> Fields:
    """The checked fields of an object made by ``pack``."""
    body = unseal(kind, data, what)
    try:
        if compressed:
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY)
        d: object = msgpack.unpackb(body, strict_map_key=False)
    except Exception as exc:  # zstd and msgpack raise many types for bad input
        raise CorruptData(f"{what} is unreadable: {type(exc).__name__}") from exc
    if not isinstance(d, dict):
        raise CorruptData(f"{what} is not a map")
    return Fields(d, what)


class Fields:
    """Typed, range-checked access to a decoded map; every failure is CorruptData."""

    def __init__(self, d: Mapping[object, object], what: str) -> None:
        self.d = d
        self.what = what

    def bad(self, name: str, why: str) -> CorruptData:
        return CorruptData(f"{self.what}: field {name!r} {why}")

    def get(self, name: str) -> object:
        if name not in self.d:
            raise self.bad(name, "is missing")
        return self.d[name]

    def integer(self, name: str, low: int, high: int) -> int:
        return check_int(self.get(name), low, high, lambda why: self.bad(name, why))

    def blob(self, name: str, size: int) -> bytes:
        value = self.get(name)
        if not isinstance(value, bytes) or len(value) != size:
            raise self.bad(name, f"is not {size} bytes")
        return value

    def text(self, name: str, check: Callable[[str], str] | None = None) -> str:
        value = self.get(name)
        if not isinstance(value, str):
            raise self.bad(name, "is not a string")
        if check is not None:
            try:
                check(value)
            except ValueError as exc:
                raise self.bad(name, f"is invalid: {exc}") from None
        return value

    def number(self, name: str) -> float:
        value = self.get(name)
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise self.bad(name, "is not a finite, non-negative number")
        return float(value)

    def sequence(self, name: str) -> list[object]:
        value = self.get(name)
        if not isinstance(value, list):
            raise self.bad(name, "is not a list")
        return value

    def mapping(self, name: str) -> dict[object, object]:
        value = self.get(name)
        if not isinstance(value, dict):
            raise self.bad(name, "is not a map")
        return value


def is_number(value: object) -> TypeGuard[float]:
    """An int or a float, not a bool (msgpack turns true into True, an int subclass)."""
    return type(value) is int or type(value) is float


def check_int(value: object, low: int, high: int, error: Callable[[str], Exception]) -> int:
    # bool is an int subclass, and msgpack turns true into True: refuse it explicitly.
    if type(value) is not int or not low <= value <= high:
        raise error(f"is not an integer in [{low}, {high}]")
    return value

"""Just enough of SQLite's B-tree page format to find interior pages and their children.

A page's header starts at byte 0 (byte 100 on page 1, after the database header).
Its first byte is the page type; interior pages (2: index, 5: table) hold a cell
pointer array whose cells each start with a 4-byte left child page number, and a
right-most child pointer at header offset 8. Page numbers are 1-based in SQLite and
0-based here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Union

from graft_vfs.core.errors import CorruptData

INTERIOR_INDEX = 2
INTERIOR_TABLE = 5
LEAF_INDEX = 10
LEAF_TABLE = 13
INTERIOR = (INTERIOR_INDEX, INTERIOR_TABLE)


_u32 = struct.Struct(">I").unpack_from


def header_offset(pageno: int) -> int:
    return 100 if pageno == 0 else 0


def is_interior(data: bytes, pageno: int) -> bool:
    off = header_offset(pageno)
    return len(data) > off and data[off] in INTERIOR


def interior_children(data: bytes, pageno: int) -> list[int]:
    """The 0-based child pages of an interior page; [] for any other (or damaged) page."""
    off = header_offset(pageno)
    if len(data) < off + 12 or data[off] not in INTERIOR:
        return []
    ncells, _, _, right = struct.unpack_from(">HHBI", data, off + 3)
    ptrs = off + 12
    if ptrs + 2 * ncells > len(data):
        return []
    cells = struct.unpack_from(f">{ncells}H", data, ptrs)
    if cells and max(cells) + 4 > len(data):
        return []
    children = [_u32(data, cell)[0] - 1 for cell in cells]
    children.append(right - 1)
    return [c for c in children if c >= 0]


# -- cells, records and the schema (SQLite's file format, every offset bounded) ---------
#
# Everything below reads pages SQLite wrote, but a damaged page (or a malicious server,
# were the checksums to pass) must never make it loop or read out of bounds: every
# offset is checked against the page, every overflow chain against the payload size it
# carries, every tree walk against a depth and a set of pages seen. Anything out of
# bounds raises CorruptData.

LEAVES = (LEAF_INDEX, LEAF_TABLE)
KINDS = (*INTERIOR, *LEAVES)
MAX_DEPTH = 40  # a 4 KiB-page B-tree of 2**32 pages is under 20 levels deep
MAX_PAYLOAD = 1 << 31  # SQLite's own limit on a record (SQLITE_MAX_LENGTH is below it)
SCHEMA_ROOT = 0  # sqlite_schema's B-tree starts on page 1 (0 here)
ENCODINGS = {1: "utf-8", 2: "utf-16-le", 3: "utf-16-be"}

PageReader = Callable[[int], bytes]


def _corrupt(pageno: int, why: str) -> CorruptData:
    return CorruptData(f"page {pageno} is not a valid SQLite B-tree page: {why}")


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """SQLite's varint at ``buf[pos:end]``: ``(value, position after it)``.

    Raises ValueError if it runs past ``end``.
    """
    value = 0
    for i in range(9):
        if pos >= end:
            raise ValueError("a varint runs past its bounds")
        byte = buf[pos]
        pos += 1
        if i == 8:
            return (value << 8) | byte, pos
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, pos
    raise AssertionError("unreachable")


def usable_size(page1: bytes) -> int:
    """The bytes of each page SQLite uses (the page size less the reserved bytes)."""
    if len(page1) < 100 or not page1.startswith(b"SQLite format 3\x00"):
        raise CorruptData("page 1 has no SQLite database header")
    size = int.from_bytes(page1[16:18], "big")
    size = 65536 if size == 1 else size
    usable = size - page1[20]
    if size != len(page1) or usable < 480:
        raise CorruptData(f"page 1 gives a page size of {size} and {usable} usable bytes")
    return usable


def text_encoding(page1: bytes) -> str:
    code = int.from_bytes(page1[56:60], "big") if len(page1) >= 100 else 0
    return ENCODINGS.get(code, "utf-8")  # 0: a database with no schema yet


@dataclass(frozen=True)
class Cell:
    """One cell of a B-tree page.

    ``payload`` is the part stored on the page; ``size`` the whole payload's size and
    ``overflow`` its first overflow page (0-based) when the rest is on overflow pages.
    ``key`` is the rowid of a table cell (leaf or interior), ``child`` an interior
    cell's left child (0-based).
    """

    payload: bytes = b""
    size: int = 0
    overflow: int | None = None
    key: int | None = None
    child: int | None = None


@dataclass(frozen=True)
class Page:
    """A parsed B-tree page: its kind, its cells, and (interior) its children in order."""

    kind: int
    cells: list[Cell]
    right: int | None  # an interior page's right-most child (0-based)

    @property
    def interior(self) -> bool:
        return self.kind in INTERIOR

    @property
    def children(self) -> list[int]:
        out = [c.child for c in self.cells if c.child is not None]
        return out + ([self.right] if self.right is not None else [])

    @property
    def overflows(self) -> list[tuple[int, int]]:
        """``(first overflow page, bytes on overflow pages)`` of each cell that has them."""
        return [(c.overflow, c.size - len(c.payload)) for c in self.cells if c.overflow is not None]


def local_size(kind: int, size: int, usable: int) -> int:
    """How many bytes of a ``size``-byte payload a cell of page ``kind`` keeps on the page."""
    if kind == LEAF_TABLE:
        most = usable - 35
    else:
        most = (usable - 12) * 64 // 255 - 23
    if size <= most:
        return size
    least = (usable - 12) * 32 // 255 - 23
    k = least + (size - least) % (usable - 4)
    return k if k <= most else least


def _page_header(data: bytes, pageno: int, usable: int) -> tuple[int, int, int, int]:
    """A B-tree page's header offset, kind, cell count and cell pointer array offset,
    the pointer array bounded by the page."""
    off = header_offset(pageno)
    if len(data) < off + 8 or data[off] not in KINDS:
        raise _corrupt(pageno, "not a B-tree page (a free, overflow or damaged page?)")
    kind = data[off]
    ncells = int.from_bytes(data[off + 3 : off + 5], "big")
    ptrs = off + (12 if kind in INTERIOR else 8)
    if ptrs + 2 * ncells > usable:
        raise _corrupt(pageno, f"{ncells} cells do not fit")
    return off, kind, ncells, ptrs


def parse_page(data: bytes, pageno: int, usable: int) -> Page:
    """The B-tree page ``pageno`` (0-based), every cell bounded by the page."""
    off, kind, ncells, ptrs = _page_header(data, pageno, usable)
    interior = kind in INTERIOR
    right = None
    if interior:
        right = int.from_bytes(data[off + 8 : off + 12], "big") - 1
        if right < 0:
            raise _corrupt(pageno, "an interior page without a right-most child")
    cells = []
    try:
        for i in range(ncells):
            pos = int.from_bytes(data[ptrs + 2 * i : ptrs + 2 * i + 2], "big")
            if pos < ptrs + 2 * ncells or pos >= usable:
                raise ValueError(f"cell {i} starts outside the page")
            cells.append(_cell(data, pos, kind, usable))
    except ValueError as exc:
        raise _corrupt(pageno, str(exc)) from None
    return Page(kind, cells, right)


def interior_links(
    data: bytes, pageno: int, usable: int, *, keys: bool = True
) -> tuple[list[int], list[int]]:
    """An interior page's children and, for a table's, its keys (rowid ``k`` lives under
    the first key ``>= k``; [] for an index's, or without ``keys``), as ``parse_page``
    finds them but without building its cells: what mapping a whole B-tree's upper
    levels needs, fast. A page that is no interior page, or is damaged, is CorruptData
    (its keys are checked only when read)."""
    off, kind, ncells, ptrs = _page_header(data, pageno, usable)
    if kind not in INTERIOR:
        raise _corrupt(pageno, "not an interior page")
    cells = struct.unpack_from(f">{ncells}H", data, ptrs)
    if cells and (min(cells) < ptrs + 2 * ncells or max(cells) + 4 > usable):
        raise _corrupt(pageno, "a cell starts outside the page")
    children = [_u32(data, pos)[0] - 1 for pos in cells]
    children.append(_u32(data, off + 8)[0] - 1)
    if min(children) < 0:
        raise _corrupt(pageno, "a child pointer names page 0")
    found: list[int] = []
    if keys and kind == INTERIOR_TABLE:
        try:
            found = [_signed(read_varint(data, pos + 4, usable)[0]) for pos in cells]
        except ValueError as exc:
            raise _corrupt(pageno, str(exc)) from None
    return children, found


def _cell(data: bytes, pos: int, kind: int, usable: int) -> Cell:
    child = None
    if kind in INTERIOR:
        if pos + 4 > usable:
            raise ValueError("a child pointer runs past the page")
        child = int.from_bytes(data[pos : pos + 4], "big") - 1
        if child < 0:
            raise ValueError("a child pointer names page 0")
        pos += 4
        if kind == INTERIOR_TABLE:
            rowid, _ = read_varint(data, pos, usable)
            return Cell(key=_signed(rowid), child=child)
    size, pos = read_varint(data, pos, usable)
    key = None
    if kind == LEAF_TABLE:
        rowid, pos = read_varint(data, pos, usable)
        key = _signed(rowid)
    if size > MAX_PAYLOAD:
        raise ValueError(f"a payload of {size} bytes")
    local = local_size(kind, size, usable)
    overflow = None
    end = pos + local
    if local < size:
        if end + 4 > usable:
            raise ValueError("an overflow pointer runs past the page")
        overflow = int.from_bytes(data[end : end + 4], "big") - 1
        if overflow < 0:
            raise ValueError("an overflowing cell without an overflow page")
    elif end > usable:
        raise ValueError("a payload runs past the page")
    return Cell(bytes(data[pos:end]), size, overflow, key, child)


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def overflow_pages(size_left: int, usable: int) -> int:
    """How many overflow pages hold ``size_left`` bytes of a payload."""
    return -(-size_left // (usable - 4))


def overflow_next(data: bytes, pageno: int, page_count: int) -> int | None:
    """The overflow page after overflow page ``pageno`` (0-based); None at the chain's end."""
    if len(data) < 4:
        raise _corrupt(pageno, "an overflow page shorter than its pointer")
    nxt = int.from_bytes(data[:4], "big") - 1
    if nxt >= page_count:
        raise _corrupt(pageno, f"an overflow pointer to page {nxt + 1}, beyond the file")
    return nxt if nxt >= 0 else None


def full_payload(cell: Cell, usable: int, page_count: int, read: PageReader) -> bytes:
    """A cell's whole payload, its overflow chain followed (and bounded by its size)."""
    if cell.overflow is None:
        return cell.payload
    parts = [cell.payload]
    left = cell.size - len(cell.payload)
    page: int | None = cell.overflow
    seen: set[int] = set()
    for _ in range(overflow_pages(left, usable)):
        if page is None or not 0 <= page < page_count or page in seen:
            raise CorruptData(f"an overflow chain ends early or loops, {left} bytes short")
        seen.add(page)
        data = read(page)
        take = min(left, usable - 4)
        parts.append(bytes(data[4 : 4 + take]))
        left -= take
        page = overflow_next(data, page, page_count)
    if page is not None:
        raise CorruptData(f"an overflow chain goes on past its payload, to page {page + 1}")
    return b"".join(parts)


Value = Union[None, int, float, bytes, str]


def decode_record(
    payload: bytes, encoding: str = "utf-8", limit: int | None = None, *, whole: bool = False
) -> list[Value]:
    """The values of a record (SQLite's record format); the first ``limit`` if given.

    A record cut short (a payload whose rest is on overflow pages) yields the values
    that are whole, or, with ``whole`` (a payload with no overflow), is CorruptData;
    raises CorruptData for a header that is not a record's.
    """
    try:
        header, pos = read_varint(payload, 0, len(payload))
        if header < pos or header > len(payload):
            raise ValueError("a record header longer than its payload")
        types: list[int] = []
        while pos < header and (limit is None or len(types) < limit):
            t, pos = read_varint(payload, pos, header)
            if t in (10, 11):
                raise ValueError(f"serial type {t}")
            types.append(t)
    except ValueError as exc:
        raise CorruptData(f"not a valid SQLite record: {exc}") from None
    values: list[Value] = []
    pos = header
    for t in types:
        n = _serial_size(t)
        if pos + n > len(payload):
            if whole:
                raise CorruptData("not a valid SQLite record: its values run past its payload")
            break  # the rest is on overflow pages
        raw = payload[pos : pos + n]
        pos += n
        if t == 0:
            values.append(None)
        elif t <= 6:
            values.append(int.from_bytes(raw, "big", signed=True))
        elif t == 7:
            values.append(struct.unpack(">d", raw)[0])
        elif t in (8, 9):
            values.append(t - 8)
        elif t % 2 == 0:
            values.append(bytes(raw))
        else:
            values.append(bytes(raw).decode(encoding, "replace"))
    return values


_SIZES = (0, 1, 2, 3, 4, 6, 8, 8, 0, 0)


def _serial_size(t: int) -> int:
    return _SIZES[t] if t < 10 else (t - 12) // 2 if t % 2 == 0 else (t - 13) // 2


_SMALL_SIZES = tuple(_serial_size(t) for t in range(128))


@dataclass(frozen=True)
class SchemaEntry:
    """A B-tree sqlite_schema names: a table's or an index's (a WITHOUT ROWID table's
    B-tree is an index B-tree)."""

    type: str
    name: str
    table: str
    root: int  # 0-based
    sql: str | None


def walk(root: int, read: PageReader, usable: int, page_count: int) -> Iterator[tuple[int, Page]]:
    """Every page of the B-tree at ``root``, parents before children (depth-first).

    Bounded: a page seen twice or a tree deeper than MAX_DEPTH is CorruptData.
    """
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        page, depth = stack.pop()
        if page in seen or not 0 <= page < page_count:
            raise CorruptData(f"B-tree at page {root + 1} names page {page + 1} twice or beyond")
        if depth > MAX_DEPTH:
            raise CorruptData(f"B-tree at page {root + 1} is deeper than {MAX_DEPTH} levels")
        seen.add(page)
        parsed = parse_page(read(page), page, usable)
        yield page, parsed
        stack.extend((c, depth + 1) for c in reversed(parsed.children))


def read_schema(read: PageReader, page_count: int) -> list[SchemaEntry]:
    """The tables and indexes sqlite_schema names, from the database's own pages."""
    if page_count == 0:
        return []
    page1 = read(SCHEMA_ROOT)
    usable = usable_size(page1)
    encoding = text_encoding(page1)
    out = []
    for _, page in walk(SCHEMA_ROOT, read, usable, page_count):
        if page.interior:
            continue
        for cell in page.cells:
            values = decode_record(full_payload(cell, usable, page_count, read), encoding)
            if len(values) < 5:
                raise CorruptData("a sqlite_schema row with fewer than 5 columns")
            kind, name, table, root, sql = values[:5]
            if kind not in ("table", "index") or not isinstance(root, int) or root <= 0:
                continue  # views and triggers have no B-tree
            if not (isinstance(name, str) and isinstance(table, str)) or root > page_count:
                raise CorruptData(f"a sqlite_schema row names root page {root!r}")
            text = sql if isinstance(sql, str) else None
            out.append(SchemaEntry(str(kind), name, table, root - 1, text))
    return out


def page_links(data: bytes, pageno: int, usable: int) -> tuple[list[int], list[tuple[int, int]]]:
    """A B-tree page's children and its cells' overflow chains, as ``parse_page`` finds
    them (``Page.children``, ``Page.overflows``) but without decoding the cells that keep
    their payload on the page: what walking a whole tree needs, fast."""
    off, kind, ncells, ptrs = _page_header(data, pageno, usable)
    interior = kind in INTERIOR
    cells = struct.unpack_from(f">{ncells}H", data, ptrs)
    lowest = ptrs + 2 * ncells
    if cells and (min(cells) < lowest or max(cells) >= usable - (4 if interior else 1)):
        raise _corrupt(pageno, "a cell starts outside the page")
    children: list[int] = []
    if interior:
        children = [int.from_bytes(data[p : p + 4], "big") - 1 for p in cells]
        children.append(int.from_bytes(data[off + 8 : off + 12], "big") - 1)
        if min(children) < 0:
            raise _corrupt(pageno, "a child pointer names page 0")
        if kind == INTERIOR_TABLE:
            return children, []
    most = usable - 35 if kind == LEAF_TABLE else (usable - 12) * 64 // 255 - 23
    skip = 4 if interior else 0
    overflows: list[tuple[int, int]] = []
    for pos in cells:
        pos += skip
        if data[pos] < 0x80:
            continue  # a payload under 128 bytes stays on the page
        try:
            size, pos = read_varint(data, pos, usable)
            if size <= most:
                continue
            if kind == LEAF_TABLE:
                _, pos = read_varint(data, pos, usable)
        except ValueError as exc:
            raise _corrupt(pageno, str(exc)) from None
        if size > MAX_PAYLOAD:
            raise _corrupt(pageno, f"a payload of {size} bytes")
        end = pos + local_size(kind, size, usable)
        if end + 4 > usable:
            raise _corrupt(pageno, "an overflow pointer runs past the page")
        first = int.from_bytes(data[end : end + 4], "big") - 1
        if first < 0:
            raise _corrupt(pageno, "an overflowing cell without an overflow page")
        overflows.append((first, size - (end - pos)))
    return children, overflows


def index_leaf_rowids(data: bytes, pageno: int, usable: int) -> list[int]:
    """The integer each record of an index leaf ends with (its rowid, for an index of a
    rowid table), in key order; records cut short by overflow pages are skipped.

    Decodes only each record's header and last value: fast enough for every index leaf
    a lookup reads. A damaged page or record is CorruptData.
    """
    off = header_offset(pageno)
    if len(data) < off + 8 or data[off] != LEAF_INDEX:
        raise _corrupt(pageno, "not an index leaf")
    ncells = int.from_bytes(data[off + 3 : off + 5], "big")
    ptrs = off + 8
    if ptrs + 2 * ncells > usable:
        raise _corrupt(pageno, f"{ncells} cells do not fit")
    most = (usable - 12) * 64 // 255 - 23
    lowest = ptrs + 2 * ncells
    out = []
    sizes = _SMALL_SIZES
    try:
        for pos in struct.unpack_from(f">{ncells}H", data, ptrs):
            if pos < lowest or pos >= usable:
                raise ValueError("a cell starts outside the page")
            size = data[pos]
            if size < 0x80:
                pos += 1
            else:
                size, pos = read_varint(data, pos, usable)
                if size > most:
                    continue  # the record goes on on overflow pages
            end = pos + size
            if end > usable or pos >= end:
                raise ValueError("a payload runs past the page")
            header = data[pos]
            types = data[pos + 1 : pos + header]
            if header < 0x80 and types.isascii() and len(types) == header - 1 and types:
                # One-byte header size and serial types: the common case, decoded at once.
                value_at = pos + header + sum(sizes[t] for t in types[:-1])
                last = types[-1]
            else:
                h, at = read_varint(data, pos, end)
                header_end = pos + h
                if header_end > end or header_end < at:
                    raise ValueError("a record header longer than its payload")
                value_at, last = header_end, 0
                while at < header_end:
                    value_at += _serial_size(last)
                    last, at = read_varint(data, at, header_end)
            if not 1 <= last <= 9 or last == 7:
                continue  # not an integer
            n = _SIZES[last]
            if value_at + n > end:
                raise ValueError("a record runs past its payload")
            if last >= 8:
                out.append(last - 8)
            else:
                out.append(int.from_bytes(data[value_at : value_at + n], "big", signed=True))
    except ValueError as exc:
        raise _corrupt(pageno, str(exc)) from None
    return out

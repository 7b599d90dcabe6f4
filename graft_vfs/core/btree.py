"""Just enough of SQLite's B-tree page format to find interior pages and their children.

A page's header starts at byte 0 (byte 100 on page 1, after the database header).
Its first byte is the page type; interior pages (2: index, 5: table) hold a cell
pointer array whose cells each start with a 4-byte left child page number, and a
right-most child pointer at header offset 8. Page numbers are 1-based in SQLite and
0-based here.
"""

from __future__ import annotations

import struct

INTERIOR_INDEX = 2
INTERIOR_TABLE = 5
LEAF_INDEX = 10
LEAF_TABLE = 13
INTERIOR = (INTERIOR_INDEX, INTERIOR_TABLE)


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
    children = []
    for cell in struct.unpack_from(f">{ncells}H", data, ptrs):
        if cell + 4 > len(data):
            return []
        children.append(struct.unpack_from(">I", data, cell)[0] - 1)
    children.append(right - 1)
    return [c for c in children if c >= 0]

"""Identities: which incarnation of a volume, in which store, a cache's pages came from.

A volume name can be reused (a store wiped and the name imported again; a cache
directory pointed at another server), so a name says nothing about the pages behind
it. The server gives each volume a random identity when it creates LSN 1, carried by
every commit record and checkpoint of the volume, and each store one, in the object
``store`` created once. Clients record both per volume and compare them with the
server's before taking anything from it.
"""

from __future__ import annotations

from typing import NamedTuple

from graft_vfs.core.envelope import pack, unpack
from graft_vfs.core.ids import IDENTITY_SIZE, new_identity

STORE_KEY = "store"
STORE_KIND = b"STO1"


class Identity(NamedTuple):
    """A volume's identity and its store's: the pair names one history of pages."""

    store_id: bytes
    volume_id: bytes

    def __str__(self) -> str:
        return f"volume {self.volume_id.hex()} in store {self.store_id.hex()}"


def encode_store(store_id: bytes | None = None) -> bytes:
    """The ``store`` object, with a new random identity unless one is given."""
    return pack(STORE_KIND, {"id": store_id if store_id is not None else new_identity()})


def decode_store(data: bytes) -> bytes:
    return unpack(STORE_KIND, data, "the store identity object").blob("id", IDENTITY_SIZE)

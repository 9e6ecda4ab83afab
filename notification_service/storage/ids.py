"""The ids a request writes: fresh ObjectIds, and blocks of them derived from one seed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from bson import ObjectId

# Users asked per `_id: {$in: [...]}`: SecantusDB's cost for one grows faster than the
# list (one list of 1,000: 2.3 s; 20 lists of 50: 0.5 s). On mongod one list would do;
# 20 round trips for 1,000 users cost little there.
ID_BATCH = 50


def new_id() -> str:
    """A fresh ObjectId as 24 lowercase hex characters."""
    return str(ObjectId())


class IdBlock:
    """The ids one request writes, all derived from one seed.

    A request that is retried with its Idempotency-Key after it was cut short (a crash,
    an outage) runs again with the same seed, so it writes the records it may already
    have written under the same ids, and each write can tell it is a repeat. The seed
    is an ObjectId of its own: the time, five random bytes drawn for this block (not the
    process's, so the block never meets an id `ObjectId()` makes), a counter from 0.
    """

    def __init__(self, seed: str | None = None) -> None:
        if seed is None:
            stamp = int(time.time()).to_bytes(4, "big")
            seed = (stamp + os.urandom(5) + bytes(3)).hex()
        self.seed = seed
        self._prefix = bytes.fromhex(seed)[:9]

    def id(self, n: int) -> str:
        """The n-th id of the block (0 <= n < 2**24), 24 lowercase hex characters."""
        if not 0 <= n < 2**24:
            raise ValueError(f"id {n} is outside the block")
        return (self._prefix + n.to_bytes(3, "big")).hex()


def id_batches(ids: Iterable[str | ObjectId]) -> Iterator[list[ObjectId]]:
    """`ids` as ObjectIds, ID_BATCH at a time: what one read of users asks for."""
    batch: list[ObjectId] = []
    for one in ids:
        batch.append(ObjectId(one))
        if len(batch) == ID_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def matching(oids: list[ObjectId]) -> Any:
    """The `_id` condition of a batch: one id is matched as such, since SecantusDB
    serves `_id: x` from the index faster than `_id: {$in: [x]}`."""
    return oids[0] if len(oids) == 1 else {"$in": oids}

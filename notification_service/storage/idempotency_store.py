"""Idempotency-Key records, one per scoped key (see idempotency.py for the contract)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from ..config import Config
from .ids import IdBlock
from .mongo_connector import Document, guarded

ClaimOutcome = Literal["claimed", "taken_over", "replay", "reused", "in_use"]
_INDEX_OPTIONS_CONFLICT = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_CLAIM_ATTEMPTS = 3


def _millis(moment: datetime) -> datetime:
    # BSON dates hold milliseconds: a lease written with microseconds would never equal
    # the value read back, and the conditional updates below match on equality.
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


@dataclass(frozen=True)
class KeyClaim:
    """What `IdempotencyStore.claim` found for one key.

    claimed / taken_over: this request holds the key; run it with `seed`'s ids, and
    finish with `complete`, `forget` or `release` (each conditional on `lease_until`).
    replay: the first answer, `status` and `body`. reused: the key holds another body.
    in_use: another request holds the key until `lease_until`.
    """

    outcome: ClaimOutcome
    key: str
    seed: str = ""
    lease_until: datetime | None = None
    status: int = 0
    body: Any = None


class IdempotencyStore:
    """Idempotency-Key records, one per scoped key, under the unique `_id`.

    `{_id: "<scope> <key>", fingerprint, state: "running"|"done", seed, lease_until,
    created_at, status?, body?}`. The unique `_id` makes the claim one insert that only
    one request can win, in any process; a TTL index on `created_at` forgets the key
    after IDEMPOTENCY_TTL_HOURS.
    """

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.records: Collection[Document] = db[config.idempotency_collection]
        self.db = db
        self.ttl_seconds = config.idempotency_ttl_hours * 3600
        self._indexed = False

    @guarded
    def ensure_indexes(self) -> None:
        """The TTL index on `created_at`; an existing one with another TTL is changed."""
        try:
            self.records.create_index(
                "created_at", name="expires", expireAfterSeconds=self.ttl_seconds
            )
        except OperationFailure as exc:
            # The index exists with the old IDEMPOTENCY_TTL_HOURS: collMod changes it in
            # place (dropping it would leave the keys unexpired meanwhile).
            if exc.code not in _INDEX_OPTIONS_CONFLICT:
                raise
            self.db.command(
                "collMod",
                self.records.name,
                index={"name": "expires", "expireAfterSeconds": self.ttl_seconds},
            )
        self._indexed = True

    @guarded
    def claim(self, key: str, fingerprint: str, now: datetime, lease_seconds: float) -> KeyClaim:
        """Claim `key` for a request whose body hashes to `fingerprint`, or say why not.

        The lease runs `lease_seconds` from `now`: the caller's bound on how long the
        request may still write (idempotency.lease_seconds). A running record whose
        lease is over was left by a request cut short (a crash, a 503 between two
        writes, a claim applied after its own 503): it is taken over, keeping its seed,
        by a conditional update that only one request can win.
        """
        if not self._indexed:
            # The database was down at start-up: without the TTL index no key would
            # ever be forgotten. (Two threads may both create it; that is harmless.)
            self.ensure_indexes()
        lease_until = _millis(now + timedelta(seconds=lease_seconds))
        for _ in range(_CLAIM_ATTEMPTS):
            seed = IdBlock().seed
            try:
                self.records.insert_one(
                    {
                        "_id": key,
                        "fingerprint": fingerprint,
                        "state": "running",
                        "seed": seed,
                        "lease_until": lease_until,
                        "created_at": _millis(now),
                    }
                )
                return KeyClaim("claimed", key, seed, lease_until)
            except DuplicateKeyError:
                pass
            record = self.records.find_one({"_id": key})
            if record is None:
                continue  # expired (TTL) or forgotten after a 4xx since the insert: again
            if record["fingerprint"] != fingerprint:
                return KeyClaim("reused", key)
            if record["state"] == "done":
                return KeyClaim("replay", key, status=record["status"], body=record["body"])
            held_until: datetime = record["lease_until"]
            if held_until > now:
                return KeyClaim("in_use", key, lease_until=held_until)
            won = self.records.update_one(
                {"_id": key, "state": "running", "lease_until": held_until},
                {"$set": {"lease_until": lease_until}},
            )
            if won.modified_count:
                return KeyClaim("taken_over", key, record["seed"], lease_until)
            return KeyClaim("in_use", key, lease_until=held_until)
        # Inserted and removed again under us each time: let the client come back soon.
        return KeyClaim("in_use", key, lease_until=_millis(now))

    def _held(self, claim: KeyClaim) -> Document:
        # Only the holder of this lease finishes the record: one that outlived its lease
        # (clock skew between hosts) must not finish, or forget, its successor's.
        return {"_id": claim.key, "seed": claim.seed, "lease_until": claim.lease_until}

    @guarded
    def complete(self, claim: KeyClaim, status: int, body: Any) -> bool:
        """Store the answer for replays; False if the lease was no longer ours."""
        result = self.records.update_one(
            {**self._held(claim), "state": "running"},
            {"$set": {"state": "done", "status": status, "body": body}},
        )
        return result.modified_count == 1

    @guarded
    def forget(self, claim: KeyClaim) -> bool:
        """Remove the key (a 4xx wrote nothing), so a corrected retry runs afresh."""
        return self.records.delete_one({**self._held(claim), "state": "running"}).deleted_count == 1

    @guarded
    def release(self, claim: KeyClaim, now: datetime) -> bool:
        """End the lease now, so that the client's retry takes over at once."""
        result = self.records.update_one(
            {**self._held(claim), "state": "running"}, {"$set": {"lease_until": _millis(now)}}
        )
        return result.modified_count == 1

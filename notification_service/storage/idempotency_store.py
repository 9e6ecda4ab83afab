"""Idempotency-Key records, one per scoped key (see idempotency.py for the contract)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from pymongo import UpdateOne
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from ..config import Config
from .ids import IdBlock
from .mongo_connector import Document, guarded

log = logging.getLogger(__name__)

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
        # Whom a stored answer is about (`refs`, see `refs_of`): an erasure finds the
        # records of a user without reading the others.
        self.records.create_index("refs", name="refs")
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
                # With its seed: a packed answer's ids derive from it (outcomes.py).
                return KeyClaim(
                    "replay", key, record["seed"], status=record["status"], body=record["body"]
                )
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
    def complete(
        self, claim: KeyClaim, status: int, body: Any, refs: list[str] | None = None
    ) -> bool:
        """Store the answer for replays, with `refs` (`refs_of`); False if the lease was
        no longer ours."""
        done: Document = {"state": "done", "status": status, "body": body}
        if refs:
            done["refs"] = refs
        result = self.records.update_one({**self._held(claim), "state": "running"}, {"$set": done})
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

    @guarded
    def erase_outcomes(self, user_id: str, email_ids: list[str]) -> int:
        """Remove the user's part of the stored answers that name them (`refs`): a
        single create's or an email's ids become null, a fan-out loses the user's entry of
        `results` and its count in `totals`. Every record stays, so a retry with its key
        replays (now without the user) and creates nothing again, for anyone.

        `email_ids`: the user's emails (UserEmailStore.of_user), which find the answers of
        emails sent to their address without a user. Each update is conditional on the record
        still naming the user, and removes that name: two erasures of one user change a
        record once, and of two users of one fan-out, each only its own entry. Running
        records (a request still in progress) are left: their answer is not written yet.
        Returns how many records changed.
        """
        if not self._indexed:
            self.ensure_indexes()
        user_ref = f"{_USER_REF}{user_id.lower()}"
        wanted = [user_ref, *(f"{_EMAIL_REF}{email_id}" for email_id in email_ids)]
        changes: dict[Any, UpdateOne] = {}  # by record: one may name the user twice
        for start in range(0, len(wanted), _REF_BATCH):
            query = {"refs": {"$in": wanted[start : start + _REF_BATCH]}, "state": "done"}
            for record in self.records.find(query, projection={"refs": 1, "body": 1}):
                ref = user_ref if user_ref in record["refs"] else None
                if ref is None:
                    ref = next(r for r in record["refs"] if r in wanted)
                change = _without_user(record, ref, user_id.lower())
                if change is None:
                    log.error("idempotency record of unknown shape left as is: %s", record["_id"])
                    continue
                changes[record["_id"]] = change
        if not changes:
            return 0
        return self.records.bulk_write(list(changes.values()), ordered=False).modified_count


# -- a user's data (user_data.py) ---------------------------------------------------------
#
# What an erasure expects of the stored answers (the `body` of a done record), by scope:
#
#   create, one user:   {"success": true, "data": {"notification_id", "email_id",
#                        "elements", "new"}}         (schemas.CreateResult)
#   create, a fan-out:  {"success": true, "data": {"results": [{"user_id", "status",
#                        ...}], "totals": {"<status>": n}}}   (schemas.FanOutResult),
#                       or packed: {"codes": [one a user], "kept", "totals"} (outcomes.py)
#   email:              {"success": true, "data": {"email_id"}}   (schemas.EmailQueued)
#
# and that `refs` names whom each is about. A change to what is stored of a fan-out
# (a smaller answer, say) changes `refs_of` and `erase_outcomes` together; a record of
# another shape is left as it is and logged, never guessed at.

_USER_REF = "user:"
_EMAIL_REF = "email:"
_STATUS = re.compile(r"[a-z_]{1,64}")  # a fan-out status, used as a field name below


def refs_of(request: Any, body: Any) -> list[str]:
    """Whom a stored answer is about, for `IdempotencyStore.erase_outcomes`: each user
    the request names (`user_id`, `user_ids`); for an email to an address (no user), its
    email id, since its request's address is not stored (only its fingerprint)."""
    if not isinstance(request, dict):
        return []
    users = request.get("user_ids") if request.get("user_id") is None else [request["user_id"]]
    if isinstance(users, list) and users:
        return [f"{_USER_REF}{str(user).lower()}" for user in users]
    data = body.get("data") if isinstance(body, dict) else None
    email_id = data.get("email_id") if isinstance(data, dict) else None
    return [f"{_EMAIL_REF}{email_id}"] if isinstance(email_id, str) else []


def _without_user(record: Document, ref: str, user_id: str) -> UpdateOne | None:
    """The update that removes the user (`ref`) from one record's stored answer, or
    None when its answer is not of a shape listed above."""
    data = record.get("body", {}).get("data") if isinstance(record.get("body"), dict) else None
    if not isinstance(data, dict):
        return None
    query: Document = {"_id": record["_id"], "refs": ref}
    if isinstance(data.get("codes"), list) and isinstance(data.get("totals"), dict):
        return _without_packed_user(record, data, ref)
    if isinstance(data.get("results"), list) and isinstance(data.get("totals"), dict):
        mine = [r for r in data["results"] if isinstance(r, dict) and r.get("user_id") == user_id]
        update: Document = {"$pull": {"refs": ref, "body.data.results": {"user_id": user_id}}}
        if mine:
            status = mine[0].get("status")
            if not isinstance(status, str) or not _STATUS.fullmatch(status):
                return None
            # The entry counted in `totals` is the one pulled, and counted once.
            query["body.data.results"] = {"$elemMatch": {"user_id": user_id, "status": status}}
            update["$inc"] = {f"body.data.totals.{status}": -1}
        return UpdateOne(query, update)
    if "notification_id" not in data and "email_id" not in data:
        return None
    cleared = dict.fromkeys(f"body.data.{name}" for name in data if name in _CREATE_FIELDS)
    return UpdateOne(query, {"$pull": {"refs": ref}, "$set": cleared})


def _without_packed_user(record: Document, data: Document, ref: str) -> UpdateOne | None:
    """`_without_user` of a packed fan-out answer (outcomes.py): `refs` lists the users in
    the request's order, as `codes` does; the user's code becomes the erased mark and
    their ref a dash (positions stay, so another user's erasure, at the same time,
    changes only its own), and their status leaves `totals`."""
    refs, codes = record.get("refs", []), data["codes"]
    if ref not in refs or len(refs) != len(codes):
        return None
    i = refs.index(ref)
    status = PACKED_STATUS.get(str(codes[i])[:1])
    if status is None:
        return None
    update: Document = {
        "$set": {f"refs.{i}": "-", f"body.data.codes.{i}": ERASED},
        "$inc": {f"body.data.totals.{status}": -1},
    }
    if str(i) in data.get("kept", {}):
        update["$unset"] = {f"body.data.kept.{i}": ""}
    return UpdateOne(
        {"_id": record["_id"], f"refs.{i}": ref, f"body.data.codes.{i}": codes[i]}, update
    )


# A packed code's first letter, and the status it stands for (outcomes.py packs and
# unpacks with them); ERASED marks a user erased since (`_without_packed_user`).
PACKED_STATUS = {
    "c": "created",
    "s": "skipped",
    "n": "user_not_found",
    "e": "user_has_no_email",
    "d": "user_document_invalid",
}
ERASED = "x"


# The fields of a single create's or an email's answer that an erasure clears: ids
# of what was erased, and the user's counts.
_CREATE_FIELDS = ("notification_id", "email_id", "elements", "new")
_REF_BATCH = 50  # refs per `$in` (SecantusDB's cost grows faster than the list)

"""The email outbox: a MongoDB collection that the API writes and dispatchers drain.

A record's life: queued -> sending (claimed, with a lease) -> sent | queued (retry) |
failed. While a record is sending, `claimed_by` names the claim (a token per batch)
and `next_attempt_at` is the end of its lease, so one index, (status,
next_attempt_at), finds both what is due and what a dead dispatcher left.

Every write here is journaled (the client's write concern, mongo_connector.connect),
so an acknowledged claim or outcome survives a database crash: a claim found gone
later was taken over after its lease ran out, never lost to the crash.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict

from bson import ObjectId
from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from .mongo_connector import Document, guarded

Status = Literal["queued", "sending", "sent", "failed"]
CLAIMABLE: tuple[Status, ...] = ("queued", "sending")


class LastError(TypedDict):
    code: int | None  # the SMTP reply code, None when there was no reply
    message: str
    permanent: bool  # a retry cannot help
    outage: bool  # the server was down or refused everyone, not just this email


class Outbox:
    def __init__(self, db: Database[Document], collection: str) -> None:
        self.records: Collection[Document] = db[collection]
        self._listeners: list[Callable[[], None]] = []
        self._rng = random.Random()
        self._lock = threading.Lock()

    @guarded
    def ensure_indexes(self) -> None:
        self.records.create_index(
            [("status", ASCENDING), ("next_attempt_at", ASCENDING)], name="due"
        )

    def on_enqueue(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each enqueue in this process (wakes an idle dispatcher)."""
        with self._lock:
            self._listeners.append(listener)

    @guarded
    def enqueue(self, record: Document, now: datetime) -> str:
        """Store a new email as queued, due now; return its id. Durable once this returns."""
        record = {
            **record,
            "_id": ObjectId(),
            "status": "queued",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
            "last_error": None,
            "sent_at": None,
            "claimed_by": None,
        }
        self.records.insert_one(record)
        for listener in self._listeners:
            listener()
        return str(record["_id"])

    @guarded
    def get(self, email_id: str) -> Document | None:
        """The record of `email_id` (24 hex characters, validated by the caller)."""
        return self.records.find_one({"_id": ObjectId(email_id)})

    @guarded
    def claim_batch(
        self, token: str, now: datetime, lease_seconds: float, limit: int
    ) -> list[Document]:
        """Atomically claim up to `limit` due records (or records whose lease ran out).

        Each record is claimed by a conditional update that re-checks it is still due,
        so two dispatchers can never both hold one; `token` (unique per batch) then
        finds exactly what this call won. Three operations per batch instead of a
        find_one_and_update per email: on SecantusDB the latter costs ~20 ms, which
        would cap a dispatcher thread at ~50 emails/s (bench/README.md).
        """
        for _ in range(3):
            ids = self._candidates(now, limit)
            if not ids:
                return []
            won = self.records.update_many(
                {"_id": {"$in": ids}, "status": {"$in": list(CLAIMABLE)}, **self._due(now)},
                {
                    "$set": {
                        "status": "sending",
                        "claimed_by": token,
                        "next_attempt_at": now + timedelta(seconds=lease_seconds),
                    },
                    "$inc": {"attempts": 1},
                },
            )
            if won.modified_count:
                claimed = self.records.find({"_id": {"$in": ids}, "claimed_by": token})
                return sorted(claimed, key=lambda doc: doc["next_attempt_at"])
            # Every candidate went to another dispatcher first: look again at once,
            # rather than idling as if nothing were due.
        return []

    def _candidates(self, now: datetime, limit: int) -> list[Any]:
        # One query per status, each an equality on the index's first field: SecantusDB
        # answered a `$in` on status with a collection scan. Expired leases come first
        # (they waited longest). Of the queued, twice the room is read and a random
        # half kept, so that dispatchers claiming at the same moment mostly reach for
        # different emails; the order stays oldest-first to within two batches.
        stale = self._due_ids("sending", now, limit)
        room = limit - len(stale)
        queued = self._due_ids("queued", now, 2 * room) if room else []
        if len(queued) > room:
            queued = self._rng.sample(queued, room)
        return stale + queued

    def _due_ids(self, status: Status, now: datetime, limit: int) -> list[Any]:
        cursor = (
            self.records.find({"status": status, **self._due(now)}, projection={"_id": 1})
            .sort("next_attempt_at", ASCENDING)
            .limit(limit)
        )
        return [doc["_id"] for doc in cursor]

    @staticmethod
    def _due(now: datetime) -> Document:
        return {"next_attempt_at": {"$lte": now}}

    @guarded
    def renew(
        self, email_ids: list[Any], token: str, now: datetime, lease_seconds: float
    ) -> set[Any]:
        """Extend a claim's lease from `now`; return the ids it still held."""
        query = {"_id": {"$in": email_ids}, "status": "sending", "claimed_by": token}
        result = self.records.update_many(
            query, {"$set": {"next_attempt_at": now + timedelta(seconds=lease_seconds)}}
        )
        if result.matched_count == len(email_ids):
            return set(email_ids)
        return {doc["_id"] for doc in self.records.find(query, projection={"_id": 1})}

    @guarded
    def release(self, email_ids: list[Any] | None, token: str, now: datetime) -> int:
        """Give back claimed, unattempted records so any dispatcher can take them now.

        `email_ids` None gives back whatever the claim `token` still holds: only for a
        claim none of whose emails was tried (its reply was lost, so its ids are unknown).
        """
        query: Document = {"status": "sending", "claimed_by": token}
        if email_ids is not None:
            query["_id"] = {"$in": email_ids}
        result = self.records.update_many(
            query,
            {
                "$set": {"status": "queued", "next_attempt_at": now, "claimed_by": None},
                "$inc": {"attempts": -1},
            },
        )
        return result.modified_count

    @guarded
    def next_due(self) -> datetime | None:
        """When the earliest claimable record falls due (lets an idle dispatcher sleep)."""
        times = [
            record["next_attempt_at"]
            for status in CLAIMABLE
            if (
                record := self.records.find_one(
                    {"status": status},
                    projection={"next_attempt_at": 1},
                    sort=[("next_attempt_at", ASCENDING)],
                )
            )
            is not None
        ]
        return min(times, default=None)

    @guarded
    def mark_sent(self, email_ids: list[Any], now: datetime) -> int:
        """Record that the SMTP server accepted these emails; return how many this call
        recorded (the others were recorded already).

        Not conditional on holding the claim, unlike every other outcome: the email
        went out, and leaving its record claimable would send it again. If the lease
        ran out meanwhile and another dispatcher holds the email, that one's own
        outcome then finds the record sent and changes nothing.
        """
        result = self.records.update_many(
            {"_id": {"$in": email_ids}, "status": {"$ne": "sent"}},
            {"$set": {"status": "sent", "sent_at": now, "claimed_by": None}},
        )
        return result.modified_count

    @guarded
    def mark_retry(self, email_id: Any, worker: str, error: LastError, at: datetime) -> bool:
        return self._finish(
            email_id, worker, {"status": "queued", "last_error": error, "next_attempt_at": at}
        )

    @guarded
    def mark_failed(self, email_id: Any, worker: str, error: LastError, now: datetime) -> bool:
        return self._finish(
            email_id, worker, {"status": "failed", "last_error": error, "failed_at": now}
        )

    @guarded
    def release_backoffs(self, now: datetime) -> int:
        """Make every email waiting out an outage's backoff due now; return how many.

        Emails waiting because of their own 4xx (greylisting, a full mailbox) keep
        their backoff: the server being back says nothing about them.
        """
        result = self.records.update_many(
            {"status": "queued", "next_attempt_at": {"$gt": now}, "last_error.outage": True},
            {"$set": {"next_attempt_at": now}},
        )
        return result.modified_count

    def _finish(self, email_id: Any, worker: str, fields: Document) -> bool:
        # Conditional on still holding the claim, like healthchecks' "exactly one row".
        result = self.records.update_one(
            {"_id": email_id, "status": "sending", "claimed_by": worker},
            {"$set": {**fields, "claimed_by": None}},
        )
        return result.modified_count == 1

    @guarded
    def backlog(self) -> dict[str, int]:
        """How many emails wait (queued) and are being sent, counted on the index."""
        return {status: self.records.count_documents({"status": status}) for status in CLAIMABLE}

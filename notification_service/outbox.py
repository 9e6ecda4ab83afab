"""The email outbox: a MongoDB collection that the API writes and dispatchers drain.

A record's life: queued -> sending (claimed, with a lease) -> sent | queued (retry) |
failed. While a record is sending, `claimed_by` names the claim (a token per batch)
and `next_attempt_at` is the end of its lease, so one index, (status,
next_attempt_at), finds both what is due and what a dead dispatcher left.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict

from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from .mongo_connector import Document, guarded

Status = Literal["queued", "sending", "sent", "failed"]
CLAIMABLE: tuple[Status, ...] = ("queued", "sending")


class LastError(TypedDict):
    code: int | None
    message: str
    permanent: bool


class Outbox:
    def __init__(self, db: Database[Document], collection: str) -> None:
        self.records: Collection[Document] = db[collection]
        self._listeners: list[Callable[[], None]] = []
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
        try:
            oid = ObjectId(email_id)
        except InvalidId:
            return None
        return self.records.find_one({"_id": oid})

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
        due = {"status": {"$in": list(CLAIMABLE)}, "next_attempt_at": {"$lte": now}}
        ids = [
            doc["_id"]
            for doc in self.records.find(due, projection={"_id": 1})
            .sort("next_attempt_at", ASCENDING)
            .limit(limit)
        ]
        if not ids:
            return []
        won = self.records.update_many(
            {"_id": {"$in": ids}, **due},
            {
                "$set": {
                    "status": "sending",
                    "claimed_by": token,
                    "next_attempt_at": now + timedelta(seconds=lease_seconds),
                },
                "$inc": {"attempts": 1},
            },
        )
        if not won.modified_count:
            return []  # another dispatcher got every one of them first
        claimed = {
            doc["_id"]: doc for doc in self.records.find({"_id": {"$in": ids}, "claimed_by": token})
        }
        return [claimed[i] for i in ids if i in claimed]  # oldest due first

    @guarded
    def release(self, email_ids: list[Any], token: str, now: datetime) -> int:
        """Give back claimed, unattempted records so any dispatcher can take them now."""
        result = self.records.update_many(
            {"_id": {"$in": email_ids}, "status": "sending", "claimed_by": token},
            {
                "$set": {"status": "queued", "next_attempt_at": now, "claimed_by": None},
                "$inc": {"attempts": -1},
            },
        )
        return result.modified_count

    @guarded
    def next_due(self) -> datetime | None:
        """When the earliest claimable record falls due (lets an idle dispatcher sleep)."""
        record = self.records.find_one(
            {"status": {"$in": list(CLAIMABLE)}},
            projection={"next_attempt_at": 1},
            sort=[("next_attempt_at", ASCENDING)],
        )
        return None if record is None else record["next_attempt_at"]

    @guarded
    def mark_sent(self, email_ids: list[Any], token: str, now: datetime) -> int:
        """Record the delivery of several emails of one claim; return how many were
        still held (fewer means a lease ran out meanwhile and another took them)."""
        result = self.records.update_many(
            {"_id": {"$in": email_ids}, "status": "sending", "claimed_by": token},
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
        """Make every email waiting out a transient failure due now; return how many."""
        result = self.records.update_many(
            {"status": "queued", "next_attempt_at": {"$gt": now}, "last_error.permanent": False},
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

"""The outbox's dead letters: failed emails, listed and sent again (dead_letters.py).

A resend makes a failed record queued again, its earlier life kept in `history`. The
`dead_letters` index these reads use is created with the outbox's (Outbox.ensure_indexes).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from bson import ObjectId
from pymongo import DESCENDING
from pymongo.collection import Collection

from .mongo_connector import Document, guarded

# How many earlier lives (attempts, last_error, failed_at) a resent email keeps in its
# `history`: enough to see a pattern, bounded so that a record resent in a loop stays small.
HISTORY_MAX = 10


class DeadLetterStore:
    """The failed records of the outbox's collection (Outbox.dead_letters)."""

    def __init__(self, records: Collection[Document], wake: Callable[[], None]) -> None:
        """`records`: the outbox's collection; `wake`: the outbox's, called when a
        resend queues an email (wakes an idle dispatcher)."""
        self.records = records
        self._wake = wake

    @guarded
    def failed_page(
        self, skip: int, limit: int, *, key: str | None = None
    ) -> tuple[list[Document], int]:
        """One page of the failed emails, newest failure first (ties by id), and how many
        are failed in all (of `key` when given)."""
        query = _failed(key=key)
        matched = self.records.count_documents(query)
        if not limit or skip >= matched:
            return [], matched
        cursor = (
            self.records.find(query)
            .sort([("failed_at", DESCENDING), ("_id", DESCENDING)])
            .skip(skip)
            .limit(limit)
        )
        return list(cursor), matched

    @guarded
    def count_failed(self) -> int:
        """How many emails are failed (the dead letters), counted on the index."""
        return self.records.count_documents({"status": "failed"})

    @guarded
    def requeue(self, email_id: str, now: datetime) -> bool:
        """Send a failed email again: queued and due now, its attempts and give-up age
        restarted, its earlier life kept in `history`; False when it was not failed.

        One update, conditional on the status: of concurrent resends exactly one
        finds it failed, and the email is queued (so sent) once.
        """
        result = self.records.update_one(
            {"_id": ObjectId(email_id), "status": "failed"}, _requeue(now)
        )
        if result.modified_count:
            self._wake()
        return result.modified_count == 1

    @guarded
    def requeue_failed(
        self, now: datetime, *, key: str | None = None, failed_before: datetime | None = None
    ) -> int:
        """`requeue` every failed email (of `key`, failed before `failed_before`, when
        given) in one update_many; return how many.

        The same update pipeline as one resend, applied to each matching record on its
        own, atomically, with the filter checked again as it is written: a record a
        concurrent resend took first is no longer failed, and is left alone. A second
        call finds only what failed again since.
        """
        result = self.records.update_many(
            _failed(key=key, failed_before=failed_before), _requeue(now)
        )
        if result.modified_count:
            self._wake()
        return result.modified_count


def _failed(*, key: str | None = None, failed_before: datetime | None = None) -> Document:
    """The filter of the dead letters: the `dead_letters` index's status, then its date."""
    query: Document = {"status": "failed"}
    if key is not None:
        query["key"] = key
    if failed_before is not None:
        query["failed_at"] = {"$lt": failed_before}
    return query


def _requeue(now: datetime) -> list[Document]:
    """The update of a resend: an update pipeline, because the record's own attempts,
    last error and failure time go into its `history` in the same write (an operator
    update cannot read the fields it moves). SecantusDB runs it (tested); the history's
    cap keeps the array, evaluated element by element there, short.

    `requeued_at` is what the dispatcher counts the give-up age (DISPATCH_MAX_AGE_SECONDS)
    from; `failed_at` is cleared, so the record is no longer under the failed retention
    index's clock until it fails again.
    """
    earlier = {"attempts": "$attempts", "last_error": "$last_error", "failed_at": "$failed_at"}
    history = {"$concatArrays": [{"$ifNull": ["$history", []]}, [earlier]]}
    return [
        {
            "$set": {
                "history": {"$slice": [history, -HISTORY_MAX]},
                "status": "queued",
                "attempts": 0,
                "requeued_at": now,
                "next_attempt_at": now,
                "last_error": None,
                "failed_at": None,
                "claimed_by": None,
            }
        }
    ]

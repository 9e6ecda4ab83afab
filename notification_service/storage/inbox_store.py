"""The users' notification arrays: each user's notifications live in an array in
their own document, newest first and capped."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from bson import ObjectId
from pymongo import UpdateOne
from pymongo.change_stream import ChangeStream
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, OperationFailure, PyMongoError

from ..config import Config
from ..errors import NotificationNotFound, UserDocumentInvalid, UserHasNoEmail, UserNotFound
from ..schemas import Notification
from .ids import new_id
from .mongo_connector import DatabaseUnavailable, Document, guarded, only_duplicates

log = logging.getLogger(__name__)

R = TypeVar("R")

_BAD_VALUE = 2  # e.g. "$push: the field must be an array"
_TOO_LARGE = frozenset({10334, 17419, 17420})  # the document would pass 16 MB
_ID_BATCH = 50  # ids per `$in` (see InboxStore._in_batches)
_LOG_SIZE = 8  # writes whose change a user's counts remember (see InboxStore._log)


class RefusedWrites(Exception):
    """Some users' documents refused their write of a bulk write in a transaction."""

    def __init__(self, user_ids: set[str]) -> None:
        super().__init__(f"{len(user_ids)} documents refused the write")
        self.user_ids = user_ids


class InboxStore:
    """The users collection: each user's notifications live in an array in their own
    document, newest first and capped, beside a small `<field>_counts` sub-document
    ({elements, new, version, changed}) that every write keeps exact.

    Every write is one atomic update of the user's document (an update pipeline), so
    counts and array never disagree, and concurrent writes to one user lose nothing
    but what the cap drops. The counts let /count and /list answer without reading
    through the array. Reads fall back to counting the array when the counts are not
    there yet (a document written before them) or when, with NOTIFICATIONS_TTL_DAYS,
    its oldest notification has expired since the last write.

    Where SecantusDB and mongod differ, the forms both accept are used: `"$F.id"` (a
    path through an array of documents) evaluates to nothing on SecantusDB, so ids are
    taken with `$map`; `$slice` gets a positive count.
    """

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.users: Collection[Document] = db[config.users_collection]
        self.field = config.notifications_field
        self.counts_field = f"{config.notifications_field}_counts"
        self.limit = config.notifications_limit
        days = config.notifications_ttl_days
        self.ttl_seconds = days * 86400 if days else None
        self._transactions: bool | None = None

    # -- expressions -------------------------------------------------------------------

    def _items(self) -> Document:
        # A missing field is an empty inbox; a field that is not an array is refused by
        # the writes (409) and reads as empty.
        return {"$cond": [{"$isArray": f"${self.field}"}, f"${self.field}", []]}

    def _cutoff(self, now: datetime) -> int | None:
        """Notifications stamped at or before this second have expired."""
        if self.ttl_seconds is None:
            return None
        return int(now.timestamp()) - self.ttl_seconds

    def _live(self, items: Any, cutoff: int | None) -> Any:
        if cutoff is None:
            return items
        return {
            "$filter": {
                "input": items,
                "as": "n",
                "cond": {"$gt": ["$$n.timestamp", {"$literal": cutoff}]},
            }
        }

    def _fresh(self, items: Any, cutoff: int | None) -> Any:
        """True when nothing in the array has expired: the last (oldest) one has not.

        Clocks of different servers may disagree by a few seconds, so a notification
        may outlive its TTL by that much; after the next write it is gone exactly.
        """
        if cutoff is None:
            return True
        oldest = {"$arrayElemAt": [items, -1]}
        return {
            "$or": [
                {"$eq": [{"$size": items}, 0]},
                {"$gt": [{"$let": {"vars": {"o": oldest}, "in": "$$o.timestamp"}}, cutoff]},
            ]
        }

    @staticmethod
    def _count_new(items: Any) -> Document:
        return {
            "$size": {"$filter": {"input": items, "as": "n", "cond": {"$eq": ["$$n.is_new", True]}}}
        }

    def _counts(self, cutoff: int | None) -> Document:
        """The user's {elements, new}: stored ones when they are exact, else counted."""
        items = self._items()
        stored = f"${self.counts_field}"
        exact = {
            "$and": [
                {"$eq": [{"$type": stored}, "object"]},
                # Someone else rewrote the array (the application, an older release of
                # this service): the counts are counted again rather than trusted.
                {"$eq": [f"{stored}.elements", {"$size": items}]},
                self._fresh(items, cutoff),
            ]
        }
        return {
            "$cond": [
                exact,
                {"elements": f"{stored}.elements", "new": f"{stored}.new"},
                {
                    "$let": {
                        "vars": {"live": self._live(items, cutoff)},
                        "in": {"elements": {"$size": "$$live"}, "new": self._count_new("$$live")},
                    }
                },
            ]
        }

    def _live_items(self, cutoff: int | None) -> Any:
        """The array without expired notifications, filtered only when one has expired."""
        items = self._items()
        if cutoff is None:
            return items
        return {"$cond": [self._fresh(items, cutoff), items, self._live(items, cutoff)]}

    def _version(self) -> Document:
        return {"$ifNull": [f"${self.counts_field}.version", 0]}

    def _rewrite(
        self,
        cutoff: int | None,
        new_array: Callable[[str], Any],
        measure: Callable[[Any], Any],
        token: str,
    ) -> list[Document]:
        """An update pipeline: the array becomes `new_array($$live)`, the counts are
        counted again, and how much `measure` (a count) went down is logged under
        `token`, for the read that follows the write to find (`_state`)."""
        live = self._live_items(cutoff)
        counts = f"${self.counts_field}"
        return [
            {
                "$set": {
                    self.field: {"$let": {"vars": {"live": live}, "in": new_array("$$live")}},
                    self.counts_field: {
                        "version": {"$add": [self._version(), 1]},
                        "before": {"$let": {"vars": {"live": live}, "in": measure("$$live")}},
                        "log": self._log(),
                    },
                }
            },
            {
                "$set": {
                    self.counts_field: {
                        "elements": {"$size": f"${self.field}"},
                        "new": self._count_new(f"${self.field}"),
                        "version": f"{counts}.version",
                        "log": {
                            "$slice": [
                                {
                                    "$concatArrays": [
                                        [
                                            {
                                                "by": {"$literal": token},
                                                "changed": {
                                                    "$subtract": [
                                                        f"{counts}.before",
                                                        measure(f"${self.field}"),
                                                    ]
                                                },
                                            }
                                        ],
                                        f"{counts}.log",
                                    ]
                                },
                                _LOG_SIZE,
                            ]
                        },
                    }
                }
            },
            # mongod merges an object literal given to `$set` into an embedded document
            # already there (SecantusDB replaces it), so the scratch field is removed.
            {"$unset": f"{self.counts_field}.before"},
        ]

    def _log(self) -> Document:
        """The log of recent writes' changes, as it was (empty on an older document).

        Writes are update_one and the answer's numbers come from a read right after
        (findAndModify would do both at once, but SecantusDB answers it with a scan
        of the whole collection: 100 ms at 2,000 users against 5 ms). A concurrent
        write may come in between, so each write logs how much it changed under its
        own token, and the read picks its own entry out of the last few.
        """
        log_field = f"${self.counts_field}.log"
        return {"$cond": [{"$isArray": log_field}, log_field, []]}

    def _prepend(self, notification: Notification, cutoff: int | None) -> list[Document]:
        """The update pipeline that records a notification: newest first, capped.

        The counts are carried forward without reading through the array (one look at
        the element the cap drops) when they are exact; otherwise counted again.
        """
        items = self._items()
        counts = f"${self.counts_field}"
        size = {"$size": items}
        dropped = {"$arrayElemAt": [items, self.limit - 1]}
        drops_new = {
            "$and": [
                {"$gte": [size, self.limit]},
                {"$eq": [{"$let": {"vars": {"d": dropped}, "in": "$$d.is_new"}}, True]},
            ]
        }
        carried = {
            "$and": [
                {"$eq": [{"$type": counts}, "object"]},
                {"$eq": [f"{counts}.elements", size]},
                {"$lte": [size, self.limit]},
                self._fresh(items, cutoff),
            ]
        }
        # $literal: the notification's data is the caller's, and a string like "$email"
        # inside a pipeline would otherwise be read as a field of the user's document.
        entry = {"$literal": notification}
        # The application's document may hold something else in the field: then it is
        # left exactly as it is (the caller sees the field in the answer and says 409).
        # Checked here, not in the query: SecantusDB answers an `$or` beside `_id` with
        # a collection scan (24 ms at 1,000 users, where `_id` alone costs 1 ms).
        takes = self._takes()

        def unless_refused(value: Any, field: str) -> Any:
            return {"$cond": [takes, value, f"${field}"]}

        return [
            {
                "$set": {
                    self.field: unless_refused(
                        {
                            "$slice": [
                                {"$concatArrays": [[entry], self._live_items(cutoff)]},
                                self.limit,
                            ]
                        },
                        self.field,
                    ),
                    self.counts_field: unless_refused(
                        self._carried_counts(notification, carried, size, drops_new),
                        self.counts_field,
                    ),
                }
            },
            {
                "$set": {
                    self.counts_field: {
                        "$cond": [
                            {
                                "$and": [
                                    {"$isArray": f"${self.field}"},
                                    {"$eq": [{"$type": f"{counts}.new"}, "null"]},
                                ]
                            },
                            {
                                "elements": {"$size": f"${self.field}"},
                                "new": self._count_new(f"${self.field}"),
                                "version": f"{counts}.version",
                                "log": f"{counts}.log",
                            },
                            counts,
                        ]
                    }
                }
            },
        ]

    def _takes(self) -> Document:
        """Whether the user's field can take a notification: an array, or not there."""
        return {
            "$or": [
                {"$isArray": f"${self.field}"},
                {"$eq": [{"$type": f"${self.field}"}, "missing"]},
            ]
        }

    def _carried_counts(
        self, notification: Notification, carried: Any, size: Any, drops_new: Any
    ) -> Document:
        """The counts after prepending, carried forward when `carried`; else nulls that
        the pipeline's second stage replaces by counting the array."""
        counts = f"${self.counts_field}"
        return {
            "elements": {"$cond": [carried, {"$min": [{"$add": [size, 1]}, self.limit]}, None]},
            "new": {
                "$cond": [
                    carried,
                    {
                        "$add": [
                            f"{counts}.new",
                            1 if notification["is_new"] else 0,
                            {"$cond": [drops_new, -1, 0]},
                        ]
                    },
                    None,
                ]
            },
            "version": {"$add": [self._version(), 1]},
            "log": self._log(),
        }

    def _holding(self, cutoff: int | None, **fields: Any) -> Document:
        """A query for a user with a live (unexpired) notification with these fields."""
        if cutoff is not None:
            fields["timestamp"] = {"$gt": cutoff}
        return {self.field: {"$elemMatch": fields}}

    def _ids(self, items: Any) -> Document:
        return {"$map": {"input": items, "as": "n", "in": "$$n.id"}}

    def _projection(self, full_user: bool) -> Document:
        # The whole user when the email needs them, else the counts alone; and the
        # field's first element, which shows whether the field took the notification.
        if full_user:
            return {self.field: {"$slice": 1}}
        return {"_id": 0, self.counts_field: 1, self.field: {"$slice": 1}}

    def _create_query(self, oid: ObjectId, require_email: bool, repeat_of: str | None) -> Document:
        # `_id` and plain field conditions only: SecantusDB serves these from the _id
        # index, and scans the collection for `$or`, `$and` or `$nor` (1 ms against
        # 24 ms per call with 1,000 users; docs/measurements-history.md).
        query: Document = {"_id": oid}
        if require_email:
            query["email"] = {"$type": "string", "$ne": ""}
        if repeat_of is not None:
            # A retry of a request that may have recorded it already (same id block).
            query[f"{self.field}.id"] = {"$ne": repeat_of}
        return query

    # -- writes ------------------------------------------------------------------------

    @guarded
    def append_capped(
        self,
        user_id: str,
        notification: Notification,
        now: datetime,
        *,
        require_email: bool,
        repeat: bool = False,
        session: Any = None,
    ) -> Document:
        """Prepend `notification` to the user's capped array in one update; return the
        user's document after it (the whole user, without the array, with
        `require_email`; otherwise the counts alone), `counts` under "counts".

        With `repeat`, the notification may be there already (a retried request): then
        nothing is written and the user's document is returned as it is.

        :raise UserNotFound: no such user.
        :raise UserHasNoEmail: `require_email` and the user has no email; nothing written.
        :raise UserDocumentInvalid: the field is not an array, or the document is full.
        """
        oid = ObjectId(user_id)
        query = self._create_query(oid, require_email, notification["id"] if repeat else None)
        with self._refusals_of_the_document():
            # update_one, then a read by _id (see `_log` for why not findAndModify).
            result = self.users.update_one(
                query, self._prepend(notification, self._cutoff(now)), session=session
            )
        if not result.matched_count:
            as_it_is = self._why_not_appended(
                oid, require_email, notification["id"] if repeat else None, now
            )
            return self._with_counts(as_it_is)
        user = self.users.find_one(
            {"_id": oid}, projection=self._projection(require_email), session=session
        )
        if user is None:
            raise UserNotFound()  # deleted by the application right after the write
        if not isinstance(user.pop(self.field, []), list):
            raise self._not_an_array()  # the pipeline left the document as it was
        return self._with_counts(user)

    def _with_counts(self, user: Document) -> Document:
        counts = user.pop(self.counts_field, None) or {}
        user["counts"] = {"elements": counts.get("elements", 0), "new": counts.get("new", 0)}
        return user

    def _why_not_appended(
        self, oid: ObjectId, require_email: bool, repeat_of: str | None, now: datetime
    ) -> Document:
        """Why the create's query matched nothing; the user as it is when it was a repeat.

        :raise UserNotFound: / :raise UserHasNoEmail: / :raise UserDocumentInvalid:
        """
        user = self.users.find_one({"_id": oid}, projection={self.field: {"$slice": 1}})
        if user is None:
            raise UserNotFound()
        items = user.pop(self.field, [])
        if not isinstance(items, list):
            raise self._not_an_array()
        if require_email and not has_email(user):
            raise UserHasNoEmail()
        if repeat_of is None:
            # Matched nothing, yet matches now: it changed in between (deleted and made
            # again, or its field fixed). Rare enough to answer as a conflict.
            raise UserDocumentInvalid("The user's document changed during the request; retry.")
        # The earlier attempt recorded it: answer with the counts as they are now.
        state = self._state(oid, None, now)
        user[self.counts_field] = state
        return user if require_email else {self.counts_field: state}

    def _not_an_array(self) -> UserDocumentInvalid:
        return UserDocumentInvalid(
            f"The user's {self.field!r} field is not an array.",
            details=[{"field": self.field, "problem": "is not an array"}],
        )

    @guarded
    def append_many(
        self,
        entries: list[tuple[str, Notification]],
        now: datetime,
        *,
        require_email: bool,
        repeat: bool = False,
        session: Any = None,
    ) -> tuple[set[str], set[str]]:
        """Record one notification for each (user_id, notification) in ONE bulk write;
        return the user ids that hold theirs afterwards, and those whose document
        refused the write (at MongoDB's 16 MB, or a validator of the application's).

        Users that do not exist, have no email (with `require_email`) or whose field
        is not an array are left out, the others are written all the same.

        :raise RefusedWrites: some documents refused, inside a transaction (`session`):
            the server has aborted it; run it again without them.
        """
        if not entries:
            return set(), set()
        cutoff = self._cutoff(now)
        requests = [
            UpdateOne(
                self._create_query(
                    ObjectId(user_id), require_email, notification["id"] if repeat else None
                ),
                self._prepend(notification, cutoff),
            )
            for user_id, notification in entries
        ]
        refused: set[str] = set()
        try:
            result = self.users.bulk_write(requests, ordered=False, session=session)
            matched = result.matched_count
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            refused = {entries[error["index"]][0] for error in errors}
            log.warning("fan-out: %d writes refused", len(refused))
            if session is not None:
                raise RefusedWrites(refused) from exc
            matched = -1  # unordered: the others went through
        if matched == len(entries) and not repeat:
            return {user_id for user_id, _ in entries}, refused
        # Which users hold their notification (a user gone, or a repeat).
        wanted = {user_id: notification["id"] for user_id, notification in entries}
        pipeline = [{"$project": {"ids": self._ids(self._items())}}]
        held = self._in_batches(list(wanted), pipeline, session)
        done = {user_id for user_id, doc in held.items() if wanted[user_id] in doc["ids"]}
        return done, refused

    def _in_batches(
        self, user_ids: list[str], stages: list[Document], session: Any = None
    ) -> dict[str, Document]:
        """The users among `user_ids` that exist, as `stages` shape them, by id.

        Asked `_ID_BATCH` ids at a time: SecantusDB's cost for `_id: {$in: [...]}`
        grows faster than the list (one list of 1,000: 2.3 s; 20 lists of 50: 0.5 s).
        On mongod one list would do; 20 round trips for 1,000 users cost little there.
        """
        found: dict[str, Document] = {}
        for start in range(0, len(user_ids), _ID_BATCH):
            batch = [ObjectId(u) for u in user_ids[start : start + _ID_BATCH]]
            pipeline = [{"$match": {"_id": {"$in": batch}}}, *stages]
            for doc in self.users.aggregate(pipeline, session=session):
                found[str(doc["_id"])] = doc
        return found

    @guarded
    def mark_read(self, user_id: str, notification_id: str, now: datetime) -> Document:
        """Set is_new to false; reading a read notification is a success too. Returns
        {elements, new, version, changed}.

        :raise UserNotFound: / :raise NotificationNotFound:
        """
        oid = ObjectId(user_id)
        target = {"$literal": notification_id}

        def read_it(live: str) -> Any:
            return {
                "$map": {
                    "input": live,
                    "as": "n",
                    "in": {
                        "$cond": [
                            {"$eq": ["$$n.id", target]},
                            {"$mergeObjects": ["$$n", {"is_new": False}]},
                            "$$n",
                        ]
                    },
                }
            }

        cutoff = self._cutoff(now)
        return self._write(
            {"_id": oid, **self._holding(cutoff, id=notification_id, is_new=True)},
            cutoff,
            read_it,
            self._count_new,
            oid,
            now,
            must_hold=notification_id,
        )

    @guarded
    def mark_all_read(self, user_id: str, up_to: str | None, now: datetime) -> Document:
        """Mark every notification read, or only `up_to` and the older ones: one update.

        :raise UserNotFound: / :raise NotificationNotFound: `up_to` is not in the array.
        """
        oid = ObjectId(user_id)
        cutoff = self._cutoff(now)
        # One condition on the array (SecantusDB scans the collection for an `$and`): the
        # watermark must be there; without one, something must be unread.
        if up_to is not None:
            query: Document = {"_id": oid, **self._holding(cutoff, id=up_to)}
        else:
            query = {"_id": oid, **self._holding(cutoff, is_new=True)}

        def read_them(live: str) -> Any:
            # Newest first: the watermark's position splits the array; from it on, all
            # are read. Without one, everything from position 0.
            start: Any = 0
            if up_to is not None:
                start = {"$indexOfArray": [self._ids(live), {"$literal": up_to}]}
            return {
                "$let": {
                    "vars": {"start": start},
                    "in": {
                        "$map": {
                            "input": {"$range": [0, {"$size": live}]},
                            "as": "i",
                            "in": {
                                "$let": {
                                    "vars": {"n": {"$arrayElemAt": [live, "$$i"]}},
                                    "in": {
                                        "$cond": [
                                            {
                                                "$and": [
                                                    {"$gte": ["$$start", 0]},
                                                    {"$gte": ["$$i", "$$start"]},
                                                ]
                                            },
                                            {"$mergeObjects": ["$$n", {"is_new": False}]},
                                            "$$n",
                                        ]
                                    },
                                }
                            },
                        }
                    },
                }
            }

        return self._write(
            query,
            cutoff,
            read_them,
            self._count_new,
            oid,
            now,
            must_hold=up_to,
        )

    @guarded
    def delete(self, user_id: str, notification_id: str, now: datetime) -> Document:
        """Remove one notification; removing one that is gone changes nothing (changed 0).

        :raise UserNotFound:
        """
        oid = ObjectId(user_id)
        target = {"$literal": notification_id}

        def without(live: str) -> Any:
            return {"$filter": {"input": live, "as": "n", "cond": {"$ne": ["$$n.id", target]}}}

        cutoff = self._cutoff(now)
        return self._write(
            {"_id": oid, **self._holding(cutoff, id=notification_id)},
            cutoff,
            without,
            _size,
            oid,
            now,
        )

    @guarded
    def delete_all(self, user_id: str, only_read: bool, now: datetime) -> Document:
        """Remove every notification, or only the read ones.

        :raise UserNotFound:
        """
        oid = ObjectId(user_id)
        query: Document = {"_id": oid}
        if only_read:
            query[self.field] = {"$elemMatch": {"is_new": False}}
        else:
            # An array with a first element (`F.0` alone would also match a document
            # with a key "0", which the pipeline must not overwrite).
            query[f"{self.field}.0"] = {"$exists": True}
            query[self.field] = {"$type": "array"}

        def kept(live: str) -> Any:
            if not only_read:
                return {"$literal": []}
            return {"$filter": {"input": live, "as": "n", "cond": {"$eq": ["$$n.is_new", True]}}}

        return self._write(query, self._cutoff(now), kept, _size, oid, now)

    def _write(
        self,
        query: Document,
        cutoff: int | None,
        new_array: Callable[[str], Any],
        measure: Callable[[Any], Any],
        oid: ObjectId,
        now: datetime,
        must_hold: str | None = None,
    ) -> Document:
        """Rewrite the array where `query` matches (`_rewrite`), then read the counts
        and what this write changed; when the query matched nothing (nothing to
        change), answer from the read: changed 0, or why it is a 404."""
        token = new_id()
        with self._refusals_of_the_document():
            result = self.users.update_one(query, self._rewrite(cutoff, new_array, measure, token))
        state = self._state(oid, must_hold, now, token if result.matched_count else None)
        if state is None:
            raise UserNotFound()
        if result.matched_count:
            # Our own entry, unless more than _LOG_SIZE writes came in between.
            return {**state, "changed": state["changed"] if state["changed"] is not None else 0}
        if must_hold is not None and not state["holds"]:
            raise NotificationNotFound()
        return {**state, "changed": 0}

    # -- reads -------------------------------------------------------------------------

    def _state(
        self, oid: ObjectId, notification_id: str | None, now: datetime, token: str | None = None
    ) -> Document | None:
        """The user's counts and version, whether `notification_id` is in the array, and
        what the write logged under `token` changed (None when it is not in the log)."""
        cutoff = self._cutoff(now)
        # Only what is asked for: /count, the hot path, projects the counts alone.
        shown: Document = {"_id": 0, "counts": self._counts(cutoff), "version": self._version()}
        if notification_id is not None:
            ids = self._ids(self._live_items(cutoff))
            shown["holds"] = {"$in": [{"$literal": notification_id}, ids]}
        if token is not None:
            mine = {
                "$filter": {
                    "input": self._log(),
                    "as": "e",
                    "cond": {"$eq": ["$$e.by", {"$literal": token}]},
                }
            }
            changed = {"$map": {"input": mine, "as": "e", "in": "$$e.changed"}}
            shown["changed"] = {"$ifNull": [{"$arrayElemAt": [changed, 0]}, None]}
        pipeline = [{"$match": {"_id": oid}}, {"$project": shown}]
        for doc in self.users.aggregate(pipeline):
            return {"holds": False, "changed": None, **doc.pop("counts"), **doc}
        return None

    @guarded
    def counts(self, user_id: str, now: datetime) -> Document:
        """{elements, new, version} from the stored counts: one small read.

        :raise UserNotFound:
        """
        state = self._state(ObjectId(user_id), None, now)
        if state is None:
            raise UserNotFound()
        return state

    @guarded
    def inbox_page(
        self,
        user_id: str,
        skip: int,
        limit: int,
        now: datetime,
        *,
        is_new: bool | None = None,
        key: str | None = None,
    ) -> Document:
        """Counts and one page, newest first, in one round trip; with a filter, the page
        is of the matching ones and `matched` says how many match.

        :raise UserNotFound: no such user.
        """
        cutoff = self._cutoff(now)
        live = self._live_items(cutoff)
        conditions = []
        if is_new is not None:
            conditions.append({"$eq": ["$$n.is_new", is_new]})
        if key is not None:
            conditions.append({"$eq": ["$$n.key", {"$literal": key}]})
        if conditions:
            live = {"$filter": {"input": live, "as": "n", "cond": {"$and": conditions}}}
        # $slice's count must be positive, so a zero limit asks for the counts alone.
        # $slice takes 32-bit arguments; no array is anywhere near that long, so a
        # larger skip gives the same (empty) page instead of a server error.
        position = min(skip, 2**31 - 1)
        page: Any = {"$slice": ["$$m", position, limit]} if limit > 0 else {"$literal": []}
        pipeline: list[Document] = [
            {"$match": {"_id": ObjectId(user_id)}},
            {
                "$project": {
                    "_id": 0,
                    "counts": self._counts(cutoff),
                    "version": self._version(),
                    "found": {
                        "$let": {
                            "vars": {"m": live},
                            "in": {
                                "matched": {"$size": "$$m"} if conditions else None,
                                "list": page,
                            },
                        }
                    },
                }
            },
        ]
        for result in self.users.aggregate(pipeline):
            counts, found = result["counts"], result["found"]
            matched = found["matched"] if conditions else counts["elements"]
            return {
                **counts,
                "version": result["version"],
                "matched": matched,
                "list": found["list"],
            }
        raise UserNotFound()

    @guarded
    def find_user(self, user_id: str) -> Document:
        """The user (without notifications).

        :raise UserNotFound:
        """
        user = self.users.find_one({"_id": ObjectId(user_id)}, projection={self.field: 0})
        if user is None:
            raise UserNotFound()
        return user

    @guarded
    def find_users(self, user_ids: list[str]) -> dict[str, Document]:
        """The users among `user_ids` that exist (without notifications), by id, with
        `holds_array` saying whether their field can take a notification."""
        stages: list[Document] = [
            {"$set": {"holds_array": self._takes()}},
            {"$project": {self.field: 0, self.counts_field: 0}},
        ]
        return self._in_batches(user_ids, stages)

    @guarded
    def has_notification(self, user_id: str, notification_id: str) -> bool:
        """Whether the user's array holds the notification (the sweep of pending emails)."""
        query = {"_id": ObjectId(user_id), f"{self.field}.id": notification_id}
        return self.users.find_one(query, projection={"_id": 1}) is not None

    @guarded
    def ensure_user(self, user_id: str, email: str) -> None:
        """Create the user as a profile with `email` unless it exists (test mode, EMAIL).

        An existing document is left exactly as it is, whatever its email.
        """
        self.ensure_users([user_id], email)

    @guarded
    def ensure_users(self, user_ids: list[str], email: str) -> None:
        """`ensure_user` for many users in one bulk write (test mode fan-out)."""
        requests = [
            UpdateOne(
                {"_id": ObjectId(u)},
                {"$setOnInsert": {"email": email, self.field: []}},
                upsert=True,
            )
            for u in user_ids
        ]
        try:
            self.users.bulk_write(requests, ordered=False)
        except BulkWriteError as exc:
            # Two upserts raced and the other one created the user, as wanted.
            if not only_duplicates(exc):
                raise

    # -- the live stream (stream.py) ----------------------------------------------------

    @guarded
    def feed_states(self, user_ids: list[str], now: datetime) -> dict[str, Document]:
        """What a stream shows of each of `user_ids` that exists, by id: `version`,
        `elements`, `new`, `items` (the live notifications, newest first) and
        `expires_at` (when the oldest of them expires, with NOTIFICATIONS_TTL_DAYS)."""
        cutoff = self._cutoff(now)
        stages: list[Document] = [
            {
                "$project": {
                    "counts": self._counts(cutoff),
                    "version": self._version(),
                    "items": self._live_items(cutoff),
                }
            }
        ]
        states = {}
        for user_id, doc in self._in_batches(user_ids, stages).items():
            items: list[Document] = doc["items"]
            oldest = items[-1].get("timestamp") if items else None
            expires = None
            if self.ttl_seconds is not None and isinstance(oldest, int):
                expires = oldest + self.ttl_seconds
            states[user_id] = {
                "version": doc["version"],
                **doc["counts"],
                "items": items,
                "expires_at": expires,
            }
        return states

    @guarded
    def versions(self, user_ids: list[str]) -> dict[str, Any]:
        """The counts' `version` of each of `user_ids` that exists: it moves on every
        write of the inbox (what a stream watches where there are no change streams)."""
        stages: list[Document] = [{"$project": {"version": self._version()}}]
        return {u: doc["version"] for u, doc in self._in_batches(user_ids, stages).items()}

    @guarded
    def watch_users(self, max_await_ms: int) -> UserChanges:
        """A change stream of the users collection, giving the ids of changed documents.

        :raise ChangeStreamsUnsupported: the deployment refused it (a standalone server,
            or a user without the privilege).
        """
        # Only the document's id is shipped: the stream is a signal, the inbox is read
        # afterwards (the same read as the polling fallback's). On SecantusDB an update
        # pipeline's event carries each changed top-level field whole: the array too.
        pipeline: list[Document] = [
            {"$match": {"operationType": {"$in": ["insert", "update", "replace", "delete"]}}},
            {"$project": {"documentKey": 1}},
        ]
        try:
            stream = self.users.watch(pipeline, max_await_time_ms=max_await_ms)
        except OperationFailure as exc:
            raise ChangeStreamsUnsupported(str(exc)) from exc
        return UserChanges(stream)

    @guarded
    def ping(self) -> None:
        """Ask the database whether it answers (the readiness probe)."""
        self.users.database.command("ping")

    # -- transactions ------------------------------------------------------------------

    @guarded
    def supports_transactions(self) -> bool:
        """Whether the deployment runs multi-document transactions: a replica set or a
        sharded cluster, not a standalone server. Asked once per process."""
        if self._transactions is None:
            hello = self.users.database.client.admin.command("hello")
            self._transactions = "setName" in hello or hello.get("msg") == "isdbgrid"
        return self._transactions

    @guarded
    def in_transaction(self, work: Callable[[Any], R]) -> R:
        """Run `work(session)` in one transaction (retried on transient errors, within
        the request's deadline); every write inside commits together or not at all."""
        with self.users.database.client.start_session() as session:
            return session.with_transaction(work)

    @contextlib.contextmanager
    def _refusals_of_the_document(self) -> Iterator[None]:
        """Turn the server refusing the user's document into UserDocumentInvalid (409).

        The users collection is the application's: its document may be at MongoDB's
        16 MB limit.
        """
        try:
            yield
        except OperationFailure as exc:  # WriteError, or findAndModify's failure
            if exc.code == _BAD_VALUE:
                raise self._not_an_array() from exc
            if exc.code in _TOO_LARGE:
                raise UserDocumentInvalid(
                    "The user's document is too large to take another notification."
                ) from exc
            raise


class ChangeStreamsUnsupported(Exception):
    """The deployment has no change streams for us: watch by polling instead."""


class UserChanges:
    """An open change stream of the users collection (InboxStore.watch_users)."""

    def __init__(self, stream: ChangeStream[Document]) -> None:
        self._stream = stream

    @guarded
    def next_id(self) -> str | None:
        """The id of the next changed user; None after the max await time without
        one (or for a document whose `_id` is not an ObjectId: no user_id of this API).

        :raise DatabaseUnavailable: also when the stream has ended (the collection was
            dropped or renamed): open another one.
        """
        change = self._stream.try_next()
        if change is None:
            if not self._stream.alive:
                raise DatabaseUnavailable("the change stream ended")
            return None
        key = change.get("documentKey", {}).get("_id")
        return str(key) if isinstance(key, ObjectId) else None

    def close(self) -> None:
        with contextlib.suppress(PyMongoError):
            self._stream.close()


def _size(items: Any) -> Document:
    return {"$size": items}


def has_email(user: Document) -> bool:
    """Whether the user has an address to send to: the rule of the create's query too."""
    address = user.get("email")
    return isinstance(address, str) and address != ""

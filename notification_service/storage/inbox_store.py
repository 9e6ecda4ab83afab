"""The users' notification arrays: each user's notifications live in an array in their
own document, newest first and capped at NOTIFICATIONS_LIMIT.

Every write is one atomic update of the user's document, so concurrent writes to one
user lose nothing but what the cap drops; the counts are computed when read. The
shapes of the queries and updates are built in `updates.py`; a method here runs one
of them and turns the answer (or the server's refusal) into the domain's terms.
"""

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
from ..schemas import Notification, listed
from . import updates
from .ids import id_batches, new_id
from .mongo_connector import (
    BAD_VALUE,
    DOCUMENT_REFUSALS,
    TOO_LARGE,
    DatabaseUnavailable,
    Document,
    guarded,
    only_duplicates,
)
from .updates import Layout

log = logging.getLogger(__name__)

R = TypeVar("R")


class RefusedWrites(Exception):
    """Some users' documents refused their write of a bulk write in a transaction:
    `refused` says why, by user id."""

    def __init__(self, refused: dict[str, UserDocumentInvalid]) -> None:
        super().__init__(f"{len(refused)} documents refused the write")
        self.refused = refused


class InboxStore:
    """The users collection: each user's array of notifications, and beside it a small
    `<field>_meta` ({version, log}) that every write moves."""

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.users: Collection[Document] = db[config.users_collection]
        self.layout = Layout.of(config)
        self.field = self.layout.field
        self._transactions: bool | None = None

    # -- writes ------------------------------------------------------------------------

    @guarded
    def append(
        self,
        entries: list[tuple[str, Notification]],
        now: datetime,
        *,
        require_email: bool,
        repeat: bool = False,
        session: Any = None,
        where: Document | None = None,
    ) -> tuple[set[str], dict[str, UserDocumentInvalid]]:
        """Prepend one notification to each (user_id, notification)'s capped array, in
        ONE bulk write (two for collapse keys: `_collapse`); return the user ids that
        hold theirs afterwards, and those whose document refused the write, with why (a
        field that is not an array, MongoDB's 16 MB, a validator of the application's).

        Users that do not exist or have no email (with `require_email`) are left out;
        the others are written all the same. With `repeat` (a retried request, the same
        ids), a notification already there is not written again, and counts as held.

        A notification with a `collapse_key` collapses into the user's unread one of the
        same key and collapse key where there is one (`_collapse`), and then counts as
        held too: which one it went into is read afterwards (`kept_ids`, or `counts`
        with `kept_by`).

        `where`: more conditions every user's document must meet (a preference), plain
        field conditions as the module's writes take them; a user that does not is left
        out like a missing one.

        :raise RefusedWrites: some documents refused, inside a transaction (`session`):
            the server has aborted it; run it again without them.
        """
        plain = [e for e in entries if e[1].get("collapse_key") is None]
        collapsing = [e for e in entries if e[1].get("collapse_key") is not None]
        done: set[str] = set()
        refused: dict[str, UserDocumentInvalid] = {}
        for part, write in ((plain, self._push), (collapsing, self._collapse)):
            if part:
                more, refusals = write(part, now, require_email, repeat, session, where)
                done |= more
                refused.update(refusals)
        return done, refused

    def _push(
        self,
        entries: list[tuple[str, Notification]],
        now: datetime,
        require_email: bool,
        repeat: bool,
        session: Any,
        where: Document | None,
    ) -> tuple[set[str], dict[str, UserDocumentInvalid]]:
        """`append` of notifications without a collapse key: one `$push` each."""
        writes = [
            (
                self._create_filter(user_id, notification, require_email, repeat, where),
                updates.push(self.layout, notification),
            )
            for user_id, notification in entries
        ]
        matched, _, refused = self._write_all(entries, writes, session)
        if matched == len(entries) and not repeat:
            return {user_id for user_id, _ in entries}, refused
        # Which users hold their notification (a user gone, or a repeat).
        done, _ = self._held(entries, session, collapsing=False)
        return done, refused

    def _collapse(
        self,
        entries: list[tuple[str, Notification]],
        now: datetime,
        require_email: bool,
        repeat: bool,
        session: Any,
        where: Document | None,
    ) -> tuple[set[str], dict[str, UserDocumentInvalid]]:
        """`append` of notifications with a collapse key: into the user's unread one of
        the same key and collapse key (`updates.collapse`, an update pipeline, where
        `updates.collapsible` finds one), else a plain `$push` (where it finds none).

        Two writes rather than the one pipeline that can do both: SecantusDB diffs an
        array that a pipeline rewrote element by element (for its change events), and
        prepending shifts every element, where a collapse into a row near the top
        changes only the first few; a `$push` is not diffed. A user whose row came or
        went between the two writes (neither matched) gets the pipeline alone, which is
        right either way.
        """
        layout, cutoff = self.layout, self.layout.cutoff(now)
        everyone = {user_id for user_id, _ in entries}

        def writes(chosen: list[tuple[str, Notification]], step: str) -> list[tuple[Document, Any]]:
            """ "into" an existing row, a "new" one, or "either" (no row condition)."""
            found: list[tuple[Document, Any]] = []
            for user_id, notification in chosen:
                query = self._create_filter(
                    user_id, notification, require_email, repeat or step == "either", where
                )
                if step == "new":
                    query.update(updates.collapsible(layout, notification, cutoff, absent=True))
                    found.append((query, updates.push(layout, notification)))
                    continue
                if step == "into":
                    query.update(updates.collapsible(layout, notification, cutoff))
                found.append((query, updates.collapse(layout, notification, cutoff)))
            return found

        into, _, refused = self._write_all(entries, writes(entries, "into"), session)
        if into == len(entries):
            return everyone, refused
        left = [e for e in entries if e[0] not in refused]
        pushed, _, more = self._write_all(left, writes(left, "new"), session)
        refused.update(more)
        if into + pushed == len(entries):
            return everyone, refused
        # A repeat, a user gone or without an address, or a row made, read or deleted
        # between the two writes: who holds theirs, and who can still take it.
        done, takes = self._held(left, session, collapsing=True)
        late = [e for e in left if takes.get(e[0]) and e[0] not in done and e[0] not in refused]
        if late:
            _, written, _ = self._write_all(late, writes(late, "either"), session)
            if written == len(late):
                done |= {user_id for user_id, _ in late}
            else:
                now_done, now_takes = self._held(late, session, collapsing=True)
                done |= now_done
                takes.update(now_takes)
        for user_id, _ in left:
            if user_id not in done and takes.get(user_id) is False:
                refused.setdefault(user_id, self.not_an_array())
        if refused and session is not None:
            # As the server's own refusal would: the caller runs it again without them.
            raise RefusedWrites(refused)
        return done, refused

    def _create_filter(
        self,
        user_id: str,
        notification: Notification,
        require_email: bool,
        repeat: bool,
        where: Document | None,
    ) -> Document:
        query = updates.create_filter(
            self.layout,
            ObjectId(user_id),
            require_email=require_email,
            repeat_of=notification["id"] if repeat else None,
            collapsing=notification.get("collapse_key") is not None,
        )
        if where:
            query.update(where)
        return query

    def _write_all(
        self,
        entries: list[tuple[str, Notification]],
        writes: list[tuple[Document, Any]],
        session: Any,
    ) -> tuple[int, int, dict[str, UserDocumentInvalid]]:
        """Run the writes (one per entry) as one command; return how many documents
        they matched and modified (-1 for both when some were refused) and the users
        whose document refused theirs.

        :raise RefusedWrites: some documents refused, inside a transaction.
        """
        try:
            if len(writes) == 1:
                # The same command on the wire as a bulk write of one, for less of the
                # client's CPU (a single create's path).
                one = self.users.update_one(*writes[0], session=session)
                return one.matched_count, one.modified_count, {}
            requests = [UpdateOne(query, update) for query, update in writes]
            result = self.users.bulk_write(requests, ordered=False, session=session)
            return result.matched_count, result.modified_count, {}
        except OperationFailure as exc:
            if isinstance(exc, BulkWriteError) and exc.details.get("writeConcernErrors"):
                raise  # what was written is not known to be durable: no 2xx (guarded: 503)
            errors: list[Document] = (
                exc.details.get("writeErrors", [])
                if isinstance(exc, BulkWriteError)
                else [{"index": 0, "code": exc.code}]
            )
            if not errors or any(error.get("code") not in DOCUMENT_REFUSALS for error in errors):
                raise  # not the document's refusal: a bug, or the database's own trouble
            refused = {entries[e["index"]][0]: self._refusal(e["code"]) for e in errors}
            log.warning("create: %d writes refused", len(refused))
            if session is not None:
                raise RefusedWrites(refused) from exc
            return -1, -1, refused  # unordered: the others went through

    def _held(
        self, entries: list[tuple[str, Notification]], session: Any, *, collapsing: bool
    ) -> tuple[set[str], dict[str, bool]]:
        """The users that hold their notification (by its id; `collapsing`: or by the
        collapse log), and whether the field of each user found can take one."""
        wanted = {user_id: notification["id"] for user_id, notification in entries}
        held = self._in_batches(
            list(wanted),
            lambda oids: updates.held_ids(self.layout, oids, collapsing=collapsing),
            session,
        )
        done = {
            user_id
            for user_id, doc in held.items()
            if wanted[user_id] in doc["ids"] or _logged(doc, wanted[user_id]) is not None
        }
        return done, {user_id: doc.get("takes", True) for user_id, doc in held.items()}

    @guarded
    def kept_ids(self, wanted: dict[str, str]) -> dict[str, str]:
        """For each user_id: notification_id of `wanted` whose create collapsed, the id
        of the notification it went into (one read per 50 users). A create that made
        its own notification, or whose collapse has left the log, is not there."""
        held = self._in_batches(
            list(wanted), lambda oids: updates.held_ids(self.layout, oids, collapsing=True)
        )
        kept = {user_id: _logged(doc, wanted[user_id]) for user_id, doc in held.items()}
        return {user_id: into for user_id, into in kept.items() if into is not None}

    @guarded
    def why_not_appended(
        self, user_id: str, *, require_email: bool
    ) -> UserDocumentInvalid | UserNotFound | UserHasNoEmail:
        """Why `append` did not write the user's notification (and it is not there)."""
        user = self.users.find_one(
            {"_id": ObjectId(user_id)}, projection={self.field: {"$slice": 1}}
        )
        if user is None:
            return UserNotFound()
        if not isinstance(user.pop(self.field, []), list):
            return self.not_an_array()
        if require_email and not has_email(user):
            return UserHasNoEmail()
        return UserDocumentInvalid("The user's document refused the notification.")

    @guarded
    def mark_read(self, user_id: str, notification_id: str, now: datetime) -> Document:
        """Set is_new to false; reading a read notification is a success too. Returns
        {elements, new, version, changed}.

        :raise UserNotFound: / :raise NotificationNotFound:
        """
        oid, cutoff = ObjectId(user_id), self.layout.cutoff(now)
        query, update = updates.mark_read(self.layout, oid, notification_id, cutoff)
        return self._write_one(query, update, oid, cutoff, must_hold=notification_id)

    @guarded
    def delete(self, user_id: str, notification_id: str, now: datetime) -> Document:
        """Remove one notification; removing one that is gone changes nothing (changed 0).

        :raise UserNotFound:
        """
        oid, cutoff = ObjectId(user_id), self.layout.cutoff(now)
        query, update = updates.delete(self.layout, oid, notification_id, cutoff)
        return self._write_one(query, update, oid, cutoff)

    def _write_one(
        self,
        query: Document,
        update: Document,
        oid: ObjectId,
        cutoff: int | None,
        must_hold: str | None = None,
    ) -> Document:
        """Apply an update that changes at most one element, then read the counts: the
        update's modified count is the number of elements it changed."""
        with self._refusals_of_the_document():
            changed = self.users.update_one(query, update).modified_count
        found = self._state(oid, cutoff, holds=must_hold if not changed else None, prune=True)
        if found is None:
            raise UserNotFound()
        if not changed and must_hold is not None and not found["holds"]:
            raise NotificationNotFound()
        return {**found, "changed": changed}

    @guarded
    def mark_all_read(self, user_id: str, up_to: str | None, now: datetime) -> Document:
        """Mark every notification read, or only `up_to` and the older ones: one update.

        :raise UserNotFound: / :raise NotificationNotFound: `up_to` is not in the array.
        """
        layout, oid, cutoff = self.layout, ObjectId(user_id), self.layout.cutoff(now)
        # One condition on the array (SecantusDB scans the collection for an `$and`): the
        # watermark must be there; without one, something must be unread.
        if up_to is not None:
            query: Document = {"_id": oid, **updates.holding(layout, cutoff, id=up_to)}
        else:
            query = {"_id": oid, **updates.holding(layout, cutoff, is_new=True)}
        return self._rewrite(
            query, updates.read_all(up_to), updates.count_new, oid, cutoff, must_hold=up_to
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
        cutoff = self.layout.cutoff(now)
        return self._rewrite(query, updates.delete_all(only_read), updates.size, oid, cutoff)

    def _rewrite(
        self,
        query: Document,
        new_array: Callable[[str], Any],
        measure: Callable[[Any], Any],
        oid: ObjectId,
        cutoff: int | None,
        must_hold: str | None = None,
    ) -> Document:
        """Rewrite the array where `query` matches (`updates.rewrite`), then read the
        counts and what this write changed; when the query matched nothing (nothing to
        change), answer from the read: changed 0, or why it is a 404."""
        token = new_id()
        pipeline = updates.rewrite(self.layout, cutoff, new_array, measure, token)
        with self._refusals_of_the_document():
            matched = self.users.update_one(query, pipeline).matched_count
        found = self._state(
            oid, cutoff, holds=must_hold, token=token if matched else None, prune=True
        )
        if found is None:
            raise UserNotFound()
        if matched:
            # Our own entry, unless more than LOG_SIZE writes came in between.
            return {**found, "changed": found["changed"] or 0}
        if must_hold is not None and not found["holds"]:
            raise NotificationNotFound()
        return {**found, "changed": 0}

    # -- reads -------------------------------------------------------------------------

    def _state(
        self,
        oid: ObjectId,
        cutoff: int | None,
        holds: str | None = None,
        token: str | None = None,
        prune: bool = False,
        kept_by: str | None = None,
    ) -> Document | None:
        """{elements, new, version, holds, changed, kept} of the user (`updates.state`);
        with `prune` (after a write), expired notifications found are removed."""
        pipeline = updates.state(self.layout, oid, cutoff, holds, token, kept_by)
        for doc in self.users.aggregate(pipeline):
            if prune and doc.pop("expired", False) and cutoff is not None:
                # Not counted nor listed already: the answer stays as read.
                self.users.update_one({"_id": oid}, updates.prune(self.layout, cutoff))
            return {"holds": False, "changed": None, "kept": None, **doc.pop("counts"), **doc}
        return None

    @guarded
    def counts(
        self,
        user_id: str,
        now: datetime,
        *,
        after_write: bool = False,
        kept_by: str | None = None,
    ) -> Document:
        """{elements, new, version, kept}: one small read. `after_write`: the caller has
        just written, so notifications found expired are removed. `kept_by`: a create's
        notification id; `kept` is the id of the one it collapsed into, else None.

        :raise UserNotFound:
        """
        found = self._state(
            ObjectId(user_id), self.layout.cutoff(now), prune=after_write, kept_by=kept_by
        )
        if found is None:
            raise UserNotFound()
        return found

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
        cutoff = self.layout.cutoff(now)
        pipeline = updates.page(
            self.layout, ObjectId(user_id), cutoff, skip, limit, is_new=is_new, key=key
        )
        for result in self.users.aggregate(pipeline):
            counts, found = result["counts"], result["found"]
            matched = found["matched"] if found["matched"] is not None else counts["elements"]
            return {
                **counts,
                "version": result["version"],
                "matched": matched,
                "list": [listed(item) for item in found["list"]],
            }
        raise UserNotFound()

    @guarded
    def find_user(self, user_id: str) -> Document:
        """The user (without notifications).

        :raise UserNotFound:
        """
        projection = {self.field: 0, self.layout.meta: 0}
        user = self.users.find_one({"_id": ObjectId(user_id)}, projection=projection)
        if user is None:
            raise UserNotFound()
        return user

    @guarded
    def find_users(self, user_ids: list[str]) -> dict[str, Document]:
        """The users among `user_ids` that exist (without notifications), by id, with
        `holds_array` saying whether their field can take a notification."""
        return self._in_batches(user_ids, lambda oids: updates.users(self.layout, oids))

    def _in_batches(
        self,
        user_ids: list[str],
        pipeline: Callable[[list[ObjectId]], list[Document]],
        session: Any = None,
    ) -> dict[str, Document]:
        """The users among `user_ids` that exist, as `pipeline(their ids)` shapes them,
        ID_BATCH ids at a time (ids.py says why)."""
        found: dict[str, Document] = {}
        for batch in id_batches(user_ids):
            for doc in self.users.aggregate(pipeline(batch), session=session):
                found[str(doc["_id"])] = doc
        return found

    @guarded
    def has_notification(self, user_id: str, notification_id: str) -> bool:
        """Whether the user's array holds the notification, or the one it collapsed
        into (the sweep of pending emails)."""
        oid = ObjectId(user_id)
        # Two reads rather than an `$or`, which SecantusDB serves with a collection scan.
        for path in (f"{self.field}.id", f"{self.layout.meta}.collapsed.by"):
            if self.users.find_one({"_id": oid, path: notification_id}, {"_id": 1}) is not None:
                return True
        return False

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

    # -- a user's data (user_data.py) --------------------------------------------------

    @guarded
    def held_for(self, user_id: str) -> Document | None:
        """What an export reads of the user's document: `email` and the array (every
        notification stored, as /list shows them), nothing else of the application's
        fields; None when the document is gone."""
        document = self.users.find_one(
            {"_id": ObjectId(user_id)}, projection={"_id": 0, "email": 1, self.field: 1}
        )
        if document is not None and isinstance(document.get(self.field), list):
            document[self.field] = [listed(item) for item in document[self.field]]
        return document

    @guarded
    def erase_notifications(self, user_id: str) -> int:
        """Remove the array and its meta's logs from the user's document (the version
        moves on); return how many notifications the array held just before. The
        document and its other fields (the application's, and the preferences) stay.
        A missing document, or one already erased, changes nothing and answers 0."""
        oid = ObjectId(user_id)
        size = {"$size": updates.items(self.layout)}
        held = next(
            iter(self.users.aggregate([{"$match": {"_id": oid}}, {"$project": {"n": size}}])),
            {"n": 0},
        )["n"]
        meta = self.layout.meta
        # The meta's logs go with the array; its version moves on (it does not restart
        # at 0), so a stream polling versions sees the change however many writes it
        # missed, and an ETag made before never matches again.
        self.users.update_one(
            {"_id": oid, meta: {"$exists": True}},
            {
                "$unset": {
                    self.field: "",
                    f"{meta}.log": "",
                    f"{meta}.collapsed": "",
                    f"{meta}.collapses": "",
                },
                "$inc": {f"{meta}.version": 1},
            },
        )
        # A document with the array but no meta (written before the meta existed).
        self.users.update_one({"_id": oid, meta: {"$exists": False}}, {"$unset": {self.field: ""}})
        return int(held)

    # -- the live stream (stream_watcher.py) ----------------------------------------------------

    @guarded
    def feed_states(self, user_ids: list[str], now: datetime) -> dict[str, Document]:
        """What a stream shows of each of `user_ids` that exists, by id: `version`,
        `elements`, `new`, `items` (the live notifications, newest first) and
        `expires_at` (when the oldest of them expires, with NOTIFICATIONS_TTL_DAYS)."""
        layout = self.layout
        stages = updates.feed(layout, layout.cutoff(now))
        states = {}
        for user_id, doc in self._in_batches(
            user_ids, lambda oids: [{"$match": {"_id": {"$in": oids}}}, *stages]
        ).items():
            items: list[Document] = doc["items"]
            oldest = items[-1].get("timestamp") if items else None
            expires = None
            if layout.ttl_seconds is not None and isinstance(oldest, int):
                expires = oldest + layout.ttl_seconds
            states[user_id] = {
                "version": doc["version"],
                **doc["counts"],
                "items": items,
                "expires_at": expires,
            }
        return states

    @guarded
    def versions(self, user_ids: list[str]) -> dict[str, Any]:
        """The `version` of each of `user_ids` that exists: it moves on every write of
        the inbox (what a stream watches where there are no change streams)."""
        stages = updates.versions(self.layout)
        found = self._in_batches(
            user_ids, lambda oids: [{"$match": {"_id": {"$in": oids}}}, *stages]
        )
        return {u: doc["version"] for u, doc in found.items()}

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
        except OperationFailure as exc:  # WriteError
            if exc.code in DOCUMENT_REFUSALS:
                raise self._refusal(exc.code) from exc
            raise

    def _refusal(self, code: int | None) -> UserDocumentInvalid:
        """The 409 for the server's refusal (`code`) of a write to the user's document."""
        if code == BAD_VALUE:
            return self.not_an_array()
        if code in TOO_LARGE:
            return UserDocumentInvalid(
                "The user's document is too large to take another notification."
            )
        return UserDocumentInvalid("The user's document cannot take a notification.")

    def not_an_array(self) -> UserDocumentInvalid:
        return UserDocumentInvalid(
            f"The user's {self.field!r} field is not an array.",
            details=[{"field": self.field, "problem": "is not an array"}],
        )


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


def _logged(doc: Document, notification_id: str) -> str | None:
    """The id the collapse log of `doc` (`updates.held_ids`) gives `notification_id`."""
    for entry in doc.get("collapsed", ()):
        if isinstance(entry, dict) and entry.get("by") == notification_id:
            into = entry.get("id")
            return into if isinstance(into, str) else None
    return None


def has_email(user: Document) -> bool:
    """Whether the user has an address to send to: the rule of the create's query too."""
    address = user.get("email")
    return isinstance(address, str) and address != ""

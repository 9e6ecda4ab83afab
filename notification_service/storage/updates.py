"""Pure builders of the queries, updates and pipelines that the inbox store runs.

Each function returns a document for pymongo and touches no database, so the shapes are
tested without one (tests/test_updates.py). The forms are those both SecantusDB and
mongod serve well:

- the filter of a write is `_id` plus plain field conditions: SecantusDB answers an
  `$or`, `$and` or `$nor` beside `_id` with a collection scan (24 ms against 1 ms at
  1,000 users), and `findAndModify` with one too (100 ms against 5 ms at 2,000 users),
  so a write that must answer counts is an update, then a read by `_id`;
- creating and marking one read are plain update operators (`$push` with
  `$each`/`$position`/`$slice`, a positional `$set`, `$pull`): the database applies
  them without evaluating an expression per element, which costs SecantusDB about half
  of what the former update pipelines did;
- the counts are computed when read (`$size` of the array and of its unread ones), as
  mongod does in C++ over at most NOTIFICATIONS_LIMIT elements: stored counts doubled
  the database's work on every write and did not make reads faster on SecantusDB;
- `"$F.id"` (a path through an array of documents) evaluates to nothing on SecantusDB,
  so ids are taken with `$map`; `$slice` gets a positive count;
- a collapsing create (`collapse`) must find, move and change an element in one write,
  which no update operator does: it is the one create that runs a pipeline. It is one
  `$replaceWith` stage, so the element it finds is computed once, and the meta is
  merged with `$mergeObjects` (an object literal given to `$set` is merged by mongod,
  but replaces the embedded document on SecantusDB).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import ObjectId

from ..config import Config
from ..schemas import Notification
from .ids import matching

Document = dict[str, Any]
LOG_SIZE = 8  # rewrites whose change a user's document remembers (see `rewrite`)
# Collapses a user's document remembers (see `collapse`): more than the creates that
# can collapse into one user between a write and its own read of the counts (the web
# threads of a few processes), and a retry's worth of a busy thread. About 2 KB.
COLLAPSE_LOG_SIZE = 32


@dataclass(frozen=True)
class Layout:
    """Where a user's notifications live in their document, and how many it keeps."""

    field: str  # the array, newest first
    meta: str  # beside it: {version, log}, moved by every write
    limit: int
    ttl_seconds: int | None

    @classmethod
    def of(cls, config: Config) -> Layout:
        days = config.notifications_ttl_days
        field = config.notifications_field
        return cls(
            field, f"{field}_meta", config.notifications_limit, days * 86400 if days else None
        )

    def cutoff(self, now: datetime) -> int | None:
        """Notifications stamped at or before this second have expired (None: never)."""
        if self.ttl_seconds is None:
            return None
        return int(now.timestamp()) - self.ttl_seconds


# -- expressions ---------------------------------------------------------------------


def items(layout: Layout) -> Document:
    """The array; a missing field, or one that is not an array, reads as empty (the
    writes refuse the latter: 409)."""
    return {"$cond": [{"$isArray": f"${layout.field}"}, f"${layout.field}", []]}


def live(layout: Layout, cutoff: int | None) -> Any:
    """The array without the notifications that have expired."""
    if cutoff is None:
        return items(layout)
    return {
        "$filter": {
            "input": items(layout),
            "as": "n",
            "cond": {"$gt": ["$$n.timestamp", {"$literal": cutoff}]},
        }
    }


def count_new(array: Any) -> Document:
    return {
        "$size": {"$filter": {"input": array, "as": "n", "cond": {"$eq": ["$$n.is_new", True]}}}
    }


def version(layout: Layout) -> Document:
    return {"$ifNull": [f"${layout.meta}.version", 0]}


def ids(array: Any) -> Document:
    return {"$map": {"input": array, "as": "n", "in": "$$n.id"}}


def _counts(layout: Layout, cutoff: int | None) -> Document:
    return {
        "$let": {
            "vars": {"live": live(layout, cutoff)},
            "in": {"elements": {"$size": "$$live"}, "new": count_new("$$live")},
        }
    }


def holding(layout: Layout, cutoff: int | None, **fields: Any) -> Document:
    """A filter for a live (unexpired) notification with these fields."""
    if cutoff is not None:
        fields["timestamp"] = {"$gt": cutoff}
    return {layout.field: {"$elemMatch": fields}}


# -- reads ---------------------------------------------------------------------------


def state(
    layout: Layout,
    oid: ObjectId,
    cutoff: int | None,
    holds: str | None = None,
    token: str | None = None,
    kept_by: str | None = None,
) -> list[Document]:
    """The user's {counts: {elements, new}, version}; with `holds`, whether that
    notification is live in the array; with `token`, what the rewrite logged under it
    changed (`changed`, null when it is no longer in the log); with `kept_by`, the id
    of the notification that create collapsed into (`kept`, null when it made its own,
    or when no longer in the log); with a TTL, whether the array holds notifications
    that have expired (`expired`: see `prune`)."""
    shown: Document = {"_id": 0, "counts": _counts(layout, cutoff), "version": version(layout)}
    if cutoff is not None:
        shown["expired"] = {"$gt": [{"$size": items(layout)}, {"$size": live(layout, cutoff)}]}
    if holds is not None:
        shown["holds"] = {"$in": [{"$literal": holds}, ids(live(layout, cutoff))]}
    if token is not None:
        mine = {
            "$filter": {
                "input": _log(layout),
                "as": "e",
                "cond": {"$eq": ["$$e.by", {"$literal": token}]},
            }
        }
        changed = {"$map": {"input": mine, "as": "e", "in": "$$e.changed"}}
        shown["changed"] = {"$ifNull": [{"$arrayElemAt": [changed, 0]}, None]}
    if kept_by is not None:
        into = {
            "$filter": {
                "input": collapse_log(layout),
                "as": "e",
                "cond": {"$eq": ["$$e.by", {"$literal": kept_by}]},
            }
        }
        kept = {"$map": {"input": into, "as": "e", "in": "$$e.id"}}
        shown["kept"] = {"$ifNull": [{"$arrayElemAt": [kept, 0]}, None]}
    return [{"$match": {"_id": oid}}, {"$project": shown}]


def page(
    layout: Layout,
    oid: ObjectId,
    cutoff: int | None,
    skip: int,
    limit: int,
    *,
    is_new: bool | None = None,
    key: str | None = None,
) -> list[Document]:
    """Counts and one page, newest first; with a filter, the page is of the matching
    ones and `found.matched` says how many match."""
    array = live(layout, cutoff)
    conditions = []
    if is_new is not None:
        conditions.append({"$eq": ["$$n.is_new", is_new]})
    if key is not None:
        conditions.append({"$eq": ["$$n.key", {"$literal": key}]})
    if conditions:
        array = {"$filter": {"input": array, "as": "n", "cond": {"$and": conditions}}}
    # $slice's count must be positive, so a zero limit asks for the counts alone.
    # $slice takes 32-bit arguments; no array is anywhere near that long, so a larger
    # skip gives the same (empty) page instead of a server error.
    position = min(skip, 2**31 - 1)
    shown: Any = {"$slice": ["$$m", position, limit]} if limit > 0 else {"$literal": []}
    return [
        {"$match": {"_id": oid}},
        {
            "$project": {
                "_id": 0,
                "counts": _counts(layout, cutoff),
                "version": version(layout),
                "found": {
                    "$let": {
                        "vars": {"m": array},
                        "in": {"matched": {"$size": "$$m"} if conditions else None, "list": shown},
                    }
                },
            }
        },
    ]


def feed(layout: Layout, cutoff: int | None) -> list[Document]:
    """The stages of what a stream shows of a user: counts, version, live items."""
    return [
        {
            "$project": {
                "counts": _counts(layout, cutoff),
                "version": version(layout),
                "items": live(layout, cutoff),
            }
        }
    ]


def versions(layout: Layout) -> list[Document]:
    return [{"$project": {"version": version(layout)}}]


def takes(layout: Layout) -> Document:
    """Whether the user's field can take a notification: an array, or not there."""
    return {
        "$or": [
            {"$isArray": f"${layout.field}"},
            {"$eq": [{"$type": f"${layout.field}"}, "missing"]},
        ]
    }


def users(layout: Layout, oids: list[ObjectId]) -> list[Document]:
    """The users (without notifications), with `holds_array`: whether their field can
    take a notification."""
    return [
        {"$match": {"_id": matching(oids)}},
        {"$set": {"holds_array": takes(layout)}},
        {"$project": {layout.field: 0, layout.meta: 0}},
    ]


def held_ids(layout: Layout, oids: list[ObjectId], *, collapsing: bool = False) -> list[Document]:
    """Each user's notification ids; `collapsing`: also the collapse log (`collapsed`,
    [{by, id}]) and whether the field can take a notification (`takes`)."""
    shown: Document = {"ids": ids(items(layout))}
    if collapsing:
        shown["collapsed"] = collapse_log(layout)
        shown["takes"] = takes(layout)
    return [{"$match": {"_id": {"$in": oids}}}, {"$project": shown}]


# -- writes --------------------------------------------------------------------------


def create_filter(
    layout: Layout,
    oid: ObjectId,
    *,
    require_email: bool,
    repeat_of: str | None,
    collapsing: bool = False,
) -> Document:
    """The user a create writes to: with `require_email`, only one with an address;
    with `repeat_of`, only one that does not hold that notification yet (a retry), nor,
    for a `collapsing` create, has logged it as collapsed into another."""
    query: Document = {"_id": oid}
    if require_email:
        query["email"] = {"$type": "string", "$ne": ""}
    if repeat_of is not None:
        query[f"{layout.field}.id"] = {"$ne": repeat_of}
        if collapsing:
            # Plain conditions on two paths: no `$and` (see the module's docstring).
            query[f"{layout.meta}.collapsed.by"] = {"$ne": repeat_of}
    return query


def bump(layout: Layout) -> Document:
    """What every write adds: the version a polling stream watches moves on."""
    return {"$inc": {f"{layout.meta}.version": 1}}


def push(layout: Layout, notification: Notification) -> Document:
    """Prepend the notification, keeping the newest `limit`: one atomic update.

    The operators take the notification as a value, never as an expression, so a
    string like "$email" in its data is stored as given. A field that is not an array
    makes the server refuse the update (code 2), leaving the document as it was.
    """
    return {
        "$push": {layout.field: {"$each": [notification], "$position": 0, "$slice": layout.limit}},
        **bump(layout),
    }


def collapse_log(layout: Layout) -> Document:
    """The collapse log, [{by: a create's own notification id, id: the notification it
    collapsed into}]: the last COLLAPSE_LOG_SIZE collapses, in a ring (see `collapse`)."""
    logged = f"${layout.meta}.collapsed"
    return {"$cond": [{"$isArray": logged}, logged, []]}


def collapsible(
    layout: Layout, notification: Notification, cutoff: int | None, *, absent: bool = False
) -> Document:
    """A filter for a user whose array holds the unread, live notification that
    `notification` collapses into (`collapse`); with `absent`, one whose array holds
    none (or is missing, or is not an array: the `$push` then refuses it)."""
    found = holding(
        layout,
        cutoff,
        collapse_key=notification["collapse_key"],
        key=notification["key"],
        is_new=True,
    )
    return {layout.field: {"$not": found[layout.field]}} if absent else found


def collapse(layout: Layout, notification: Notification, cutoff: int | None) -> list[Document]:
    """An update pipeline for a create with a `collapse_key`: the newest unread, live
    notification of the same `key` and `collapse_key` keeps its id, moves to the top,
    counts one more and takes this one's `data`, `target_id` and `timestamp`; without
    one, `notification` is prepended. Capped at `limit` either way; the version moves.

    A collapse is logged under the notification's own id (`by`), the last
    COLLAPSE_LOG_SIZE (`collapses` counts them all): a retry's filter skips a write
    already made (`create_filter`), and the counts read that follows tells which
    notification it went into (`state`).

    Written where `collapsible` finds the row, it collapses; without a filter, it
    collapses or prepends, atomically, whichever the array calls for (the store's
    fallback: a plain `$push` is cheaper when there is no row). A field that is neither
    an array nor missing is left as it is, and so is the whole document (matched, not
    modified): the caller reports the refusal, as the server's own refusal of a `$push`
    is reported.
    """
    field, meta = layout.field, layout.meta
    same = [
        # The rarest match first: `$and` stops at the first false.
        {"$eq": ["$$n.collapse_key", {"$literal": notification["collapse_key"]}]},
        {"$eq": ["$$n.key", {"$literal": notification["key"]}]},
        {"$eq": ["$$n.is_new", True]},
    ]
    if cutoff is not None:
        same.append({"$gt": ["$$n.timestamp", {"$literal": cutoff}]})
    # The first match only (`limit`): the others need not be evaluated, and a busy
    # thread's row is near the top. Its position is then found by plain equality
    # (`$indexOfArray`), and it is cut out with `$slice`: no expression per element.
    first = {"$filter": {"input": "$$a", "as": "n", "cond": {"$and": same}, "limit": 1}}
    found = {"$arrayElemAt": [first, 0]}
    changes = {key: notification[key] for key in ("data", "target_id", "timestamp")}
    merged = {
        "$mergeObjects": [
            "$$f",
            {"$literal": changes},
            {"count": {"$add": [{"$ifNull": ["$$f.count", 1]}, 1]}},
        ]
    }
    moved = {
        "$let": {
            "vars": {"i": {"$indexOfArray": ["$$a", "$$f"]}},
            "in": {
                "$concatArrays": [
                    [merged],
                    # Before it (none at 0: the two-argument form takes a count of 0),
                    # and after it (the three-argument form wants a positive count).
                    {"$slice": ["$$a", "$$i"]},
                    {"$slice": ["$$a", {"$add": ["$$i", 1]}, layout.limit]},
                ]
            },
        }
    }
    array = {
        "$cond": [
            {"$eq": ["$$f", None]},
            # As a literal: a string like "$email" in its data is stored as given.
            {"$concatArrays": [[{"$literal": notification}], "$$a"]},
            moved,
        ]
    }
    # The log is a ring: collapse number c writes slot c mod COLLAPSE_LOG_SIZE, so a
    # collapse changes one entry, where prepending would shift them all (SecantusDB
    # diffs what a pipeline changed, element by element, for its change events).
    count = {"$ifNull": [f"${meta}.collapses", 0]}
    entry = {"by": {"$literal": notification["id"]}, "id": "$$f.id"}
    ring = {
        "$let": {
            "vars": {"log": collapse_log(layout), "at": {"$mod": [count, COLLAPSE_LOG_SIZE]}},
            "in": {
                "$cond": [
                    {"$lte": [{"$size": "$$log"}, "$$at"]},
                    {"$concatArrays": ["$$log", [entry]]},
                    {
                        "$concatArrays": [
                            {"$slice": ["$$log", "$$at"]},
                            [entry],
                            {"$slice": ["$$log", {"$add": ["$$at", 1]}, COLLAPSE_LOG_SIZE]},
                        ]
                    },
                ]
            },
        }
    }
    moved_on = {"version": {"$add": [version(layout), 1]}}
    logged = {
        "$cond": [
            {"$eq": ["$$f", None]},
            moved_on,
            {**moved_on, "collapsed": ring, "collapses": {"$add": [count, 1]}},
        ]
    }
    changed = {
        "$mergeObjects": [
            "$$ROOT",
            {
                field: {"$slice": [array, layout.limit]},
                # Merged, so the rewrite log (and anything else kept there) stays.
                meta: {
                    "$mergeObjects": [
                        {"$cond": [{"$eq": [{"$type": f"${meta}"}, "object"]}, f"${meta}", {}]},
                        logged,
                    ]
                },
            },
        ]
    }
    return [
        {
            "$replaceWith": {
                "$cond": [
                    takes(layout),
                    {
                        "$let": {
                            "vars": {"a": items(layout)},
                            "in": {
                                # `$ifNull`: "none found" is null, not missing.
                                "$let": {"vars": {"f": {"$ifNull": [found, None]}}, "in": changed}
                            },
                        }
                    },
                    "$$ROOT",
                ]
            }
        }
    ]


def prune(layout: Layout, cutoff: int) -> Document:
    """Remove the notifications that have expired (NOTIFICATIONS_TTL_DAYS).

    Run after a write whose counts read found some (`state`'s `expired`), rather than
    inside every create: `$push` cannot also remove from the array it prepends to, and
    the pipeline that could costs every create twice what `$push` does.
    """
    return {"$pull": {layout.field: {"timestamp": {"$lte": cutoff}}}, **bump(layout)}


def mark_read(
    layout: Layout, oid: ObjectId, notification_id: str, cutoff: int | None
) -> tuple[Document, Document]:
    """The filter and update that mark one unread notification read (positional `$`:
    the element the `$elemMatch` found)."""
    query = {"_id": oid, **holding(layout, cutoff, id=notification_id, is_new=True)}
    return query, {"$set": {f"{layout.field}.$.is_new": False}, **bump(layout)}


def delete(
    layout: Layout, oid: ObjectId, notification_id: str, cutoff: int | None
) -> tuple[Document, Document]:
    query = {"_id": oid, **holding(layout, cutoff, id=notification_id)}
    return query, {"$pull": {layout.field: {"id": notification_id}}, **bump(layout)}


def _log(layout: Layout) -> Document:
    log_field = f"${layout.meta}.log"
    return {"$cond": [{"$isArray": log_field}, log_field, []]}


def rewrite(
    layout: Layout, cutoff: int | None, new_array: Any, measure: Any, token: str
) -> list[Document]:
    """An update pipeline for the writes that change many elements at once (read-all,
    delete-all): the array becomes `new_array("$$live")` (expired ones dropped), and how
    much `measure` (a count of an array) went down is logged under `token`.

    An update answers how many documents it changed, not how many elements: the read
    that follows (`state` with `token`) picks this write's own entry out of the last
    LOG_SIZE, so two concurrent writes never take each other's number.
    """
    alive = live(layout, cutoff)
    meta = f"${layout.meta}"
    return [
        {
            "$set": {
                layout.field: {"$let": {"vars": {"live": alive}, "in": new_array("$$live")}},
                layout.meta: {
                    "version": {"$add": [version(layout), 1]},
                    "before": {"$let": {"vars": {"live": alive}, "in": measure("$$live")}},
                    "log": _log(layout),
                    # Carried over: SecantusDB replaces the embedded document (below).
                    # Missing stays missing (a field of a missing value is left out).
                    "collapsed": f"{meta}.collapsed",
                    "collapses": f"{meta}.collapses",
                },
            }
        },
        {
            "$set": {
                layout.meta: {
                    "version": f"{meta}.version",
                    "collapsed": f"{meta}.collapsed",
                    "collapses": f"{meta}.collapses",
                    "log": {
                        "$slice": [
                            {
                                "$concatArrays": [
                                    [
                                        {
                                            "by": {"$literal": token},
                                            "changed": {
                                                "$subtract": [
                                                    f"{meta}.before",
                                                    measure(f"${layout.field}"),
                                                ]
                                            },
                                        }
                                    ],
                                    f"{meta}.log",
                                ]
                            },
                            LOG_SIZE,
                        ]
                    },
                }
            }
        },
        # mongod merges an object literal given to `$set` into an embedded document
        # already there (SecantusDB replaces it), so the scratch field is removed.
        {"$unset": f"{layout.meta}.before"},
    ]


def size(array: Any) -> Document:
    return {"$size": array}


def read_all(up_to: str | None) -> Any:
    """`new_array` of `rewrite` for read-all: every one read, or from the watermark's
    position on (newest first: it and the older ones)."""

    def read_them(array: str) -> Any:
        start: Any = 0
        if up_to is not None:
            start = {"$indexOfArray": [ids(array), {"$literal": up_to}]}
        return {
            "$let": {
                "vars": {"start": start},
                "in": {
                    "$map": {
                        "input": {"$range": [0, {"$size": array}]},
                        "as": "i",
                        "in": {
                            "$let": {
                                "vars": {"n": {"$arrayElemAt": [array, "$$i"]}},
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

    return read_them


def delete_all(only_read: bool) -> Any:
    """`new_array` of `rewrite` for delete-all: nothing, or the unread ones."""

    def kept(array: str) -> Any:
        if not only_read:
            return {"$literal": []}
        return {"$filter": {"input": array, "as": "n", "cond": {"$eq": ["$$n.is_new", True]}}}

    return kept

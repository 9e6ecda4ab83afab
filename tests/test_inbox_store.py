"""The users' notification arrays (InboxStore), against a real SecantusDB server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from bson import ObjectId

from notification_service.config import Config
from notification_service.errors import NotificationNotFound, UserHasNoEmail, UserNotFound
from notification_service.schemas import Notification
from notification_service.storage import updates
from notification_service.storage.inbox_store import InboxStore
from notification_service.storage.mongo_connector import connect, database

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def notification(
    user_id: str,
    n: int = 0,
    is_new: bool = True,
    *,
    collapse_key: str | None = None,
    key: str = "new_post",
) -> Notification:
    return {
        "id": str(ObjectId()),
        "timestamp": n,
        "is_new": is_new,
        "user_id": user_id,
        "key": key,
        "target_id": None,
        "data": {"n": n},
        "count": 1,
        "collapse_key": collapse_key,
    }


def thread(user_id: str, n: int, **fields: Any) -> Notification:
    """A notification of the collapse key "thread-1"."""
    return notification(user_id, n, collapse_key="thread-1", **fields)


def stored(db: Any, user_id: str) -> list[dict[str, Any]]:
    return list(db.users.find_one({"_id": ObjectId(user_id)})["notifications"])


@pytest.fixture
def store(config: Config) -> Iterator[InboxStore]:
    client = connect(config)
    yield InboxStore(database(client, config), config)
    client.close()


def test_append_writes_each_user_and_says_who(
    store: InboxStore, user_id: str, make_user: Callable[..., str]
) -> None:
    other, missing = make_user(), str(ObjectId())
    entries = [(u, notification(u)) for u in (user_id, missing, other)]
    done, refused = store.append(entries, NOW, require_email=True)
    assert (done, refused) == ({user_id, other}, {})
    assert store.counts(other, NOW)["elements"] == 1


def test_append_of_a_repeat_writes_nothing_twice(store: InboxStore, user_id: str) -> None:
    entries = [(user_id, notification(user_id))]
    store.append(entries, NOW, require_email=False)
    done, _ = store.append(entries, NOW, require_email=False, repeat=True)
    assert done == {user_id}
    assert store.counts(user_id, NOW)["elements"] == 1


def test_append_refuses_a_field_that_is_not_an_array_and_leaves_it(
    store: InboxStore, db: Any, make_user: Callable[..., str], user_id: str
) -> None:
    odd = make_user(notifications="not a list")
    done, refused = store.append(
        [(u, notification(u)) for u in (odd, user_id)], NOW, require_email=False
    )
    assert done == {user_id}
    assert refused[odd].details == [{"field": "notifications", "problem": "is not an array"}]
    assert db.users.find_one({"_id": ObjectId(odd)})["notifications"] == "not a list"


def test_append_capped_keeps_newest_first_within_the_cap(
    make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    config = make_config(notifications_limit=4)
    client = connect(config)
    try:
        store = InboxStore(database(client, config), config)
        for n in range(6):
            store.append([(user_id, notification(user_id, n))], NOW, require_email=False)
        page = store.inbox_page(user_id, 0, 10, NOW)
    finally:
        client.close()
    assert [item["data"]["n"] for item in page["list"]] == [5, 4, 3, 2]
    assert page["elements"] == 4


def test_append_leaves_out_missing_users_and_those_without_email_and_says_why(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    missing = str(ObjectId())
    assert store.append([(missing, notification(missing))], NOW, require_email=False) == (
        set(),
        {},
    )
    assert isinstance(store.why_not_appended(missing, require_email=False), UserNotFound)
    no_email = make_user(email=None)
    done, _ = store.append([(no_email, notification(no_email))], NOW, require_email=True)
    assert done == set()
    assert isinstance(store.why_not_appended(no_email, require_email=True), UserHasNoEmail)
    assert db.users.find_one({"_id": ObjectId(no_email)}) == {"_id": ObjectId(no_email)}
    assert db.users.count_documents({}) == 1


def test_ensure_user_creates_a_profile_once_and_never_changes_one(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    new = str(ObjectId())
    store.ensure_user(new, "test@example.com")
    store.ensure_user(new, "other@example.com")
    assert db.users.find_one({"_id": ObjectId(new)}, {"_id": 0}) == {
        "email": "test@example.com",
        "notifications": [],
    }
    no_email = make_user(email=None, name="kept")
    store.ensure_user(no_email, "test@example.com")
    assert db.users.find_one({"_id": ObjectId(no_email)}, {"_id": 0}) == {"name": "kept"}


def test_inbox_page_counts_unread(store: InboxStore, user_id: str) -> None:
    for n in range(5):
        store.append(
            [(user_id, notification(user_id, n, is_new=n % 2 == 0))], NOW, require_email=False
        )
    page = store.inbox_page(user_id, 1, 2, NOW)
    assert (page["elements"], page["new"]) == (5, 3)
    assert [item["data"]["n"] for item in page["list"]] == [3, 2]


def test_mark_read_distinguishes_user_and_notification(store: InboxStore, user_id: str) -> None:
    item = notification(user_id)
    store.append([(user_id, item)], NOW, require_email=False)
    store.mark_read(user_id, item["id"], NOW)
    store.mark_read(user_id, item["id"], NOW)
    assert store.inbox_page(user_id, 0, 1, NOW)["new"] == 0
    with pytest.raises(NotificationNotFound):
        store.mark_read(user_id, str(ObjectId()), NOW)
    with pytest.raises(UserNotFound):
        store.mark_read(str(ObjectId()), item["id"], NOW)


# -- collapse keys -----------------------------------------------------------------------


def test_a_collapse_updates_the_unread_one_in_place_and_moves_it_to_the_top(
    store: InboxStore, db: Any, user_id: str
) -> None:
    first = thread(user_id, 1)
    store.append([(user_id, first)], NOW, require_email=False)
    store.append([(user_id, notification(user_id, 2))], NOW, require_email=False)
    later = thread(user_id, 3)
    later["target_id"] = "0" * 24
    done, refused = store.append([(user_id, later)], NOW, require_email=False)
    assert (done, refused) == ({user_id}, {})
    state = store.counts(user_id, NOW, after_write=True, kept_by=later["id"])
    assert state["kept"] == first["id"]
    assert (state["elements"], state["new"]) == (2, 2)  # nothing added
    top, other = stored(db, user_id)
    assert top == {**first, "count": 2, "data": {"n": 3}, "timestamp": 3, "target_id": "0" * 24}
    assert other["data"] == {"n": 2}


@pytest.mark.parametrize("position", [0, 1, 3])
def test_a_collapse_keeps_the_others_in_order_wherever_its_row_is(
    store: InboxStore, db: Any, user_id: str, position: int
) -> None:
    row = thread(user_id, 10)
    others = [notification(user_id, n) for n in range(3)]
    array = [*others[:position], row, *others[position:]]
    db.users.update_one({"_id": ObjectId(user_id)}, {"$set": {"notifications": array}})
    store.append([(user_id, thread(user_id, 11))], NOW, require_email=False)
    assert [n["id"] for n in stored(db, user_id)] == [row["id"], *(n["id"] for n in others)]


def test_a_create_that_collapses_into_nothing_is_its_own_and_logs_nothing(
    store: InboxStore, db: Any, user_id: str
) -> None:
    first = thread(user_id, 1)
    store.append([(user_id, first)], NOW, require_email=False)
    assert store.counts(user_id, NOW, kept_by=first["id"])["kept"] is None
    assert stored(db, user_id) == [first]
    # A plain `$push` made it: no pipeline, no log.
    assert db.users.find_one({"_id": ObjectId(user_id)})["notifications_meta"] == {"version": 1}


def test_a_collapsing_create_makes_the_array_of_a_user_without_one(
    store: InboxStore, db: Any, make_user: Callable[..., str]
) -> None:
    bare = make_user()
    first = thread(bare, 1)
    assert store.append([(bare, first)], NOW, require_email=True) == ({bare}, {})
    assert stored(db, bare) == [first]


class Racing(InboxStore):
    """The store, with other writes landing after its own first writes, one each."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.between: list[Callable[[], None]] = []
        self._outer = True

    def _write_all(self, *args: Any, **kwargs: Any) -> Any:
        result = super()._write_all(*args, **kwargs)
        if self.between and self._outer:  # not after the other writes' own
            self._outer = False
            try:
                self.between.pop(0)()
            finally:
                self._outer = True
        return result


@pytest.mark.parametrize("read", [False, True])
def test_a_row_made_between_the_two_writes_still_counts_the_create_once(
    config: Config, db: Any, user_id: str, read: bool
) -> None:
    client = connect(config)
    try:
        store = Racing(database(client, config), config)
        row = thread(user_id, 1)
        # After its first write (no row to collapse into), another create makes one;
        # then, after its second (not made: the row is there), the row may be read.
        store.between = [lambda: store.append([(user_id, row)], NOW, require_email=False)]
        if read:
            store.between.append(lambda: store.mark_read(user_id, row["id"], NOW))
        mine = thread(user_id, 2)
        assert store.append([(user_id, mine)], NOW, require_email=False) == ({user_id}, {})
        kept = store.counts(user_id, NOW, kept_by=mine["id"])["kept"]
    finally:
        client.close()
    if not read:  # into the row that came
        assert kept == row["id"]
        assert [(n["id"], n["count"]) for n in stored(db, user_id)] == [(row["id"], 2)]
    else:  # the row was read before its third write: a new one
        assert kept is None
        assert [(n["id"], n["count"], n["is_new"]) for n in stored(db, user_id)] == [
            (mine["id"], 1, True),
            (row["id"], 1, False),
        ]


def test_a_read_one_is_not_collapsed_into(store: InboxStore, db: Any, user_id: str) -> None:
    first = thread(user_id, 1)
    store.append([(user_id, first)], NOW, require_email=False)
    store.mark_read(user_id, first["id"], NOW)
    second = thread(user_id, 2)
    store.append([(user_id, second)], NOW, require_email=False)
    assert store.counts(user_id, NOW, kept_by=second["id"])["kept"] is None
    assert [(n["id"], n["count"], n["is_new"]) for n in stored(db, user_id)] == [
        (second["id"], 1, True),
        (first["id"], 1, False),
    ]


def test_another_key_or_collapse_key_is_not_collapsed_into(
    store: InboxStore, db: Any, user_id: str
) -> None:
    store.append([(user_id, thread(user_id, 1, key="new_message"))], NOW, require_email=False)
    store.append(
        [(user_id, notification(user_id, 2, collapse_key="thread-2"))], NOW, require_email=False
    )
    store.append([(user_id, notification(user_id, 3))], NOW, require_email=False)
    store.append([(user_id, thread(user_id, 4))], NOW, require_email=False)
    assert [n["count"] for n in stored(db, user_id)] == [1, 1, 1, 1]
    assert store.counts(user_id, NOW)["elements"] == 4


def test_an_expired_one_is_not_collapsed_into(
    make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    config = make_config(notifications_ttl_days=1)
    client = connect(config)
    try:
        store = InboxStore(database(client, config), config)
        stamp = int(NOW.timestamp())
        old = thread(user_id, stamp - 2 * 86400)
        store.append([(user_id, old)], NOW, require_email=False)
        new = thread(user_id, stamp)
        store.append([(user_id, new)], NOW, require_email=False)
        state = store.counts(user_id, NOW, after_write=True, kept_by=new["id"])
    finally:
        client.close()
    assert state["kept"] is None
    assert (state["elements"], state["new"]) == (1, 1)
    assert [n["id"] for n in stored(db, user_id)] == [new["id"]]  # the expired one pruned


def test_a_collapse_keeps_the_cap(
    make_config: Callable[..., Config], db: Any, user_id: str
) -> None:
    config = make_config(notifications_limit=3)
    client = connect(config)
    try:
        store = InboxStore(database(client, config), config)
        first = thread(user_id, 0)
        store.append([(user_id, first)], NOW, require_email=False)
        for n in range(1, 4):
            store.append([(user_id, notification(user_id, n))], NOW, require_email=False)
        # `first` was capped off: a new one, the cap holds.
        store.append([(user_id, thread(user_id, 4))], NOW, require_email=False)
        store.append([(user_id, thread(user_id, 5))], NOW, require_email=False)
        page = store.inbox_page(user_id, 0, 10, NOW)
    finally:
        client.close()
    assert [(n["data"]["n"], n["count"]) for n in page["list"]] == [(5, 2), (3, 1), (2, 1)]
    assert (page["elements"], page["new"]) == (3, 3)


def test_a_repeated_collapse_counts_once_and_names_the_same_kept_one(
    store: InboxStore, db: Any, user_id: str
) -> None:
    first = thread(user_id, 1)
    store.append([(user_id, first)], NOW, require_email=False)
    again = thread(user_id, 2)
    for _ in range(3):
        done, _ = store.append([(user_id, again)], NOW, require_email=False, repeat=True)
        assert done == {user_id}
        assert store.counts(user_id, NOW, kept_by=again["id"])["kept"] == first["id"]
    assert [n["count"] for n in stored(db, user_id)] == [2]
    # A fan-out's read of the same log.
    assert store.kept_ids({user_id: again["id"], "0" * 24: again["id"]}) == {user_id: first["id"]}


def test_a_repeated_create_that_made_its_own_is_not_written_twice(
    store: InboxStore, db: Any, user_id: str
) -> None:
    first = thread(user_id, 1)
    for _ in range(2):
        done, _ = store.append([(user_id, first)], NOW, require_email=False, repeat=True)
        assert done == {user_id}
    assert stored(db, user_id) == [first]


def test_a_collapse_into_a_field_that_is_not_an_array_is_refused_and_changes_nothing(
    store: InboxStore, db: Any, make_user: Callable[..., str], user_id: str
) -> None:
    odd = make_user(notifications="not a list", notifications_meta={"version": 4})
    before = db.users.find_one({"_id": ObjectId(odd)})
    done, refused = store.append([(odd, thread(odd, 1))], NOW, require_email=False)
    assert done == set()
    assert refused[odd].details == [{"field": "notifications", "problem": "is not an array"}]
    done, refused = store.append(
        [(u, thread(u, 1)) for u in (odd, user_id)], NOW, require_email=False
    )
    assert (done, set(refused)) == ({user_id}, {odd})
    assert db.users.find_one({"_id": ObjectId(odd)}) == before


def test_read_all_and_delete_all_keep_the_collapse_log(
    store: InboxStore, db: Any, user_id: str
) -> None:
    store.append([(user_id, thread(user_id, 1))], NOW, require_email=False)
    again = thread(user_id, 2)
    store.append([(user_id, again)], NOW, require_email=False)
    store.mark_all_read(user_id, None, NOW)
    store.delete_all(user_id, True, NOW)
    meta = db.users.find_one({"_id": ObjectId(user_id)})["notifications_meta"]
    assert set(meta) == {"version", "log", "collapsed", "collapses"}
    assert [entry["by"] for entry in meta["collapsed"]] == [again["id"]]
    assert meta["collapses"] == 1
    # So a late retry of it still counts once (and makes nothing new).
    store.append([(user_id, again)], NOW, require_email=False, repeat=True)
    assert stored(db, user_id) == []


def test_the_collapse_log_keeps_the_last_ones_in_a_ring(
    store: InboxStore, db: Any, user_id: str
) -> None:
    first = thread(user_id, 0)
    store.append([(user_id, first)], NOW, require_email=False)
    made = [thread(user_id, n) for n in range(1, updates.COLLAPSE_LOG_SIZE + 4)]
    for item in made:
        store.append([(user_id, item)], NOW, require_email=False)
    meta = db.users.find_one({"_id": ObjectId(user_id)})["notifications_meta"]
    assert meta["collapses"] == len(made)
    assert {e["by"] for e in meta["collapsed"]} == {n["id"] for n in made[3:]}
    assert {e["id"] for e in meta["collapsed"]} == {first["id"]}
    assert store.kept_ids({user_id: made[-1]["id"]}) == {user_id: first["id"]}
    assert store.kept_ids({user_id: made[2]["id"]}) == {}  # left the log
    assert [n["count"] for n in stored(db, user_id)] == [len(made) + 1]


def test_the_sweep_knows_a_collapsed_create_by_its_own_id(store: InboxStore, user_id: str) -> None:
    first, again = thread(user_id, 1), thread(user_id, 2)
    for item in (first, again):
        store.append([(user_id, item)], NOW, require_email=False)
    assert store.has_notification(user_id, first["id"])
    assert store.has_notification(user_id, again["id"])
    assert not store.has_notification(user_id, str(ObjectId()))


def test_a_page_shows_count_and_collapse_key_of_a_notification_stored_before_them(
    store: InboxStore, db: Any, user_id: str
) -> None:
    old = notification(user_id, 1)
    del old["count"], old["collapse_key"]  # type: ignore[misc]
    db.users.update_one({"_id": ObjectId(user_id)}, {"$set": {"notifications": [old, "junk"]}})
    page = store.inbox_page(user_id, 0, 10, NOW)
    assert page["list"] == [{**old, "count": 1, "collapse_key": None}, "junk"]
    # And an export (user_data.py) shows them as /list does.
    exported = store.held_for(user_id)
    assert exported is not None
    assert exported["notifications"] == page["list"]

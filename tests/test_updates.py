"""The shapes of the storage's queries and updates, without a database (storage/updates.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bson import ObjectId

from notification_service.config import Config
from notification_service.schemas import Notification
from notification_service.storage import updates
from notification_service.storage.updates import Layout

LAYOUT = Layout("notifications", "notifications_meta", 100, None)
OID = ObjectId()


def notification(data: dict[str, Any], collapse_key: str | None = None) -> Notification:
    return {
        "id": str(ObjectId()),
        "timestamp": 1,
        "is_new": True,
        "user_id": str(OID),
        "key": "new_post",
        "target_id": None,
        "data": data,
        "count": 1,
        "collapse_key": collapse_key,
    }


def test_layout_follows_the_config_and_expires_nothing_without_a_ttl() -> None:
    layout = Layout.of(Config(notifications_field="inbox", notifications_limit=7))
    assert layout == Layout("inbox", "inbox_meta", 7, None)
    assert layout.cutoff(datetime(2026, 1, 1, tzinfo=UTC)) is None
    aged = Layout.of(Config(notifications_ttl_days=2))
    assert aged.cutoff(datetime.fromtimestamp(10 * 86400, UTC)) == 8 * 86400


def test_a_create_is_one_capped_push_and_a_version_bump() -> None:
    item = notification({"a": "$email"})
    assert updates.push(LAYOUT, item) == {
        "$push": {"notifications": {"$each": [item], "$position": 0, "$slice": 100}},
        "$inc": {"notifications_meta.version": 1},
    }


def test_a_create_filter_asks_for_an_address_and_skips_a_repeat_only_when_told() -> None:
    assert updates.create_filter(LAYOUT, OID, require_email=False, repeat_of=None) == {"_id": OID}
    assert updates.create_filter(LAYOUT, OID, require_email=True, repeat_of="n1") == {
        "_id": OID,
        "email": {"$type": "string", "$ne": ""},
        "notifications.id": {"$ne": "n1"},
    }


def test_marking_one_read_matches_only_an_unread_live_one_and_sets_it_by_position() -> None:
    query, update = updates.mark_read(LAYOUT, OID, "n1", cutoff=50)
    assert query == {
        "_id": OID,
        "notifications": {"$elemMatch": {"id": "n1", "is_new": True, "timestamp": {"$gt": 50}}},
    }
    assert update == {
        "$set": {"notifications.$.is_new": False},
        "$inc": {"notifications_meta.version": 1},
    }


def test_deleting_one_pulls_it_by_id() -> None:
    query, update = updates.delete(LAYOUT, OID, "n1", cutoff=None)
    assert query == {"_id": OID, "notifications": {"$elemMatch": {"id": "n1"}}}
    assert update["$pull"] == {"notifications": {"id": "n1"}}


def test_the_state_read_asks_only_for_what_is_needed() -> None:
    plain = updates.state(LAYOUT, OID, None)
    assert plain[0] == {"$match": {"_id": OID}}
    assert set(plain[1]["$project"]) == {"_id", "counts", "version"}
    asked = updates.state(LAYOUT, OID, 5, holds="n1", token="t1")
    assert set(asked[1]["$project"]) == {"_id", "counts", "version", "holds", "expired", "changed"}


def test_a_page_of_zero_asks_for_no_list_and_a_huge_skip_stays_32_bit() -> None:
    project = updates.page(LAYOUT, OID, None, 2**40, 0)[1]["$project"]
    assert project["found"]["$let"]["in"]["list"] == {"$literal": []}
    sliced = updates.page(LAYOUT, OID, None, 2**40, 5)[1]["$project"]["found"]["$let"]["in"]
    assert sliced["list"] == {"$slice": ["$$m", 2**31 - 1, 5]}
    assert sliced["matched"] is None  # no filter: matched is elements


def test_a_filtered_page_counts_its_matches_and_takes_the_key_as_a_literal() -> None:
    found = updates.page(LAYOUT, OID, None, 0, 5, key="$where")[1]["$project"]["found"]
    assert found["$let"]["in"]["matched"] == {"$size": "$$m"}
    assert {"$eq": ["$$n.key", {"$literal": "$where"}]} in str_tree(found)


def test_one_user_is_matched_by_id_and_many_by_in() -> None:
    assert updates.users(LAYOUT, [OID])[0] == {"$match": {"_id": OID}}
    other = ObjectId()
    assert updates.users(LAYOUT, [OID, other])[0] == {"$match": {"_id": {"$in": [OID, other]}}}


def test_a_rewrite_logs_its_change_under_its_token_and_drops_its_scratch_field() -> None:
    pipeline = updates.rewrite(LAYOUT, None, updates.delete_all(False), updates.size, "tok")
    assert pipeline[-1] == {"$unset": "notifications_meta.before"}
    assert {"$literal": "tok"} in str_tree(pipeline[1])


def test_expired_ones_are_pulled_by_their_timestamp() -> None:
    assert updates.prune(LAYOUT, 99) == {
        "$pull": {"notifications": {"timestamp": {"$lte": 99}}},
        "$inc": {"notifications_meta.version": 1},
    }


def test_a_retried_collapsing_create_also_skips_a_user_that_logged_it_collapsed() -> None:
    assert updates.create_filter(
        LAYOUT, OID, require_email=False, repeat_of="n1", collapsing=True
    ) == {
        "_id": OID,
        "notifications.id": {"$ne": "n1"},
        "notifications_meta.collapsed.by": {"$ne": "n1"},
    }
    # A first attempt has fresh ids: nothing to skip.
    first = updates.create_filter(LAYOUT, OID, require_email=False, repeat_of=None, collapsing=True)
    assert first == {"_id": OID}


def test_a_collapse_is_written_where_the_row_is_and_a_push_where_it_is_not() -> None:
    item = notification({}, collapse_key="$t")
    row = {"collapse_key": "$t", "key": "new_post", "is_new": True, "timestamp": {"$gt": 9}}
    assert updates.collapsible(LAYOUT, item, 9) == {"notifications": {"$elemMatch": row}}
    assert updates.collapsible(LAYOUT, item, 9, absent=True) == {
        "notifications": {"$not": {"$elemMatch": row}}
    }


def test_a_collapse_is_one_stage_that_changes_nothing_without_an_array() -> None:
    item = notification({"a": "$email"}, collapse_key="$thread")
    [stage] = updates.collapse(LAYOUT, item, cutoff=None)
    when, changed, unchanged = stage["$replaceWith"]["$cond"]
    assert when == updates.takes(LAYOUT)
    assert unchanged == "$$ROOT"
    tree = str_tree(changed)
    # The notification and the keys it matches are values, never expressions.
    assert [{"$literal": item}] in tree
    assert {"$eq": ["$$n.collapse_key", {"$literal": "$thread"}]} in tree
    assert {"$eq": ["$$n.key", {"$literal": "new_post"}]} in tree
    assert {"$literal": {"data": {"a": "$email"}, "target_id": None, "timestamp": 1}} in tree
    # Capped like a push; the log of collapses is a ring of its own size.
    assert any(isinstance(d, dict) and d.get("$slice", [None, None])[1] == 100 for d in tree)
    count = {"$ifNull": ["$notifications_meta.collapses", 0]}
    assert {"$mod": [count, updates.COLLAPSE_LOG_SIZE]} in tree


def test_a_collapse_matches_only_live_ones_with_a_ttl() -> None:
    item = notification({}, collapse_key="t")
    tree = str_tree(updates.collapse(LAYOUT, item, cutoff=77))
    assert {"$gt": ["$$n.timestamp", {"$literal": 77}]} in tree
    assert not any(
        isinstance(d, dict) and "$gt" in d
        for d in str_tree(updates.collapse(LAYOUT, item, cutoff=None))
    )


def test_the_state_read_asks_for_the_kept_id_only_when_told() -> None:
    assert "kept" not in updates.state(LAYOUT, OID, None)[1]["$project"]
    asked = updates.state(LAYOUT, OID, None, kept_by="n1")[1]["$project"]
    assert {"$eq": ["$$e.by", {"$literal": "n1"}]} in str_tree(asked["kept"])


def test_the_held_read_of_a_collapsing_create_also_reads_the_log_and_the_fields_type() -> None:
    plain = updates.held_ids(LAYOUT, [OID])[1]["$project"]
    assert set(plain) == {"ids"}
    collapsing = updates.held_ids(LAYOUT, [OID], collapsing=True)[1]["$project"]
    assert set(collapsing) == {"ids", "collapsed", "takes"}


def test_a_rewrite_carries_the_collapse_log_over() -> None:
    pipeline = updates.rewrite(LAYOUT, None, updates.delete_all(False), updates.size, "tok")
    for stage in pipeline[:2]:
        meta = stage["$set"]["notifications_meta"]
        assert meta["collapsed"] == "$notifications_meta.collapsed"
        assert meta["collapses"] == "$notifications_meta.collapses"


def str_tree(value: Any) -> list[Any]:
    """Every dict and list inside `value`, `value` included (to find a sub-expression)."""
    found = [value]
    children = (
        value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    )
    for child in children:
        found += str_tree(child)
    return found

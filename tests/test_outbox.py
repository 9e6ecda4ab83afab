"""The outbox collection's operations against a real database."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from pymongo import MongoClient
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from notification_service.config import Config
from notification_service.outbox import LastError, Outbox
from notification_service.storage.ids import new_id
from notification_service.storage.mongo_connector import Document, connect, database

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DAY = 86400


@pytest.fixture
def service_db(config: Config) -> Iterator[Database[Document]]:
    """The test's database through the service's own client (journaled writes)."""
    client = connect(config)
    yield database(client, config)
    client.close()


@pytest.fixture
def outbox(service_db: Database[Document], config: Config) -> Outbox:
    box = Outbox(service_db, config.outbox_collection)
    box.ensure_indexes()
    return box


def queue(outbox: Outbox, n: int, at: datetime = T0) -> list[str]:
    return [
        outbox.enqueue(
            {"kind": "custom", "to": f"u{i}@example.com", "subject": str(i), "text": "t",
             "html": None, "message_id": f"<{i}@test>"},
            at + timedelta(seconds=i),
        )
        for i in range(n)
    ]  # fmt: skip


def test_claim_batch_takes_from_the_oldest_due_and_sets_a_lease(outbox: Outbox) -> None:
    ids = queue(outbox, 10)
    now = T0 + timedelta(seconds=20)
    batch = outbox.claim_batch("a", now, 60, 3)
    assert len(batch) == 3
    # Oldest first to within two batches: a random half of the six oldest.
    assert {str(r["_id"]) for r in batch} <= set(ids[:6])
    for record in batch:
        assert record["status"] == "sending"
        assert record["attempts"] == 1
        assert record["claimed_by"] == "a"
        assert record["next_attempt_at"] == now + timedelta(seconds=60)


def test_a_small_batch_comes_in_due_order(outbox: Outbox) -> None:
    ids = queue(outbox, 3)
    batch = outbox.claim_batch("a", T0 + timedelta(seconds=10), 60, 3)
    assert [str(r["_id"]) for r in batch] == ids


def test_a_batch_comes_in_due_order_whatever_its_ids(outbox: Outbox) -> None:
    # Preset ids (a request's id block) can sort in any order against their due times.
    ids = sorted((new_id() for _ in range(3)), reverse=True)
    for n, email_id in enumerate(ids):
        outbox.enqueue(email(n), T0 + timedelta(seconds=n), email_id=email_id)
    batch = outbox.claim_batch("a", T0 + timedelta(seconds=10), 60, 3)
    assert [str(r["_id"]) for r in batch] == ids


def test_expired_leases_are_taken_before_queued_emails(outbox: Outbox) -> None:
    queue(outbox, 1)
    [stale] = outbox.claim_batch("dead", T0 + timedelta(seconds=1), 5, 1)
    queue(outbox, 4, at=T0 + timedelta(seconds=2))
    [first] = outbox.claim_batch("b", T0 + timedelta(seconds=30), 60, 1)
    assert first["_id"] == stale["_id"]


def test_nothing_is_claimed_before_it_is_due(outbox: Outbox) -> None:
    queue(outbox, 2, at=T0 + timedelta(minutes=5))
    assert outbox.claim_batch("a", T0, 60, 10) == []


def test_a_held_lease_blocks_and_an_expired_one_is_taken_over(outbox: Outbox) -> None:
    queue(outbox, 1)
    [first] = outbox.claim_batch("a", T0 + timedelta(seconds=1), 30, 10)
    assert outbox.claim_batch("b", T0 + timedelta(seconds=20), 30, 10) == []
    [again] = outbox.claim_batch("b", T0 + timedelta(seconds=32), 30, 10)
    assert again["_id"] == first["_id"]
    assert (again["claimed_by"], again["attempts"]) == ("b", 2)
    # The first claimer's failure no longer counts: its claim is gone.
    error: LastError = {"code": 451, "message": "later", "permanent": False, "outage": False}
    assert not outbox.mark_retry(first["_id"], "a", error, T0 + timedelta(minutes=5))
    assert outbox.records.find_one({"_id": first["_id"]})["claimed_by"] == "b"  # type: ignore[index]


def test_a_send_is_recorded_whoever_holds_the_claim_and_only_once(outbox: Outbox) -> None:
    queue(outbox, 2)
    a, b = outbox.claim_batch("a", T0 + timedelta(seconds=5), 30, 10)
    # b's lease ran out and "b" took it over; "a" had sent both meanwhile.
    outbox.records.update_one({"_id": b["_id"]}, {"$set": {"claimed_by": "b"}})
    assert outbox.mark_sent([a["_id"], b["_id"]], T0 + timedelta(seconds=40)) == 2
    # "b" sends it too (the duplicate a lost lease allows) and records nothing new.
    assert outbox.mark_sent([b["_id"]], T0 + timedelta(seconds=41)) == 0
    for record in outbox.records.find():
        assert (record["status"], record["claimed_by"]) == ("sent", None)
        assert record["sent_at"] == T0 + timedelta(seconds=40)


def test_release_without_ids_gives_back_all_a_token_still_holds(outbox: Outbox, db: Any) -> None:
    queue(outbox, 3)
    x, y, z = outbox.claim_batch("lost", T0 + timedelta(seconds=5), 60, 10)
    outbox.records.update_one({"_id": z["_id"]}, {"$set": {"claimed_by": "other"}})
    assert outbox.release(None, "lost", T0 + timedelta(seconds=6)) == 2
    state = {
        r["_id"]: (r["status"], r["attempts"], r["claimed_by"]) for r in db.email_outbox.find()
    }
    assert state[x["_id"]] == state[y["_id"]] == ("queued", 0, None)
    assert state[z["_id"]] == ("sending", 1, "other")  # not the lost claim's to give back


def test_concurrent_claimers_never_share_an_email(outbox: Outbox) -> None:
    ids = set(queue(outbox, 60))
    won: dict[str, list[str]] = {}

    def claimer(name: str) -> None:
        mine = won.setdefault(name, [])
        while batch := outbox.claim_batch(name, T0 + timedelta(minutes=5), 60, 7):
            mine.extend(str(r["_id"]) for r in batch)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [email for mine in won.values() for email in mine]
    assert sorted(claimed) == sorted(ids)  # every one, exactly once


def test_release_gives_back_without_counting_an_attempt(outbox: Outbox, db: Any) -> None:
    queue(outbox, 2)
    batch = outbox.claim_batch("a", T0 + timedelta(seconds=5), 60, 10)
    assert outbox.release([r["_id"] for r in batch], "a", T0 + timedelta(seconds=6)) == 2
    for record in db.email_outbox.find():
        assert (record["status"], record["attempts"], record["claimed_by"]) == ("queued", 0, None)
        assert record["next_attempt_at"] == T0 + timedelta(seconds=6)


def test_release_backoffs_only_touches_outage_retries(outbox: Outbox, db: Any) -> None:
    queue(outbox, 4)
    now = T0 + timedelta(seconds=5)
    a, b, c, d = outbox.claim_batch("w", now, 60, 10)
    later = now + timedelta(minutes=10)
    down = {"code": None, "message": "refused", "permanent": False, "outage": True}
    grey = {"code": 450, "message": "greylisted", "permanent": False, "outage": False}
    outbox.mark_retry(a["_id"], "w", down, later)  # type: ignore[arg-type]
    outbox.mark_retry(b["_id"], "w", grey, later)  # type: ignore[arg-type]
    outbox.mark_failed(
        c["_id"], "w", {"code": 550, "message": "no", "permanent": True, "outage": False}, now
    )
    assert outbox.mark_sent([d["_id"]], now) == 1
    assert outbox.release_backoffs(now) == 1
    state = {r["_id"]: (r["status"], r["next_attempt_at"]) for r in db.email_outbox.find()}
    assert state[a["_id"]] == ("queued", now)
    assert state[b["_id"]] == ("queued", later)  # its own 4xx keeps its backoff
    assert state[c["_id"]][0] == "failed" and state[d["_id"]][0] == "sent"
    assert outbox.backlog() == {"scheduled": 0, "queued": 2, "sending": 0}


def test_renew_extends_only_what_the_claim_still_holds(outbox: Outbox) -> None:
    queue(outbox, 2)
    a, b = outbox.claim_batch("w", T0 + timedelta(seconds=5), 10, 10)
    # b's lease runs out and another dispatcher takes it over.
    outbox.records.update_one({"_id": b["_id"]}, {"$set": {"claimed_by": "other"}})
    held = outbox.renew([a["_id"], b["_id"]], "w", T0 + timedelta(seconds=12), 10)
    assert held == {a["_id"]}
    renewed = outbox.records.find_one({"_id": a["_id"]})
    assert renewed is not None
    assert renewed["next_attempt_at"] == T0 + timedelta(seconds=22)


# --- pending emails (a new_login's email before its notification is stored) -----------


def email(n: int = 0, **fields: Any) -> Document:
    return {"kind": "notification", "to": f"u{n}@example.com", "subject": "s", "text": "t",
            "html": None, "message_id": f"<{uuid.uuid4().hex}@test>", "user_id": None,
            "notification_id": None, "key": "new_login", **fields}  # fmt: skip


def test_a_pending_email_is_neither_claimed_nor_counted_nor_due(outbox: Outbox) -> None:
    outbox.enqueue(email(), T0, pending=True)
    later = T0 + timedelta(days=1)
    assert outbox.claim_batch("a", later, 60, 10) == []
    assert outbox.backlog() == {"scheduled": 0, "queued": 0, "sending": 0}
    assert outbox.next_due() is None
    assert outbox.release_backoffs(later) == 0


def test_activate_makes_pending_emails_claimable_and_wakes_dispatchers(outbox: Outbox) -> None:
    woken: list[None] = []
    outbox.on_enqueue(lambda: woken.append(None))
    a = outbox.enqueue(email(0), T0, pending=True)
    b = outbox.enqueue(email(1), T0, pending=True)
    assert woken == []  # nothing to send yet
    now = T0 + timedelta(seconds=5)
    assert outbox.activate([a, b], now) == 2
    assert len(woken) == 1
    assert outbox.activate([a, b], now) == 0  # only pending records change
    assert len(woken) == 1
    batch = outbox.claim_batch("w", now, 60, 10)
    assert {str(r["_id"]) for r in batch} == {a, b}


def test_enqueue_with_a_preset_id_twice_returns_it_and_stores_one_record(
    outbox: Outbox,
) -> None:
    email_id = new_id()
    first = email()
    assert outbox.enqueue(first, T0, email_id=email_id, pending=True) == email_id
    # The request's retry: same id, the earlier attempt's record is kept as it was.
    assert outbox.enqueue(email(), T0 + timedelta(seconds=1), email_id=email_id) == email_id
    [record] = outbox.records.find()
    assert record["_id"] == ObjectId(email_id)
    assert (record["status"], record["message_id"]) == ("pending", first["message_id"])


def test_a_duplicate_preset_id_in_a_transaction_aborts_it(
    outbox: Outbox, service_db: Database[Document]
) -> None:
    email_id = outbox.enqueue(email(0), T0, email_id=new_id())
    other = new_id()
    with (
        service_db.client.start_session() as session,
        pytest.raises(DuplicateKeyError),
        session.start_transaction(),
    ):
        outbox.enqueue(email(1), T0, email_id=other, session=session)
        outbox.enqueue(email(2), T0, email_id=email_id, session=session)
    assert [str(r["_id"]) for r in outbox.records.find()] == [email_id]


def test_enqueue_many_stores_each_record_once_across_a_retry(outbox: Outbox) -> None:
    woken: list[None] = []
    outbox.on_enqueue(lambda: woken.append(None))
    ids = [new_id() for _ in range(3)]
    # The first attempt stored two of the three (then the request was cut short).
    assert outbox.enqueue_many([email(0), email(1)], T0, email_ids=ids[:2]) == ids[:2]
    retried = outbox.enqueue_many(
        [email(0), email(1), email(2)], T0 + timedelta(seconds=1), email_ids=ids
    )
    assert retried == ids
    records = {str(r["_id"]): r for r in outbox.records.find()}
    assert sorted(records) == sorted(ids)
    assert {r["status"] for r in records.values()} == {"queued"}
    assert records[ids[2]]["created_at"] == T0 + timedelta(seconds=1)
    assert len(woken) == 2


def test_enqueue_many_pending_stores_pending_records_and_wakes_no_one(outbox: Outbox) -> None:
    woken: list[None] = []
    outbox.on_enqueue(lambda: woken.append(None))
    ids = outbox.enqueue_many(
        [email(0), email(1)], T0, email_ids=[new_id(), new_id()], pending=True
    )
    assert {(str(r["_id"]), r["status"]) for r in outbox.records.find()} == {
        (ids[0], "pending"),
        (ids[1], "pending"),
    }
    assert woken == []


def test_existing_names_the_stored_emails_whatever_their_status(outbox: Outbox) -> None:
    pending = outbox.enqueue(email(0), T0, pending=True)
    queued = outbox.enqueue(email(1), T0)
    assert outbox.existing([pending, queued, new_id()]) == {pending, queued}
    assert outbox.existing([]) == set()


def test_stale_pending_lists_old_pending_records_with_their_notification(
    outbox: Outbox,
) -> None:
    old = outbox.enqueue(email(0, user_id="u", notification_id="n"), T0, pending=True)
    outbox.enqueue(email(1), T0 + timedelta(seconds=30), pending=True)  # too young
    outbox.enqueue(email(2), T0)  # queued: not the sweep's
    [stale] = outbox.stale_pending(T0 + timedelta(seconds=10), 10)
    assert stale == {"_id": ObjectId(old), "user_id": "u", "notification_id": "n"}


def test_discard_pending_deletes_only_pending_records(outbox: Outbox) -> None:
    pending = outbox.enqueue(email(0), T0, pending=True)
    queued = outbox.enqueue(email(1), T0)
    assert outbox.discard_pending([pending, queued]) == 1
    assert [str(r["_id"]) for r in outbox.records.find()] == [queued]


# --- retention (OUTBOX_RETENTION_DAYS) ---------------------------------------------------


def retention_indexes(outbox: Outbox) -> dict[str, Any]:
    return {
        name: (info["key"], info.get("expireAfterSeconds"), dict(info["partialFilterExpression"]))
        for name, info in outbox.records.index_information().items()
        if name.endswith("_retention")
    }


@pytest.fixture
def retained(service_db: Database[Document], config: Config) -> Callable[[int | None], Outbox]:
    """An outbox with `retention_days` whose indexes are ensured, as at start-up."""

    def make(days: int | None) -> Outbox:
        box = Outbox(service_db, config.outbox_collection, retention_days=days)
        box.ensure_indexes()
        return box

    return make


def test_retention_indexes_expire_only_sent_failed_and_cancelled_records(
    retained: Callable[[int | None], Outbox],
) -> None:
    assert retention_indexes(retained(30)) == {
        "sent_retention": ([("sent_at", 1)], 30 * DAY, {"status": "sent"}),
        "failed_retention": ([("failed_at", 1)], 30 * DAY, {"status": "failed"}),
        "cancelled_retention": ([("cancelled_at", 1)], 30 * DAY, {"status": "cancelled"}),
    }


def test_a_changed_retention_is_applied_to_the_existing_indexes(
    retained: Callable[[int | None], Outbox],
) -> None:
    retained(30)
    outbox = retained(7)  # the operator changed OUTBOX_RETENTION_DAYS and restarted
    assert {name: ttl for name, (_, ttl, _) in retention_indexes(outbox).items()} == {
        "sent_retention": 7 * DAY,
        "failed_retention": 7 * DAY,
        "cancelled_retention": 7 * DAY,
    }
    retained(7)  # unchanged: nothing to do, and no error


def test_retention_zero_drops_the_retention_indexes(
    retained: Callable[[int | None], Outbox],
) -> None:
    retained(30)
    assert retention_indexes(retained(0)) == {}
    assert retention_indexes(retained(0)) == {}  # and stays without them
    assert "due" in retained(0).records.index_information()


def test_an_outbox_without_retention_settings_leaves_the_indexes_alone(
    retained: Callable[[int | None], Outbox],
) -> None:
    retained(30)
    assert len(retention_indexes(retained(None))) == 3


def test_records_past_retention_are_removed_and_unfinished_ones_never(
    retained: Callable[[int | None], Outbox], mongo_admin: MongoClient[Document]
) -> None:
    retained(30)
    outbox = retained(1)  # through collMod: the changed value is the one that expires
    now = datetime.now(UTC)
    long_ago = now - timedelta(days=400)
    gone = [
        email(0, status="sent", sent_at=now - timedelta(days=2)),
        email(1, status="failed", failed_at=now - timedelta(days=2)),
        email(7, status="cancelled", cancelled_at=now - timedelta(days=2)),
    ]
    kept = [
        email(2, status="sent", sent_at=now - timedelta(hours=1)),
        email(3, status="queued", created_at=long_ago, next_attempt_at=long_ago, sent_at=None),
        # Whatever dates an unfinished record holds, it stays.
        email(4, status="queued", created_at=long_ago, sent_at=long_ago, failed_at=long_ago),
        email(5, status="sending", created_at=long_ago, sent_at=long_ago),
        email(6, status="pending", created_at=long_ago, failed_at=long_ago),
        email(8, status="scheduled", created_at=long_ago, cancelled_at=long_ago),
        email(9, status="cancelled", cancelled_at=now - timedelta(hours=1)),
    ]
    outbox.records.insert_many(gone + kept)
    # The pass SecantusDB's TTL monitor makes every 60 s (as mongod's does), run now
    # rather than waited for.
    assert mongo_admin.admin.command("secantusAdmin.pruneTtl")["pruned"] >= len(gone)
    assert {r["to"] for r in outbox.records.find()} == {r["to"] for r in kept}


# --- digests ("email if unread") ----------------------------------------------------------


def test_a_digest_opens_once_due_after_its_delay_and_later_notifications_join_it(
    outbox: Outbox,
) -> None:
    first = outbox.digests.schedule_digest("u1", "new_message", "n1", T0, 600)
    assert first is not None  # opened
    later = T0 + timedelta(seconds=5)
    assert outbox.digests.schedule_digest("u1", "new_message", "n2", later, 600) is None  # joined
    assert outbox.digests.schedule_digest("u1", "new_message", "n2", later, 600) is None
    assert outbox.digests.open_digest_id("u1", "new_message") == first
    other_key = outbox.digests.schedule_digest("u1", "new_post", "n3", T0, 60)
    other_user = outbox.digests.schedule_digest("u2", "new_message", "n4", T0, 600)
    assert len({first, other_key, other_user} - {None}) == 3
    digest = outbox.get(first)
    assert digest is not None
    assert digest["kind"] == "digest"
    assert (digest["status"], digest["attempts"]) == ("scheduled", 0)
    # A retried create joins again at the end (the list is bounded, not a set): read
    # as a set at due time, shown once each by GET /email/<id>.
    assert digest["notification_ids"] == ["n1", "n2", "n2"]
    assert digest["next_attempt_at"] == T0 + timedelta(seconds=600)  # the first one's delay
    assert "to" not in digest  # rendered at due time, from what is unread then
    assert outbox.backlog() == {"scheduled": 3, "queued": 0, "sending": 0}
    assert outbox.next_due() == T0 + timedelta(seconds=60)


def test_a_digest_is_claimed_only_when_due_and_the_claim_closes_its_batch(
    outbox: Outbox,
) -> None:
    first = outbox.digests.schedule_digest("u1", "new_message", "n1", T0, 600)
    assert outbox.claim_batch("a", T0 + timedelta(seconds=599), 60, 10) == []
    assert outbox.oldest_due(T0 + timedelta(seconds=599)) is None
    assert outbox.oldest_due(T0 + timedelta(seconds=700)) == T0 + timedelta(seconds=600)
    [claimed] = outbox.claim_batch("a", T0 + timedelta(seconds=600), 60, 10)
    assert (str(claimed["_id"]), claimed["status"], claimed["attempts"]) == (first, "sending", 1)
    assert outbox.digests.open_digest_id("u1", "new_message") is None
    # The batch is closed: the next notification opens another, due after its own delay.
    later = T0 + timedelta(seconds=601)
    second = outbox.digests.schedule_digest("u1", "new_message", "n2", later, 600)
    assert second is not None and second != first
    assert outbox.get(second)["notification_ids"] == ["n2"]  # type: ignore[index]
    assert outbox.get(first)["notification_ids"] == ["n1"]  # type: ignore[index]


def test_racing_opens_of_one_digest_make_one_scheduled_record(outbox: Outbox) -> None:
    for round_ in range(10):
        user = f"racer{round_}"
        ids: list[str | None] = []
        barrier = threading.Barrier(6)

        def open_it(
            n: int,
            user: str = user,
            barrier: threading.Barrier = barrier,
            ids: list[str | None] = ids,
        ) -> None:
            barrier.wait()
            ids.append(outbox.digests.schedule_digest(user, "new_message", f"n{n}", T0, 600))

        threads = [threading.Thread(target=open_it, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        [digest] = outbox.records.find({"user_id": user})
        assert [i for i in ids if i is not None] == [str(digest["_id"])]  # one opened it
        assert len(ids) == 6
        assert sorted(digest["notification_ids"]) == [f"n{n}" for n in range(6)]


def test_a_second_open_digest_of_a_user_and_key_is_refused_by_the_index(
    outbox: Outbox,
) -> None:
    outbox.digests.schedule_digest("u1", "new_message", "n1", T0, 600)
    with pytest.raises(DuplicateKeyError):
        outbox.records.insert_one(
            {"kind": "digest", "user_id": "u1", "key": "new_message", "status": "scheduled"}
        )


def test_schedule_digests_opens_and_joins_a_fan_out_in_one_bulk_write(outbox: Outbox) -> None:
    existing = outbox.digests.schedule_digest("u1", "new_message", "n0", T0, 600)
    opened = outbox.digests.schedule_digests(
        [("u1", "n1"), ("u2", "n2"), ("u3", "n3")], "new_message", T0 + timedelta(seconds=1), 600
    )
    assert set(opened) == {"u2", "u3"}
    by_user = {r["user_id"]: r for r in outbox.records.find()}
    assert by_user["u1"]["notification_ids"] == ["n0", "n1"]
    assert str(by_user["u1"]["_id"]) == existing
    assert str(by_user["u2"]["_id"]) == opened["u2"]
    assert by_user["u3"]["next_attempt_at"] == T0 + timedelta(seconds=601)


def test_cancel_and_write_digests_hold_only_under_the_claim(outbox: Outbox) -> None:
    a = outbox.digests.schedule_digest("u1", "new_message", "n1", T0, 10)
    b = outbox.digests.schedule_digest("u2", "new_message", "n2", T0, 10)
    claimed = outbox.claim_batch("mine", T0 + timedelta(seconds=10), 60, 10)
    assert len(claimed) == 2
    oa, ob = ObjectId(a), ObjectId(b)
    outbox.records.update_one({"_id": ob}, {"$set": {"claimed_by": "theirs"}})  # taken over
    fields = {"to": "u@example.com", "subject": "s", "text": "t", "html": None}
    assert outbox.digests.write_digests([(oa, "mine", fields), (ob, "mine", fields)]) == {oa}
    assert outbox.get(b)["claimed_by"] == "theirs"  # type: ignore[index]
    assert "to" not in outbox.get(b)  # type: ignore[operator]
    now = T0 + timedelta(seconds=11)
    assert outbox.cancel([oa, ob], "mine", "nothing_unread", now) == 1
    cancelled = outbox.get(a)
    assert cancelled is not None
    assert (cancelled["status"], cancelled["cancel_reason"]) == ("cancelled", "nothing_unread")
    assert (cancelled["cancelled_at"], cancelled["claimed_by"]) == (now, None)
    assert outbox.backlog() == {"scheduled": 0, "queued": 0, "sending": 1}

"""The outbox collection's operations against a real database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from notification_service.config import Config
from notification_service.mongo_connector import connect, database
from notification_service.outbox import LastError, Outbox

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def outbox(config: Config) -> Iterator[Outbox]:
    client = connect(config)
    box = Outbox(database(client, config), config.outbox_collection)
    box.ensure_indexes()
    yield box
    client.close()


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
    assert outbox.backlog() == {"queued": 2, "sending": 0}


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

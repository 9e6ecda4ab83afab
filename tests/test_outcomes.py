"""The stored form of a fan-out's answer (outcomes.py): pure functions, no servers; and,
through the app, what a keyed fan-out's record weighs and that its replay is exact."""

from __future__ import annotations

from typing import Any

import bson
from flask.testing import FlaskClient

from notification_service import outcomes
from notification_service.storage.ids import IdBlock, new_id

IDS = IdBlock()
USERS = [new_id() for _ in range(6)]
KEPT = new_id()


def answer() -> dict[str, Any]:
    """A fan-out answer with every kind of outcome."""
    results = [
        {"user_id": USERS[0], "status": "created", "notification_id": IDS.id(0),
         "email_id": IDS.id(1), "collapsed": False, "skipped": []},
        {"user_id": USERS[1], "status": "created", "notification_id": KEPT,
         "email_id": None, "collapsed": True, "skipped": ["email"]},
        {"user_id": USERS[2], "status": "skipped", "skipped": ["in_app", "email"]},
        {"user_id": USERS[3], "status": "user_not_found"},
        {"user_id": USERS[4], "status": "user_has_no_email"},
        {"user_id": USERS[5], "status": "created", "notification_id": None,
         "email_id": IDS.id(11), "collapsed": False, "skipped": []},
    ]  # fmt: skip
    totals = {"created": 3, "skipped": 1, "user_not_found": 1, "user_has_no_email": 1,
              "user_document_invalid": 0}  # fmt: skip
    return {"success": True, "data": {"results": results, "totals": totals}}


REQUEST = {"user_ids": USERS, "key": "new_login"}


def test_a_packed_fan_out_answer_unpacks_to_exactly_the_answer() -> None:
    packed = outcomes.pack(answer(), REQUEST, IDS)
    assert packed["data"]["codes"] == ["c11", "ck0-e", "s-ie", "n", "e", "c01"]
    assert packed["data"]["kept"] == {"1": KEPT}
    assert outcomes.unpack(packed, REQUEST, IDS) == answer()


def test_an_answer_the_codes_cannot_say_is_kept_as_it_is() -> None:
    odd = answer()
    odd["data"]["results"][0]["email_id"] = new_id()  # not the block's
    assert outcomes.pack(odd, REQUEST, IDS) == odd
    other = answer()
    other["data"]["results"][0]["status"] = "something_new"
    assert outcomes.pack(other, REQUEST, IDS) == other
    shuffled = {**REQUEST, "user_ids": USERS[::-1]}
    assert outcomes.pack(answer(), shuffled, IDS) == answer()


def test_answers_that_are_not_fan_outs_pass_through() -> None:
    single = {"success": True, "data": {"notification_id": IDS.id(0), "email_id": None}}
    assert outcomes.pack(single, {"user_id": USERS[0]}, IDS) == single
    assert outcomes.unpack(single, {"user_id": USERS[0]}, IDS) == single
    assert outcomes.unpack(answer(), REQUEST, IDS) == answer()  # stored before packing


def test_an_erased_user_is_left_out_of_the_replay() -> None:
    packed = outcomes.pack(answer(), REQUEST, IDS)
    packed["data"]["codes"][1] = outcomes.ERASED
    replay = outcomes.unpack(packed, REQUEST, IDS)
    assert [r["user_id"] for r in replay["data"]["results"]] == [
        u for i, u in enumerate(USERS) if i != 1
    ]


def test_a_keyed_1000_user_fan_out_keeps_a_small_record_and_replays_exactly(
    client: FlaskClient, db: Any, make_user: Any
) -> None:
    users = [str(u) for u in db.users.insert_many(
        [{"email": f"u{i}@example.com"} for i in range(1000)]).inserted_ids]  # fmt: skip
    body = {"user_ids": users, "key": "new_post", "data": {"title": "A post"}}
    first = client.post("/create", json=body, headers={"Idempotency-Key": "big-1"})
    assert first.status_code == 201
    record = db.idempotency_keys.find_one({"_id": "create big-1"})
    stored = len(bson.encode(record["body"]))
    answered = len(bson.encode(first.get_json()))
    print(f"a 1,000-user fan-out's answer: {answered:,} B as BSON, stored: {stored:,} B")
    assert stored * 8 < answered  # 124 KB answered, about 11 KB kept
    again = client.post("/create", json=body, headers={"Idempotency-Key": "big-1"})
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.get_json() == first.get_json()

"""Bytes a user, an email and an Idempotency-Key cost in MongoDB, for docs/capacity.md.

`python bench/sizes.py` writes through the service itself (create_app's test client,
its default NOTIFICATIONS_LIMIT=100) into an in-memory SecantusDB, then reads the
stored documents back and measures them as BSON (`bson.encode`), the size mongod
stores before compression. Typical data: a chat message's sender and an 80-character
preview, or a post's id and title, each with a target_id.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import bson
from bson import ObjectId
from pymongo import MongoClient

from notification_service import embedded
from notification_service.config import Config
from notification_service.server import create_app

FAN = 1000  # users of the keyed fan-out whose Idempotency-Key record is measured
DATA = [
    ("new_message", {"sender": "Alice Martin",
                     "preview": "Are we still on for Thursday? I booked the room on the "
                                "third floor at 3 pm."}),
    ("new_post", {"post": 4242, "title": "Quarterly results are out: read the summary"}),
]  # fmt: skip


def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-sizes-") as tmp:
        db, uri = embedded.start_database(None, Path(tmp) / "run")
        try:
            return _measure(uri)
        finally:
            db.stop()


def _measure(uri: str) -> dict[str, Any]:
    logging.disable(logging.INFO)  # the access log's line a request
    env = {"DB_URI": uri, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": "2525",
           "SMTP_SECURITY": "none", "LOG_FORMAT": "text"}  # fmt: skip
    config = replace(Config.from_env(env, dotenv=False), dispatcher_threads=0)
    client = create_app(config).test_client()
    mongo = MongoClient[dict[str, Any]](uri)
    db = mongo.get_default_database()
    users, outbox = db[config.users_collection], db[config.outbox_collection]
    keys = db[config.idempotency_collection]

    def post(body: dict[str, Any], **headers: str) -> dict[str, Any]:
        got = client.post("/create", json=body, headers=headers)
        assert got.status_code < 300, got.get_data(as_text=True)
        return dict(got.get_json()["data"])

    uid = ObjectId()
    users.insert_one({"_id": uid, "email": "jane.doe@example.com", "name": "Jane Doe"})
    bare = len(bson.encode(users.find_one({"_id": uid}) or {}))
    device = {"ip": "203.0.113.7", "device": "Firefox 131 on Ubuntu 24.04"}
    login = post({"user_id": str(uid), "key": "new_login", "data": device})
    email = outbox.find_one({"_id": ObjectId(login["email_id"])}) or {}
    sizes = {}
    for n in range(config.notifications_limit + 10):  # past the cap: the array stays at it
        key, data = DATA[n % len(DATA)]
        post({"user_id": str(uid), "key": key, "target_id": str(ObjectId()), "data": data})
        if n + 1 in (1, 10, 50, config.notifications_limit):
            sizes[n + 1] = len(bson.encode(users.find_one({"_id": uid}) or {}))
    doc = users.find_one({"_id": uid}) or {}
    at_cap = len(bson.encode(doc))
    one = doc[config.notifications_field][0]
    post({"user_id": str(uid), "key": "new_message", "data": DATA[0][1]},
         **{"Idempotency-Key": "sizes-single"})  # fmt: skip
    single = keys.find_one(sort=[("_id", -1)]) or {}
    many = [ObjectId() for _ in range(FAN)]
    users.insert_many({"_id": u, "email": f"u{n}@example.com"} for n, u in enumerate(many))
    post({"user_ids": [str(u) for u in many], "key": "new_message", "data": DATA[0][1]},
         **{"Idempotency-Key": "sizes-fan-out"})  # fmt: skip
    fanned = next((k for k in keys.find() if "fan-out" in json.dumps(k, default=str)), {})
    mongo.close()
    return {
        "notifications_limit": config.notifications_limit,
        "user document without notifications": bare,
        **{f"user document with {n} notifications": size for n, size in sizes.items()},
        "user document at the cap": at_cap,
        "one notification in the array": len(bson.encode(one)),
        "fields beside the array at the cap": at_cap
        - len(bson.encode({config.notifications_field: doc[config.notifications_field]})),
        "outbox record of one new_login email (queued)": len(bson.encode(email)),
        "outbox record: its text and html bodies": len(email.get("text", ""))
        + len(email.get("html", "")),
        "Idempotency-Key record of one create": len(bson.encode(single)),
        f"Idempotency-Key record of a fan-out of {FAN:,}": len(bson.encode(fanned)),
    }


def main() -> int:
    for name, value in measure().items():
        print(f"{name}: {value:,}" + ("" if name == "notifications_limit" else " bytes"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The anchor: the measured routes as a competent engineer writes them in an afternoon
(Flask, pymongo, plain granian WSGI), in the service's stored shape and answers. The bench
measures the service beside it; it uses no code of notification_service.

Served as `granian --interface wsgi --factory --workers 2 --blocking-threads 8
minimal:create_app` with DB_URI (its path names the database) and NOTIFICATIONS_LIMIT.
Not here: /list's filters, JSON bodies on /read, keys that send email (answered 501).
"""

from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

from bson import ObjectId
from flask import Flask, Response, jsonify, request
from pymongo import MongoClient
from pymongo.collection import Collection

Doc = dict[str, Any]
RECORDS, EMAILS = ("new_message", "new_post"), ("registration", "new_login")
HEX24 = re.compile(r"[0-9a-fA-F]{24}")
_users: Collection[Doc] | None = None
_lock = threading.Lock()


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def users() -> Collection[Doc]:
    """The process's collection; its client is made at first use, in the worker, since
    pymongo is not fork-safe."""
    global _users
    with _lock:
        if _users is None:
            client = MongoClient[Doc](os.environ["DB_URI"], w="majority", journal=True)
            _users = client.get_default_database()["users"]
        return _users


def object_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not HEX24.fullmatch(value):
        raise Refused(422, "validation_failed", f"{name}: 24 hexadecimal characters")
    return value


def number(name: str, default: int, most: int) -> int:
    raw = request.args.get(name, str(default))
    if not raw.isdigit() or int(raw) > most:
        raise Refused(422, "validation_failed", f"{name}: an integer from 0 to {most}")
    return int(raw)


def inbox(user_id: str, skip: int = 0, limit: int = 0) -> Doc:
    """The user's counts and, if `limit`, a page, newest first, in one aggregate.

    :raise Refused: 404, no such user.
    """
    is_new = {"$eq": ["$$n.is_new", True]}
    fields: Doc = {
        "_id": 0,
        "elements": {"$size": "$notifications"},
        "new": {"$size": {"$filter": {"input": "$notifications", "as": "n", "cond": is_new}}},
    }
    if limit:  # $slice's count must be positive
        fields["list"] = {"$slice": ["$notifications", skip, limit]}
    for doc in users().aggregate([{"$match": {"_id": ObjectId(user_id)}}, {"$project": fields}]):
        return doc
    raise Refused(404, "user_not_found", "no such user")


def ok(data: Doc, status: int = 200) -> tuple[Response, int]:
    return jsonify(success=True, data=data), status


def create_app() -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]  # the documented field order
    limit = int(os.environ.get("NOTIFICATIONS_LIMIT", "100"))

    @app.errorhandler(Refused)
    def refused(exc: Refused) -> tuple[Response, int]:
        error = {"code": exc.code, "message": exc.message}
        return jsonify(success=False, error=error), exc.status

    @app.get("/list")
    def list_() -> tuple[Response, int]:
        user_id = object_id("user_id", request.args.get("user_id"))
        skip, size = number("skip", 0, 2**31 - 1), number("limit", 10, 100)
        found = inbox(user_id, skip, size)
        page = found.pop("list", [])
        asked = {"user_id": user_id, "skip": skip, "limit": size}
        return ok({**found, "request": asked, "list": page, "matched": found["elements"]})

    @app.get("/count")
    def count() -> tuple[Response, int]:
        return ok(inbox(object_id("user_id", request.args.get("user_id"))))

    @app.post("/create")
    def create() -> tuple[Response, int]:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise Refused(400, "invalid_json", "the body must be a JSON object")
        user_id, key = object_id("user_id", body.get("user_id")), body.get("key")
        if key in EMAILS:
            raise Refused(501, "not_implemented", "this anchor sends no email")
        target, data = body.get("target_id"), body.get("data", {})
        if key not in RECORDS or not isinstance(target, str | None) or not isinstance(data, dict):
            raise Refused(422, "validation_failed", "key, target_id or data")
        note = {"id": str(ObjectId()), "timestamp": int(time.time()), "is_new": True,
                "user_id": user_id, "key": key, "target_id": target, "data": data}  # fmt: skip
        # Newest first and capped, in one atomic update.
        push = {"notifications": {"$each": [note], "$position": 0, "$slice": limit}}
        if not users().update_one({"_id": ObjectId(user_id)}, {"$push": push}).matched_count:
            raise Refused(404, "user_not_found", "no such user")
        return ok({"notification_id": note["id"], "email_id": None, **inbox(user_id)}, 201)

    @app.post("/read")
    def read() -> tuple[Response, int]:
        user_id = object_id("user_id", request.args.get("user_id"))
        nid = object_id("notification_id", request.args.get("notification_id"))
        where = {"_id": ObjectId(user_id), "notifications.id": nid}
        done = users().update_one(where, {"$set": {"notifications.$.is_new": False}})
        counts = inbox(user_id)  # first: an unknown user is user_not_found
        if not done.matched_count:
            raise Refused(404, "notification_not_found", "no such notification")
        return ok(counts)

    return app

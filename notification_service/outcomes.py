"""What an Idempotency-Key record keeps of a fan-out's answer: a few characters a user.

A fan-out's answer names each user with their outcome and ids, about 124 bytes a user:
124 KB for 1,000 users, kept IDEMPOTENCY_TTL_HOURS. Everything in it but a short code
a user follows from what a replay has anyway: the request (the same body, or the key
would be `idempotency_key_reused`), hence the users in order, and the key's seed, hence
the ids (the i-th user's notification is the block's id 2i, its email 2i + 1). So the
record keeps, for the i-th user, a code:

- the status's letter (`c` created, `s` skipped, `n` user_not_found, `e`
  user_has_no_email, `d` user_document_invalid; `x`: erased since, left out of a replay);
- for a created one, where its notification id comes from (`0` none, `1` the block,
  `k` the notification it collapsed into, kept in `kept` by position) and its email id
  (`0` none, `1` the block);
- `-` and the channels it skipped (`i` in_app, `e` email), if any.

`pack` keeps the answer as it is whenever the packed form would not give it back
exactly (it checks), so a replay always answers what the first attempt answered.
"""

from __future__ import annotations

from typing import Any

from .storage.idempotency_store import ERASED, PACKED_STATUS
from .storage.ids import IdBlock

NAME = PACKED_STATUS  # a code's first letter -> its status
STATUS = {status: letter for letter, status in NAME.items()}
__all__ = ["ERASED", "pack", "unpack"]
CHANNEL = {"in_app": "i", "email": "e"}
CHANNEL_NAME = {letter: channel for channel, letter in CHANNEL.items()}


def pack(body: Any, request: Any, ids: IdBlock) -> Any:
    """The form of a fan-out's answer to store: packed, or `body` itself (any other
    answer, or one the packed form would not give back exactly)."""
    results, user_ids = _fan_out(body, request)
    if results is None or user_ids is None or len(results) != len(user_ids):
        return body
    codes: list[str] = []
    kept: dict[str, str] = {}
    for i, (user_id, result) in enumerate(zip(user_ids, results, strict=True)):
        code = _code(i, user_id, result, ids, kept)
        if code is None:
            return body
        codes.append(code)
    packed = {**body, "data": {"codes": codes, "kept": kept, "totals": body["data"]["totals"]}}
    return packed if unpack(packed, request, ids) == body else body


def unpack(stored: Any, request: Any, ids: IdBlock) -> Any:
    """The answer a replay gives: `stored` unpacked, or as it is when not packed."""
    data = stored.get("data") if isinstance(stored, dict) else None
    if not isinstance(data, dict) or "codes" not in data or not isinstance(request, dict):
        return stored
    results = []
    for i, (user_id, code) in enumerate(zip(request["user_ids"], data["codes"], strict=True)):
        if code == ERASED:
            continue  # the user's data was erased: their outcome with it
        head, _, skipped = code.partition("-")
        result: dict[str, Any] = {"user_id": user_id, "status": NAME[head[0]]}
        if head[0] == "c":
            collapsed = head[1] == "k"
            result["notification_id"] = (
                data["kept"][str(i)] if collapsed else ids.id(2 * i) if head[1] == "1" else None
            )
            result["email_id"] = ids.id(2 * i + 1) if head[2] == "1" else None
            result["collapsed"] = collapsed
        if head[0] in "cs":
            result["skipped"] = [CHANNEL_NAME[c] for c in skipped]
        results.append(result)
    return {**stored, "data": {"results": results, "totals": data["totals"]}}


def _fan_out(body: Any, request: Any) -> tuple[list[Any] | None, list[Any] | None]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict) or not isinstance(request, dict):
        return None, None
    results, user_ids = data.get("results"), request.get("user_ids")
    if not isinstance(results, list) or not isinstance(user_ids, list):
        return None, None
    return results, user_ids


def _code(i: int, user_id: Any, result: Any, ids: IdBlock, kept: dict[str, str]) -> str | None:
    if not isinstance(result, dict) or result.get("user_id") != user_id:
        return None
    letter = STATUS.get(result.get("status", ""))
    if letter is None:
        return None
    code = letter
    if letter == "c":
        notification_id, email_id = result.get("notification_id"), result.get("email_id")
        if notification_id is None:
            code += "0"
        elif notification_id == ids.id(2 * i):
            code += "1"
        else:
            code += "k"
            kept[str(i)] = notification_id
        code += "0" if email_id is None else "1"
    skipped = result.get("skipped") or []
    if not all(channel in CHANNEL for channel in skipped):
        return None
    if skipped:
        code += "-" + "".join(CHANNEL[channel] for channel in skipped)
    return code

"""The edge of every handler: parse the request into a model, serialize the answer.

Kept in one place so that each handler is "parse, call one domain function, answer",
and so that JSON parsing quirks (NaN, deep nesting, bad encodings) are handled once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any, TypeVar

from flask import Response, current_app, g, jsonify, request
from pydantic import BaseModel

from .errors import BadRequest, ErrorDetail, ValidationFailed
from .notifications import Services

M = TypeVar("M", bound=BaseModel)

# The app's config key that says whether parsing is strict (server.Guarantees): off only
# in the benchmark that prices it.
STRICT_PARSING = "NOTIFICATION_SERVICE_STRICT_PARSING"


def services() -> Services:
    svc: Services = current_app.extensions["notification_service"].services
    return svc


def ok(data: Any = None, status: int = 200) -> tuple[Response, int]:
    body: dict[str, Any] = {"success": True}
    if data is not None:
        body["data"] = data
    return jsonify(body), status


def not_modified(etag: str) -> tuple[Response, int]:
    """304: the client's copy is current; no body, the tag again."""
    response = Response(status=304)
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response, 304


def json_body() -> dict[str, Any]:
    """The request body as a JSON object, parsed once per request (the Idempotency-Key's
    fingerprint and the route's model both read it).

    :raise BadRequest: wrong content type, not JSON, or not an object.
    """
    parsed: dict[str, Any] | None = g.get("json_body")
    if parsed is None:
        g.json_body = parsed = _parse_json_body()
    return parsed


def _parse_json_body() -> dict[str, Any]:
    if not request.is_json:
        raise BadRequest(
            "The body must be JSON, sent with Content-Type: application/json.",
            code="unsupported_content_type",
        )
    raw = request.get_data(cache=True)  # over MAX_BODY_BYTES: werkzeug raises 413
    strict = current_app.config.get(STRICT_PARSING, True)
    try:
        value = (
            json.loads(
                raw, parse_constant=_refuse_constant, object_pairs_hook=_object_with_unique_keys
            )
            if strict
            else json.loads(raw)
        )
    except (ValueError, RecursionError) as exc:
        # RecursionError: "[[[[..." nested past Python's limit is bad input, not a bug.
        raise BadRequest(
            f"The body is not valid JSON: {_short(exc)}", code="invalid_json"
        ) from None
    if not isinstance(value, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    return value


def parse_body(model: type[M], **context: Any) -> M:
    return model.model_validate(json_body(), context=context)


def parse_query(
    model: type[M],
    ignored: tuple[str, ...] = (),
    path: dict[str, str] | None = None,
    **context: Any,
) -> M:
    """The query string as `model`, less the parameters named in `ignored`, with the
    URL's `path` parameters; one of those given in the query too is refused (which of
    the two would the route act on?)."""
    values = {k: v for k, v in _single_values().items() if k not in ignored}
    if path:
        twice = [name for name in path if name in values]
        if twice:
            problem = "is given in the path; not in the query too"
            raise ValidationFailed(details=[{"field": name, "problem": problem} for name in twice])
        values.update(path)
    return model.model_validate(values, context=context)


def parse_form(model: type[M]) -> M:
    """The form body (application/x-www-form-urlencoded or multipart/form-data) as
    `model`; another body reads as an empty form.

    :raise ValidationFailed: a field of the model given more than once (strict parsing;
        the model decides what it makes of the others).
    """
    form = request.form
    values = form.to_dict()
    if current_app.config.get(STRICT_PARSING, True):
        read = {field.alias or name for name, field in model.model_fields.items()}
        _refuse_repeated((name, given) for name, given in form.lists() if name in read)
    return model.model_validate(values)


def parse_query_or_body(model: type[M], **context: Any) -> M:
    """Fields from the query string and, when a JSON body is sent, from the body too."""
    fields: dict[str, Any] = _single_values()
    # An empty body is no body, whatever its Content-Type says (clients that always
    # send application/json would otherwise get a 400 for query-only calls).
    if request.get_data(cache=True).strip():
        for name, value in json_body().items():
            if name in fields and _differs(fields[name], value):
                raise ValidationFailed(
                    details=[{"field": name, "problem": "differs between query and body"}]
                )
            fields[name] = value
    return model.model_validate(fields, strict=True, context=context)


def _differs(query_value: Any, body_value: Any) -> bool:
    # The fields given both ways are ObjectIds, whose hex is case-insensitive.
    if isinstance(query_value, str) and isinstance(body_value, str):
        return query_value.lower() != body_value.lower()
    return True


def _single_values() -> dict[str, Any]:
    """The query's parameters, one value each.

    :raise ValidationFailed: a parameter given more than once (strict parsing).
    """
    args = request.args
    values = args.to_dict()  # the first value of each
    if current_app.config.get(STRICT_PARSING, True):
        _refuse_repeated(args.lists())
    return values


def _refuse_repeated(lists: Iterable[tuple[str, list[str]]]) -> None:
    repeated: list[ErrorDetail] = [
        {"field": name, "problem": "is given more than once"}
        for name, given in lists
        if len(given) > 1
    ]
    if repeated:
        raise ValidationFailed(details=repeated)


def _object_with_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a proxy or validator in front of us
    # may keep the first, so the two would act on different requests.
    value = dict(pairs)
    if len(value) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        duplicate = next(key for key, count in counts.items() if count > 1)
        raise ValueError(f"the key {duplicate!r} appears more than once")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "…"

"""The OpenAPI 3.1 document, generated from the route declarations (api.py).

Nothing here is written by hand per route: parameters and bodies come from the input
models, answers from the declared TypedDicts, errors from the declared ApiError classes
plus the ones every route of a kind can give (a bad body, a missing key, the database
not answering). The JSON schemas are pydantic's (JSON Schema 2020-12, which OpenAPI 3.1
uses as is).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, TypeAdapter

from .api import Answer, Endpoint, validation_context
from .config import Config
from .errors import (
    ApiError,
    BadRequest,
    IdempotencyKeyInUse,
    PayloadTooLarge,
    RequestTimeout,
    TokenExpired,
    TokenForAnotherUser,
    TokenNotAccepted,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)

Schema = dict[str, Any]
REF = "#/components/schemas/{model}"

_INFO_DESCRIPTION = """\
Records in-app notifications in each user's own document (capped, newest first), lists
them with total and unread counts, marks them read, and sends email through a durable
outbox.

Every answer is JSON: `{"success": true, "data": ...}`, or `{"success": false, "error":
{"code", "message", "details": [{"field", "problem"}]}}` with a snake_case `code` to
branch on. Every answer carries `X-Request-ID` (yours when you send a valid one), the id
to quote when asking about a request.

With `API_KEYS` set, every route except the probes, this documentation, the demo
inbox page and the unsubscribe links (whose token is their credential) needs
`Authorization: Bearer <key>`. With `USER_TOKEN_SECRET` set, the inbox routes (list,
count, read, read-all, delete, delete-all, stream) and preferences also take a user token
(`userToken`; minted by your backend or `POST /token`) in its place: it opens only the
requests of its own `user_id` (403 `token_for_another_user` otherwise) until it expires
(401 `token_expired`), and no other route (403 `token_not_accepted`). GET /stream also
takes it as `?token=`, as EventSource cannot send headers.
"""

_QUERY_OR_BODY = (
    "The fields may instead be sent as a JSON object body (Content-Type: "
    "application/json), or some in each; a field given both ways must be equal."
)

# Errors by kind of route, beside the ones each route declares.
_BODY_ERRORS: tuple[type[ApiError], ...] = (BadRequest, PayloadTooLarge, RequestTimeout)
_BAD_BODY_CODES = ("bad_request", "invalid_json", "unsupported_content_type")


def document(endpoints: list[Endpoint], config: Config) -> dict[str, Any]:
    """The whole document; `config` supplies what validation takes from it (limits)."""
    components: dict[str, Schema] = {"Error": _ERROR_SCHEMA}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", endpoint.rule)
        paths.setdefault(path, {})[endpoint.method.lower()] = _operation(
            endpoint, config, components
        )
    _check_links(paths)
    tags = sorted({e.tag for e in endpoints}, key=[e.tag for e in endpoints].index)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "notification-service",
            "version": _version(),
            "description": _INFO_DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "headers": _HEADERS,
            "parameters": _PARAMETERS,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the keys in API_KEYS (when it is set).",
                },
                "userToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A user token (with USER_TOKEN_SECRET set): "
                    "base64url({sub, exp}).base64url(HMAC-SHA256), minted by your backend "
                    "or POST /token. Only for the user_id it names.",
                },
                "userTokenQuery": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The user token as `?token=`: GET /stream only "
                    "(EventSource cannot send headers).",
                },
            },
        },
        "security": [{"apiKey": []}],
    }


def _version() -> str:
    try:
        return version("notification-service")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


def _operation(endpoint: Endpoint, config: Config, components: dict[str, Schema]) -> Any:
    operation: dict[str, Any] = {
        "operationId": endpoint.name.rstrip("_"),
        "tags": [endpoint.tag],
        "summary": endpoint.summary,
    }
    description = endpoint.description
    if endpoint.source == "query_or_body":
        # Documented as query parameters alone: OpenAPI cannot say that each field may
        # come from either place, so a body schema beside required parameters would
        # call valid what is refused (the two disagree) and invalid what is accepted
        # (a field given only in the query).
        description = f"{description} {_QUERY_OR_BODY}".strip()
    if description:
        operation["description"] = description
    parameters: list[Any] = [{"$ref": "#/components/parameters/RequestId"}]
    if endpoint.model is not None:
        context = validation_context(endpoint, config)
        location = "path" if endpoint.source == "path" else "query"
        if endpoint.source != "body":
            parameters[:0] = _parameters(endpoint, location, context, components)
        if endpoint.source == "body":
            operation["requestBody"] = _request_body(endpoint, config, context, components)
    if endpoint.form is not None:
        operation["requestBody"] = _form_body(endpoint.form, config, components)
    if endpoint.idempotency_scope is not None:
        parameters.append({"$ref": "#/components/parameters/IdempotencyKey"})
    if endpoint.etag is not None:
        parameters.append({"$ref": "#/components/parameters/IfNoneMatch"})
    parameters += [{"$ref": f"#/components/parameters/{name}"} for name in endpoint.headers]
    operation["parameters"] = parameters
    operation["responses"] = _responses(endpoint, components)
    if endpoint.auth == "open":
        operation["security"] = []
    elif endpoint.auth == "key_or_token":
        operation["security"] = [{"apiKey": []}, {"userToken": []}]
        if endpoint.query_token:
            operation["security"].append({"userTokenQuery": []})
    return operation


def _parameters(
    endpoint: Endpoint, location: str, context: dict[str, Any], components: dict[str, Schema]
) -> list[Any]:
    assert endpoint.model is not None
    schema = _model_schema(endpoint.model, components, inline=True)
    extra = _overrides(endpoint.model, context)
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        field = _without_null({**field, **extra.get(name, {})})
        field.pop("title", None)
        # A query model's field named in the rule (/users/<user_id>/...) is in the path.
        where = "path" if f"<{name}>" in endpoint.rule else location
        parameter: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": where == "path" or name in required,
            "schema": field,
        }
        if name in endpoint.params:
            parameter["description"] = endpoint.params[name]
        parameters.append(parameter)
    return parameters


def _without_null(field: Schema) -> Schema:
    """A query parameter is absent or a value: `null` is not something one can send."""
    if field.get("default", 0) is None:
        del field["default"]
    choices = field.get("anyOf")
    if choices is not None:
        rest = [choice for choice in choices if choice != {"type": "null"}]
        if len(rest) == 1:
            del field["anyOf"]
            field = {**rest[0], **field}
        else:
            field["anyOf"] = rest
    return field


def _overrides(model: type[BaseModel], context: dict[str, Any]) -> dict[str, Schema]:
    """What the configuration adds to the model's fields' schemas (the key table's enum,
    LIST_MAX_LIMIT), by field name."""
    overrides = getattr(model, "schema_overrides", None)
    extra: dict[str, Schema] = overrides(context) if overrides is not None else {}
    return extra


def _request_body(
    endpoint: Endpoint, config: Config, context: dict[str, Any], components: dict[str, Schema]
) -> Any:
    assert endpoint.model is not None
    body = _model_schema(endpoint.model, components)
    properties = components[endpoint.model.__name__]["properties"]
    for name, extra in _overrides(endpoint.model, context).items():
        properties[name] = {**properties[name], **extra}
    media: dict[str, Any] = {"schema": body}
    if endpoint.body_example is not None:
        media["example"] = endpoint.body_example
    return {
        # The fields' limits count characters; this one counts the bytes sent.
        "description": f"At most {config.max_body_bytes} bytes as sent (MAX_BODY_BYTES): "
        "a larger body is refused with 413 `payload_too_large`, whatever its fields.",
        "required": True,
        "content": {"application/json": media},
    }


def _form_body(form: type[BaseModel], config: Config, components: dict[str, Schema]) -> Any:
    # Both encodings an HTML form and a mail provider's one-click POST use (RFC 8058 3.2).
    media = {"schema": _model_schema(form, components)}
    return {
        "description": f"A form, at most {config.max_body_bytes} bytes as sent (MAX_BODY_BYTES).",
        "required": True,
        "content": {"application/x-www-form-urlencoded": media, "multipart/form-data": media},
    }


def _responses(endpoint: Endpoint, components: dict[str, Schema]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in sorted(endpoint.answers.items()):
        responses[str(status)] = _answer(endpoint, status, answer, components)
    for status, errors in sorted(_errors(endpoint).items()):
        responses[str(status)] = _error_response(status, errors)
    return responses


def _answer(endpoint: Endpoint, status: int, answer: Answer, components: dict[str, Schema]) -> Any:
    headers = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    for name in answer.headers:
        headers[name] = {"$ref": f"#/components/headers/{name}"}
    if endpoint.idempotency_scope is not None:
        headers["Idempotent-Replay"] = {"$ref": "#/components/headers/Idempotent-Replay"}
    response: dict[str, Any] = {"description": answer.description, "headers": headers}
    if answer.links:
        response["links"] = {
            name: {
                "operationId": link.operation_id,
                "parameters": link.parameters,
                **({"description": link.description} if link.description else {}),
            }
            for name, link in answer.links.items()
        }
    if answer.envelope and answer.schema is not None:
        data = _type_schema(answer.schema, components)
        envelope = {
            "type": "object",
            "required": ["success", "data"],
            "properties": {"success": {"const": True}, "data": data},
        }
        media: dict[str, Any] = {"schema": envelope}
        if answer.example is not None:
            media["example"] = {"success": True, "data": answer.example}
        response["content"] = {"application/json": media}
    elif not answer.envelope:
        example = {} if answer.example is None else {"example": answer.example}
        response["content"] = {media_type: dict(example) for media_type in answer.media_types}
    return response


def _check_links(paths: dict[str, dict[str, Any]]) -> None:
    """Every link names an operation of the document and parameters it has.

    :raise ValueError: naming the link, so a renamed view or field is caught here.
    """
    parameters = {
        operation["operationId"]: {p["name"] for p in operation["parameters"] if "name" in p}
        for methods in paths.values()
        for operation in methods.values()
    }
    for methods in paths.values():
        for operation in methods.values():
            for response in operation["responses"].values():
                for name, link in response.get("links", {}).items():
                    target = parameters.get(link["operationId"])
                    if target is None or not set(link["parameters"]) <= target:
                        raise ValueError(
                            f"{operation['operationId']}: link {name} names "
                            "an operation or parameters the document lacks"
                        )


def _errors(endpoint: Endpoint) -> dict[int, list[tuple[str, str]]]:
    """(code, message) of every error the route can answer, by status."""
    kinds: list[type[ApiError]] = list(endpoint.errors)
    if endpoint.source in ("body", "query_or_body"):
        kinds += _BODY_ERRORS
    if endpoint.form is not None:  # no JSON to get wrong: a form's fields are validated
        kinds += [PayloadTooLarge, RequestTimeout]
    if endpoint.model is not None or endpoint.idempotency_scope is not None:
        kinds.append(ValidationFailed)
    if endpoint.auth == "key_or_token":
        kinds += [Unauthorized, TokenExpired, TokenForAnotherUser]
    elif endpoint.auth == "key":
        kinds += [Unauthorized, TokenNotAccepted]
    if endpoint.uses_database:
        kinds.append(Unavailable)
    by_status: dict[int, list[tuple[str, str]]] = {}
    for kind in kinds:
        codes = _BAD_BODY_CODES if kind is BadRequest else (kind.default_code,)
        for code in codes:
            entry = (code, kind.default_message)
            if entry not in by_status.setdefault(kind.status, []):
                by_status[kind.status].append(entry)
    by_status[500] = [("internal_error", "Internal error. Quote the request_id to find it.")]
    return by_status


def _error_response(status: int, errors: list[tuple[str, str]]) -> Any:
    codes = ", ".join(f"`{code}`" for code, _ in errors)
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if status == Unavailable.status or any(
        code == IdempotencyKeyInUse.default_code for code, _ in errors
    ):
        headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    if status == Unauthorized.status:
        headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
    examples = {
        code: {
            "value": {
                "success": False,
                "error": {"code": code, "message": message, "details": []},
            }
        }
        for code, message in errors
    }
    return {
        "description": f"Error: {codes}.",
        "headers": headers,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/Error"},
                "examples": examples,
            }
        },
    }


def _model_schema(
    model: type[BaseModel], components: dict[str, Schema], *, inline: bool = False
) -> Schema:
    schema = model.model_json_schema(mode="validation", ref_template=REF)
    components.update(schema.pop("$defs", {}))
    if inline:
        return schema
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def _type_schema(kind: Any, components: dict[str, Schema]) -> Schema:
    schema = TypeAdapter(kind).json_schema(mode="serialization", ref_template=REF)
    components.update(schema.pop("$defs", {}))
    title = schema.get("title")
    if title is None or "anyOf" in schema:
        return schema
    components[title] = schema
    return {"$ref": REF.format(model=title)}


_ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"const": False},
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string", "description": "snake_case, to branch on."},
                "message": {"type": "string", "description": "For a person."},
                "details": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "problem"],
                        "properties": {"field": {"type": "string"}, "problem": {"type": "string"}},
                    },
                },
                "request_id": {"type": "string", "description": "On 500 answers."},
            },
        },
    },
}

_HEADERS: dict[str, Any] = {
    "X-Request-ID": {
        "description": "The request's id: the one sent when it is 1-64 of [A-Za-z0-9._-], "
        "else a new one. It is in the service's log line of the request.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
    },
    "ETag": {
        "description": "The tag of the counts, for If-None-Match.",
        "required": True,
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "`no-cache`: a cached copy must be checked each time.",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Idempotent-Replay": {
        "description": "`true` when this is the stored answer of an earlier request with "
        "the same Idempotency-Key.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}},
}

_PARAMETERS: dict[str, Any] = {
    "RequestId": {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "Your id for this request (1-64 of [A-Za-z0-9._-]); answered back.",
        "schema": {"type": "string"},
    },
    "IdempotencyKey": {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "Send the same key when retrying: the request is acted on at most "
        "once, and a retry gets the first answer again (with Idempotent-Replay: true). "
        "1-255 printable ASCII characters; keys are kept IDEMPOTENCY_TTL_HOURS, per route; "
        "use random ones.",
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e]*[\\x21-\\x7e])?$",
        },
    },
    "LastEventId": {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "The id of the last event received (EventSource sends it when it "
        "reconnects): the notifications made since are sent first. Empty: none.",
        "schema": {"type": "string", "pattern": "^([0-9a-fA-F]{24})?$"},
    },
    "IfNoneMatch": {
        "name": "If-None-Match",
        "in": "header",
        "required": False,
        "description": "The ETag of the counts you have: 304 while they are the same.",
        "schema": {"type": "string"},
    },
}

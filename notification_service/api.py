"""Routes declared once: each route states its input model, its answers and its errors.

One declaration (`Api.route`) drives everything about a route that is not its domain
call: the parsing of its input (query, JSON body, either, or path), the `{"success":
true, "data": ...}` envelope and status of its answer, its ETag, its Idempotency-Key,
what opens it (nothing, an API key, or a key or a user token), and its part of the
OpenAPI document (openapi.py reads the same `Endpoint`s). A view is then "take the
parsed model, call one domain function, return the data".

Hand-written rather than flask-openapi3 or spectree (the note of issue 8 says why):
the parsing here keeps the service's strictness (a repeated query parameter is refused,
bad JSON is a 400 in the one error shape, `LIST_MAX_LIMIT` comes from the config).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from flask import Blueprint, Response, current_app, g, make_response, request
from pydantic import BaseModel

from .config import Config
from .errors import ApiError, TokenForAnotherUser, TokenNotAccepted
from .idempotency import idempotent
from .web import not_modified, ok, parse_body, parse_form, parse_query, parse_query_or_body

Source = Literal["none", "query", "body", "query_or_body", "path"]
Method = Literal["GET", "POST", "PUT", "DELETE"]
# What opens a route (server.py checks it, openapi.py documents it): nothing; an API key;
# or an API key or the user token (tokens.py) of the `user_id` the request names.
Auth = Literal["open", "key", "key_or_token"]
# Where server.py puts the user a token opened the request for, and the token's expiry.
TOKEN_USER = "token_user"
TOKEN_EXPIRES_AT = "token_expires_at"


@dataclass(frozen=True)
class Link:
    """An OpenAPI link: what of this answer (or its request) another route takes.

    `parameters` maps that route's parameter names to runtime expressions, e.g.
    `$response.body#/data/notification_id` or `$request.body#/user_id`.
    """

    operation_id: str
    parameters: dict[str, str]
    description: str = ""


@dataclass(frozen=True)
class Answer:
    """One documented answer of a route.

    `schema` is the type of `data` in the JSON envelope (a TypedDict, a union of them),
    or None for an answer without a body. With `envelope=False` the view returns a
    ready `Response` of `media_types` (the document itself, the docs page, metrics).
    """

    description: str
    schema: Any = None
    headers: tuple[str, ...] = ()
    media_types: tuple[str, ...] = ("application/json",)
    envelope: bool = True
    example: Any = None
    links: dict[str, Link] = field(default_factory=dict)  # by name


@dataclass(frozen=True)
class Reply:
    """A view's data with a status other than its first declared one (fan-out's 200)."""

    data: Any
    status: int


@dataclass(frozen=True)
class Endpoint:
    name: str  # the view's name: Flask's endpoint and the OpenAPI operationId
    method: Method
    rule: str  # Flask's URL rule, e.g. /email/<email_id>
    tag: str
    summary: str
    description: str
    source: Source
    model: type[BaseModel] | None
    answers: dict[int, Answer]
    errors: tuple[type[ApiError], ...]
    idempotency_scope: str | None = None
    etag: Callable[[Any], str] | None = None
    auth: Auth = "key"
    # The token may also come as ?token= (GET /stream only: EventSource sends no headers).
    query_token: bool = False
    uses_database: bool = True
    # Validation context from the configuration (LIST_MAX_LIMIT); openapi.py shows it too.
    context: Callable[[Config], dict[str, Any]] | None = None
    body_example: Any = None
    params: dict[str, str] = field(default_factory=dict)  # query parameter descriptions
    headers: tuple[str, ...] = ()  # request headers it reads, by openapi.py's parameter names
    # A form body (urlencoded or multipart) read beside `model`: the view gets both.
    form: type[BaseModel] | None = None


class Api:
    """The route table of one blueprint, and what openapi.py documents."""

    def __init__(self, blueprint: Blueprint) -> None:
        self.blueprint = blueprint
        self.endpoints: list[Endpoint] = []

    def route(
        self,
        method: Method,
        rule: str,
        *,
        answers: dict[int, Answer],
        source: Source = "none",
        model: type[BaseModel] | None = None,
        errors: tuple[type[ApiError], ...] = (),
        tag: str = "inbox",
        idempotency_scope: str | None = None,
        etag: Callable[[Any], str] | None = None,
        auth: Auth = "key",
        query_token: bool = False,
        uses_database: bool = True,
        context: Callable[[Config], dict[str, Any]] | None = None,
        body_example: Any = None,
        params: dict[str, str] | None = None,
        headers: tuple[str, ...] = (),
        form: type[BaseModel] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if (source == "none") != (model is None):
            raise TypeError(f"{rule}: a model needs a source, and a source a model")
        if auth == "key_or_token" and (model is None or "user_id" not in model.model_fields):
            # A token opens only its own user's requests: the request must name one.
            raise TypeError(f"{rule}: a route a token opens needs a user_id field")
        if form is not None and (method == "GET" or model is None or source == "body"):
            # The form is the body: beside a model read from the path or the query.
            raise TypeError(f"{rule}: a form body goes with a path or query model, not GET")
        if query_token and (auth != "key_or_token" or method != "GET"):
            # A token in a URL can be sent by any page that links to it: never for a write.
            raise TypeError(f"{rule}: ?token= is for a GET that a token opens")

        def declare(view: Callable[..., Any]) -> Callable[..., Any]:
            summary, _, description = inspect.cleandoc(view.__doc__ or "").partition("\n\n")
            endpoint = Endpoint(
                name=view.__name__,
                method=method,
                rule=rule,
                tag=tag,
                summary=" ".join(summary.split()),
                description=" ".join(description.split()),
                source=source,
                model=model,
                answers=answers,
                errors=errors,
                idempotency_scope=idempotency_scope,
                etag=etag,
                auth=auth,
                query_token=query_token,
                uses_database=uses_database,
                context=context,
                body_example=body_example,
                params=params or {},
                headers=headers,
                form=form,
            )
            handler = _handler(endpoint, view)
            if idempotency_scope is not None:
                handler = idempotent(idempotency_scope)(handler)
            self.blueprint.add_url_rule(
                rule, endpoint=endpoint.name, view_func=handler, methods=[method]
            )
            self.endpoints.append(endpoint)
            return view

        return declare

    def open_endpoints(self) -> frozenset[str]:
        """Flask endpoint names of the routes answered without the API key."""
        return frozenset(n for n, e in self.by_flask_endpoint().items() if e.auth == "open")

    def by_flask_endpoint(self) -> dict[str, Endpoint]:
        """Each route's declaration by its Flask endpoint name (`request.endpoint`)."""
        return {f"{self.blueprint.name}.{e.name}": e for e in self.endpoints}


def _handler(endpoint: Endpoint, view: Callable[..., Any]) -> Callable[..., Response]:
    # The first declared answer is the usual one; a view returns Reply for the others.
    success = next(iter(endpoint.answers))

    @functools.wraps(view)
    def handle(**path: str) -> Response:
        model = None if endpoint.model is None else _parse(endpoint, path)
        owner = g.get(TOKEN_USER)
        if owner is not None:  # opened by a user token (server.py), not by a key
            if endpoint.auth != "key_or_token":
                raise TokenNotAccepted()
            if getattr(model, "user_id", None) != owner:
                raise TokenForAnotherUser()
        if model is None:
            result = view()
        elif endpoint.form is None:
            result = view(model)
        else:
            result = view(model, parse_form(endpoint.form))
        if isinstance(result, Response):
            return result
        reply = result if isinstance(result, Reply) else Reply(result, success)
        if endpoint.etag is not None:
            tag = endpoint.etag(reply.data)
            # Parsed only when sent: most calls carry no If-None-Match.
            if "HTTP_IF_NONE_MATCH" in request.environ and request.if_none_match.contains_weak(tag):
                return make_response(not_modified(tag))
            response, status = ok(reply.data, reply.status)
            response.set_etag(tag)
            # Cached copies must be checked each time (a 304 is cheap): the data can
            # change at any moment.
            response.headers["Cache-Control"] = "no-cache"
            return make_response(response, status)
        return make_response(ok(reply.data, reply.status))

    return handle


def _parse(endpoint: Endpoint, path: dict[str, str]) -> BaseModel:
    assert endpoint.model is not None
    context = validation_context(endpoint, _config())
    if endpoint.source == "query":
        # ?token= is the credential server.py has read, not a field of the request.
        ignored = ("token",) if endpoint.query_token else ()
        # With the rule's path parameters (/users/<user_id>/export?email=).
        return parse_query(endpoint.model, ignored=ignored, path=path, **context)
    if endpoint.source == "body":
        return parse_body(endpoint.model, **context)
    if endpoint.source == "query_or_body":
        return parse_query_or_body(endpoint.model, **context)
    return endpoint.model.model_validate(path, context=context)


def validation_context(endpoint: Endpoint, config: Config) -> dict[str, Any]:
    """What a route's model validates against from the configuration: the key table
    (KEYS_FILE) for every route, and the route's own (LIST_MAX_LIMIT). openapi.py
    documents the same."""
    own = endpoint.context(config) if endpoint.context is not None else {}
    return {"keys": config.keys, **own}


def _config() -> Config:
    config: Config = current_app.extensions["notification_service"].services.config
    return config

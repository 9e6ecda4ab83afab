"""The HTTP front: read each request whole, under a time and a size limit, before any
thread of the Flask app sees it.

A WSGI app reads its body from a blocking thread, so a client that sends half a body
holds that thread for as long as it likes: forty such clients took every thread of the
old gthread setup and, with it, the whole API. Here the server (granian, speaking ASGI)
reads headers in Rust under its own timeout, this module reads the body on the event
loop under CLIENT_TIMEOUT_SECONDS and MAX_BODY_BYTES, and only a complete request is
handed to a bounded pool of threads that run the Flask app. A request refused here
(too large, too slow, shorter than its Content-Length) still goes through the app, with
an empty body and the error attached, so that every error has the app's one JSON shape.

Every request is answered within DB_TIMEOUT_MS of its arrival and a margin: the app
keeps that deadline for its database calls once a thread runs it (server.py), and a
request that no thread has started by then (every thread held by slow work) is taken
back here, never to run, and answered `503 database_unavailable` in the same JSON shape
(errors.error_body).

The app learns what the edge knows (when the request was in, its refusal, the stream
hub) from one RequestContext (context.py). The same event loop holds the live streams
of GET /stream (stream_hub.py): their view runs in a thread like any request's, for one
read, and the connection is then held here.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from typing import Any

from flask import Flask
from werkzeug.exceptions import HTTPException

from . import logs, metrics
from .config import Config
from .context import ENVIRON_KEY, RequestContext, request_id
from .errors import ApiError, BadRequest, PayloadTooLarge, RequestTimeout, Unavailable, error_body
from .runtime import Runtime, build_runtime
from .server import create_app
from .stream_hub import StreamHub

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, whole body
# The route (a URL rule) of a method and path; None when none matches.
RouteOf = Callable[[str, str], str | None]
_HTTP1 = ("1.0", "1.1")  # where a request without Content-Length or Transfer-Encoding has no body


class BufferedWsgi:
    """An ASGI app that runs a WSGI app on complete, size-checked requests."""

    def __init__(
        self,
        wsgi_app: WsgiApp,
        *,
        max_body_bytes: int,
        body_timeout: float,
        threads: int,
        deadline: float = Config.db_timeout_ms / 1000,
        on_shutdown: Callable[[], None] | None = None,
        streams: StreamHub | None = None,
        route_of: RouteOf | None = None,
    ) -> None:
        """`deadline`: the seconds after its arrival by which a request must have a
        thread, or be answered 503 (DB_TIMEOUT_MS). `route_of`: names the route of an
        answer made here, for its access line and metrics."""
        self.wsgi_app = wsgi_app
        self.streams = streams
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.deadline = deadline
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="web")
        self.on_shutdown = on_shutdown
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # Anything else (websocket) is not served: returning without accepting refuses it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.streams is not None:
                    self.streams.end_on_signals()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Requests in flight finish first; then the dispatchers finish their sends.
                await asyncio.get_running_loop().run_in_executor(None, self._close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.streams is not None:
            self.streams.close()
        if self.on_shutdown is not None:
            self.on_shutdown()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        error: ApiError | None = None
        body = b""
        try:
            body = await self._read_body(scope, receive)
        except ApiError as exc:
            error = exc
        environ = wsgi_environ(scope, body)
        context = environ[ENVIRON_KEY] = RequestContext(
            received_at=time.monotonic(), edge_error=error, streams=self.streams
        )
        answer = await self._call_app(environ, context.received_at)
        if answer is None:
            answer = self._unavailable(scope, context.received_at)
        status, headers, chunks = answer
        held = context.held
        if held is not None:  # the view of /stream took a slot: the stream is held here
            assert self.streams is not None
            await self.streams.serve(
                held, status, headers, chunks, receive, send, context.received_at
            )
            return
        if error is not None:
            # The rest of the body may still be on its way: don't keep reading it.
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": chunks})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The whole body, within CLIENT_TIMEOUT_SECONDS.

        :raise PayloadTooLarge: past MAX_BODY_BYTES, announced or (chunked) received.
        :raise BadRequest: the body ended (or the client stopped sending) short of what its
            Content-Length or chunked framing promised. A client that closed only its
            sending side still reads the answer.
        :raise RequestTimeout: the body did not arrive in time.
        """
        declared, chunked = _framing(scope)
        if declared is not None and declared > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        first = None
        if declared == 0 or (declared is None and not chunked and scope["http_version"] in _HTTP1):
            # No body (most requests): its one empty message is already here, so no timer
            # and no buffer. (Over HTTP/2 a body needs neither header: read it as any.)
            first = await receive()
            if first["type"] == "http.request" and not first.get("more_body", False):
                body: bytes = first.get("body", b"")
                if not body:
                    return body
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._read_rest(first, receive, declared)
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_timeout:g} seconds."
            ) from None

    async def _read_rest(
        self, first: Message | None, receive: Receive, declared: int | None
    ) -> bytes:
        """The body that begins with `first` (None: not received yet)."""
        buffer = bytearray()
        message = first if first is not None else await receive()
        while True:
            if message["type"] == "http.disconnect":
                raise _incomplete(len(buffer), declared)
            buffer += message.get("body", b"")
            if len(buffer) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            if not message.get("more_body", False):
                break
            message = await receive()
        if declared is not None and len(buffer) != declared:
            raise _incomplete(len(buffer), declared)
        return bytes(buffer)

    async def _call_app(self, environ: dict[str, Any], received_at: float) -> Answer | None:
        """The app's answer, from a pool thread; None when no thread had started it by
        the request's deadline: it is then cancelled, and never runs.

        Once started, the app keeps the deadline itself (its database calls share it),
        so its answer is awaited whatever the time.
        """
        work = self.executor.submit(self._run, environ)
        # At the deadline, cancel() takes back the work if no thread has started it (a
        # started one cannot be cancelled); `answer`, which follows it, is then
        # cancelled too. A timer rather than asyncio.wait: a third of the cost.
        loop = asyncio.get_running_loop()
        timer = loop.call_later(received_at + self.deadline - time.monotonic(), work.cancel)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if work.cancelled() and task is not None and not task.cancelling():
                return None  # taken back by the timer, not this task cancelled
            raise
        finally:
            timer.cancel()

    def _unavailable(self, scope: Scope, received_at: float) -> Answer:
        """503 database_unavailable for a request that no thread took in time (every one
        waits on the database, or on fan-outs): in the app's JSON shape, with its
        Retry-After and X-Request-ID, logged and counted as the app would."""
        error = Unavailable()
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id(given.decode("latin-1") if given is not None else None)
        document = error_body(error.code, error.message, error.details)
        # As Flask's jsonify writes it: compact, ASCII, a final newline.
        body = (json.dumps(document, separators=(",", ":")) + "\n").encode("ascii")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("latin-1")),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()),
            (b"x-request-id", rid.encode("latin-1")),
            (b"x-content-type-options", b"nosniff"),  # as on every answer of the app
        ]
        method, path = scope["method"], scope["path"]
        route = self.route_of(method, path) if self.route_of is not None else None
        seconds = time.monotonic() - received_at
        logs.log_access(
            {
                "method": method,
                "route": route,
                "path": path,
                "status": error.status,
                "duration_ms": round(seconds * 1000, 3),
                "request_id": rid,
            }
        )
        metrics.observe_request(method, route, error.status, seconds)
        return error.status, headers, body

    def _run(self, environ: dict[str, Any]) -> Answer:
        """Call the WSGI app in a pool thread; return its status, headers and whole body."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return _no_write

        result = self.wsgi_app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = started
        encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        return int(status[:3]), encoded, body


def _no_write(data: bytes) -> None:
    raise RuntimeError("the app must return its body, not write() it")


def _incomplete(received: int, declared: int | None) -> BadRequest:
    promised = f"its Content-Length said {declared}" if declared is not None else "it was cut"
    return BadRequest(f"The body ended after {received} bytes; {promised}.", code="incomplete_body")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The body is larger than {limit} bytes (MAX_BODY_BYTES).")


def _framing(scope: Scope) -> tuple[int | None, bool]:
    """The request's Content-Length (None without one), and whether it has a
    Transfer-Encoding (chunked).

    :raise BadRequest: a Content-Length that is not a number.
    """
    declared: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BadRequest("Content-Length is not a number.", code="bad_request") from None
        elif name == b"transfer-encoding":
            chunked = True
    return declared, chunked


def wsgi_environ(scope: Scope, body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ of an ASGI HTTP scope whose body has been read whole."""
    server = scope.get("server") or ("localhost", 80)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        # WSGI strings are bytes seen as latin-1; ASGI's path is already UTF-8 decoded.
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope["query_string"].decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "REMOTE_ADDR": str(client[0]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        if b"_" in raw_name:
            # `X_Request_ID` and `X-Request-ID` would both become HTTP_X_REQUEST_ID: a proxy
            # in front could check one while the app reads the other (nginx drops such
            # names too).
            continue
        name = raw_name.decode("latin-1").upper().replace("-", "_")
        value = raw_value.decode("latin-1")
        if name in ("CONTENT_LENGTH", "TRANSFER_ENCODING"):
            continue  # the body is read whole: its real length, set above, frames it
        key = name if name == "CONTENT_TYPE" else f"HTTP_{name}"
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


def create_asgi_app(config: Config | None = None, runtime: Runtime | None = None) -> BufferedWsgi:
    """The factory the server calls in each worker process (after any fork); a test may
    pass a runtime of its own (its clock, say)."""
    if runtime is None:
        config = config or Config.from_env()
        logs.configure(config)  # before the runtime logs its first lines
        runtime = build_runtime(config)
    config = runtime.config
    app = create_app(runtime=runtime)
    streams = StreamHub(runtime.services.store, runtime.clock, config)
    return BufferedWsgi(
        app,
        max_body_bytes=config.max_body_bytes,
        body_timeout=config.client_timeout_seconds,
        threads=config.web_threads,
        deadline=config.db_timeout_ms / 1000,
        on_shutdown=runtime.close,
        streams=streams,
        route_of=routes_of(app),
    )


def routes_of(app: Flask) -> RouteOf:
    """The URL rule (`/email/<email_id>`) of a method and path in `app`; None when none
    matches. Called on the event loop only: one adapter serves every call."""
    adapter = app.url_map.bind("localhost")

    def route_of(method: str, path: str) -> str | None:
        try:
            rule, _ = adapter.match(path, method, return_rule=True)
        except HTTPException:
            return None
        return str(rule.rule)

    return route_of

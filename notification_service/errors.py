"""Typed errors the domain and the handlers raise, and the one JSON shape of their
answers (`error_body`): server.py's error handlers and the front (asgi.py) both use it."""

from __future__ import annotations

from typing import Any, ClassVar, TypedDict


class ErrorDetail(TypedDict):
    field: str
    problem: str


class ApiError(Exception):
    """An error with an HTTP status, a snake_case code and a message for a person."""

    status: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Internal error."

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        details: list[ErrorDetail] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.code = code or self.default_code
        self.details = details or []
        self.headers = headers or {}
        # More fields of the error object beside code, message and details.
        self.extra: dict[str, Any] = {}
        super().__init__(self.message)


class BadRequest(ApiError):
    status = 400
    default_code = "bad_request"
    default_message = "The request body is not a JSON object."


class Unauthorized(ApiError):
    status = 401
    default_code = "unauthorized"
    default_message = "This service needs an API key: send Authorization: Bearer <key>."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class TokenExpired(Unauthorized):
    """A genuine user token past its expiry: the page asks its backend for a new one."""

    default_code = "token_expired"
    default_message = "The user token has expired: get a new one."


class TokenNotAccepted(ApiError):
    """A genuine user token, on a route that only an API key opens."""

    status = 403
    default_code = "token_not_accepted"
    default_message = "A user token cannot call this route: it needs an API key."


class TokenForAnotherUser(ApiError):
    """A user token asking for another user's notifications."""

    status = 403
    default_code = "token_for_another_user"
    default_message = "This user token is for another user_id."


class InvalidUnsubscribeToken(ApiError):
    """Not an unsubscribe token this service signed: malformed, altered or forged."""

    status = 403
    default_code = "invalid_unsubscribe_token"
    default_message = "This unsubscribe link is not valid: it may have been altered."


class TokensNotConfigured(ApiError):
    status = 501
    default_code = "tokens_not_configured"
    default_message = "This service mints no user tokens: USER_TOKEN_SECRET is not set."


class RequestTimeout(ApiError):
    status = 408
    default_code = "request_timeout"
    default_message = "The request did not arrive in time."


class PayloadTooLarge(ApiError):
    status = 413
    default_code = "payload_too_large"
    default_message = "The body is too large."


class ValidationFailed(ApiError):
    status = 422
    default_code = "validation_failed"
    default_message = "Some fields are not valid."


class MandatoryKey(ValidationFailed):
    """A change that would turn off a key the user cannot turn off."""

    default_code = "mandatory_key"
    default_message = "This key is mandatory: its notifications cannot be turned off."

    def __init__(self, *keys: str) -> None:
        named = ", ".join(repr(key) for key in keys)
        super().__init__(
            f"A mandatory key cannot be turned off: {named}.",
            details=[{"field": f"keys.{key}", "problem": "is mandatory"} for key in keys],
        )
        self.keys = keys


class UserHasNoEmail(ValidationFailed):
    default_code = "user_has_no_email"
    default_message = "The user's document has no email address to send this notification to."


class NotFound(ApiError):
    status = 404
    default_code = "not_found"
    default_message = "Not found."


class UserNotFound(NotFound):
    default_code = "user_not_found"
    default_message = "No user with this user_id."


class NotificationNotFound(NotFound):
    default_code = "notification_not_found"
    default_message = "The user has no notification with this notification_id."


class EmailNotFound(NotFound):
    default_code = "email_not_found"
    default_message = "No queued email with this id."


class EmailNotFailed(ApiError):
    """A resend of an email that is not failed: queued, sent, or resent just now by
    another request (of two concurrent resends, one gets this)."""

    status = 409
    default_code = "email_not_failed"
    default_message = "This email has not failed: only a failed email can be sent again."


class UserDocumentInvalid(ApiError):
    """The user's document cannot take the notification (the application's data)."""

    status = 409
    default_code = "user_document_invalid"
    default_message = "The user's document cannot hold notifications."


class Unavailable(ApiError):
    """A dependency (the database) did not answer in time; the client may retry."""

    status = 503
    default_code = "database_unavailable"
    default_message = "The database is not answering; retry shortly."
    retry_after_seconds: ClassVar[int] = 2

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(self.retry_after_seconds)})


class FanOutCutShort(Unavailable):
    """The database stopped answering part way through a fan-out: `written` lists the
    users whose notifications (and emails) were written, in the request's order. A
    retry with the same Idempotency-Key writes the others and doubles none."""

    default_message = (
        "The database stopped answering part way: `written` lists the users done; "
        "retry with the same Idempotency-Key to complete the others."
    )

    def __init__(self, written: list[str]) -> None:
        super().__init__()
        self.extra = {"written": written}


class TooManyFanOuts(Unavailable):
    """This process runs as many fan-outs as it may (half its WEB_THREADS, at least one)."""

    default_code = "too_many_fan_outs"
    default_message = "This server runs as many fan-outs as it may at once; retry shortly."
    retry_after_seconds: ClassVar[int] = 5


class TooManyStreams(Unavailable):
    """This process holds STREAM_MAX_PER_PROCESS streams already; another may not."""

    default_code = "too_many_streams"
    default_message = "This server holds as many live streams as it may; retry shortly."
    retry_after_seconds: ClassVar[int] = 5


class IdempotencyKeyReused(ApiError):
    """The Idempotency-Key was first sent with another body: replaying would mislead."""

    status = 422
    default_code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was used with a different request body."


class IdempotencyKeyInUse(ApiError):
    """A request with the same Idempotency-Key is still running; the client may retry."""

    status = 409
    default_code = "idempotency_key_in_use"
    default_message = "A request with this Idempotency-Key is still running; retry shortly."

    def __init__(self, retry_after: int = 1) -> None:
        """`retry_after`: the seconds left on the key's lease (idempotency.retry_after);
        a retry after that takes over a request that was cut short."""
        super().__init__(headers={"Retry-After": str(retry_after)})


def error_body(
    code: str, message: str, details: list[ErrorDetail] | None = None, **extra: Any
) -> dict[str, Any]:
    """The body of every error answer: `{"success": false, "error": {"code", "message",
    "details", ...extra}}`."""
    return {
        "success": False,
        "error": {"code": code, "message": message, "details": details or [], **extra},
    }

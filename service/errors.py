"""The one error taxonomy of t2i-slim.

Every error the project raises on purpose is a `T2IError`. Each kind carries its `error_type` (the value that
appears in API bodies, job failure reasons and the `status` label of metrics) and the HTTP status the API maps it
to, in one place. Messages name the field, the bound and the value given.

This module imports nothing heavy: the API process, the CLI and the worker share it.
"""

from __future__ import annotations

from typing import Any


class T2IError(Exception):
    """Base of every deliberate error. `field` names the request field, config key or file at fault."""

    error_type = "internal"
    http_status = 500

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "error_type": self.error_type}
        if self.field is not None:
            body["field"] = self.field
        return body


class ValidationError(T2IError):
    """A request or argument is out of bounds or malformed."""

    error_type = "validation"
    http_status = 422


class UnknownNameError(ValidationError):
    """A pipeline, encoder or other registry name that does not exist; the message lists the known names."""

    def __init__(self, what: str, name: str, known: list[str], *, field: str | None = None,
                 routes: list[str] | None = None):
        known_list = ", ".join(sorted(known)) or "(none)"
        also = f"; routes: {', '.join(sorted(routes))}" if routes else ""
        super().__init__(f"unknown {what} {name!r}; known: {known_list}{also}", field=field or what)


class ConfigError(T2IError):
    """The models file, settings or a training config is wrong (bad key, bad value, unreadable file)."""

    error_type = "config"
    http_status = 500


class ModelLoadError(T2IError):
    """Weights are missing or corrupt, or two components do not fit together (widths, tokenizers)."""

    error_type = "model"
    http_status = 500


class PayloadTooLargeError(T2IError):
    error_type = "payload_too_large"
    http_status = 413


class RequestTimeoutError(T2IError):
    """The client did not send its request in time."""

    error_type = "request_timeout"
    http_status = 408


class UnsupportedMediaTypeError(T2IError):
    error_type = "unsupported_media_type"
    http_status = 415


class ConflictError(T2IError):
    """The request does not fit the resource's state (cancelling a finished job)."""

    error_type = "conflict"
    http_status = 409


class NotFoundError(T2IError):
    error_type = "not_found"
    http_status = 404


class OverloadedError(T2IError):
    """The queue is full; `retry_after` seconds is a hint for the client."""

    error_type = "overloaded"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int = 1, field: str | None = None):
        super().__init__(message, field=field)
        self.retry_after = retry_after


class UnauthorizedError(T2IError):
    """No API key, or an unknown one."""

    error_type = "unauthorized"
    http_status = 401


class UnavailableError(T2IError):
    """A dependency (Redis, every worker for an encoder) is not there right now."""

    error_type = "unavailable"
    http_status = 503


class CancelledError(T2IError):
    """A job was cancelled by its client."""

    error_type = "cancelled"
    http_status = 409


class TrainingError(T2IError):
    """A training run cannot go on (its loss or gradients are no longer finite); its last checkpoint is kept."""

    error_type = "training"
    http_status = 500


class GenerationError(T2IError):
    """Generation failed inside the worker (out of memory, a numerical error, an unexpected exception)."""

    error_type = "generation"
    http_status = 500

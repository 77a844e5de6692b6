"""The API's error answers: one JSON shape, ``{"code": ..., "detail": ...}``, for every status but most 422s.

A client branches on ``code`` (stable words, listed in docs/service.md) and shows ``detail``
(one plain sentence). Internals (hosts, URLs, tracebacks) never go into either; they go to the
log. 422 keeps FastAPI's validation shape (``detail[]`` naming each field), except for a name
the operator did not list (``unknown_model``, ``unknown_lora``: ``{code, detail}``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import HTTPException
from pydantic import BaseModel, Field

ErrorCode = Literal[
    "bad_request",
    "unknown_model",
    "unknown_lora",
    "unauthorized",
    "not_found",
    "conflict",
    "idempotency_conflict",
    "not_finished",
    "gone",
    "request_timeout",
    "too_large",
    "too_many_active_jobs",
    "rate_limited",
    "too_many_streams",
    "too_many_turns",
    "store_full",
    "unavailable",
    "internal",
]

DEFAULT_CODES: dict[int, ErrorCode] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
    507: "store_full",
}


class ErrorBody(BaseModel):
    """Every error answer but 422."""

    code: ErrorCode = Field(description="what went wrong, for programs (see docs/service.md)")
    detail: str = Field(description="one plain sentence for people")


class ApiError(HTTPException):
    """An HTTP error with its code (``ErrorBody.code``)."""

    def __init__(self, status_code: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers)
        self.code = code


def code_of(exc: HTTPException) -> ErrorCode:
    return getattr(exc, "code", None) or DEFAULT_CODES.get(exc.status_code, "internal")

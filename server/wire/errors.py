"""Errors that become JSON answers with a stable code (docs/api.md), and the Open Inference Protocol's
error body (docs/oip.md), which both faces answer /v2 with."""

from __future__ import annotations

import json

ECHO_CHARS = 64  # of a client's input quoted in an error's detail
DETAIL_CHARS = 1024  # of any detail: what a client sent is never sent back whole


def echo(value: object) -> str:
    """A client's input as an error quotes it: repr, cut to ECHO_CHARS characters."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else f"{text[:ECHO_CHARS]}... ({len(text)} characters)"


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        if len(detail) > DETAIL_CHARS:
            detail = f"{detail[:DETAIL_CHARS]}... (cut at {DETAIL_CHARS} characters)"
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}

    def to_json(self) -> bytes:
        """The error as it crosses from a front-end process to the engine."""
        return json.dumps({"status": self.status, "code": self.code, "detail": self.detail,
                           "headers": self.headers}).encode()

    def to_answer(self, request_id: str) -> bytes:
        """The JSON body a client gets (docs/api.md), compact as the server's other answers."""
        return json.dumps({"error": self.code, "detail": self.detail, "request_id": request_id},
                          separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> ApiError:
        found = json.loads(data)
        return cls(found["status"], found["code"], found["detail"], found.get("headers"))


def bad_image(detail: str) -> ApiError:
    return ApiError(400, "bad_image", detail)


CLOSE = {"Connection": "close"}  # a body left unread: the connection cannot carry another request


def request_timeout(detail: str, close: bool = True) -> ApiError:
    return ApiError(408, "request_timeout", detail, dict(CLOSE) if close else None)


def too_large(detail: str, close: bool = False) -> ApiError:
    """413; `close`: the body was refused before it was read (answered with Connection: close)."""
    return ApiError(413, "too_large", detail, dict(CLOSE) if close else None)


def unsupported_media_type(detail: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", detail)


def invalid_parameter(detail: str) -> ApiError:
    return ApiError(422, "invalid_parameter", detail)


def overloaded(detail: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "overloaded", detail, {"Retry-After": str(retry_after_s)})


def not_ready(detail: str) -> ApiError:
    return ApiError(503, "not_ready", detail, {"Retry-After": "5"})


def device_stalled(detail: str) -> ApiError:
    """The device finished no batch within `health.device_stall_s`: retry elsewhere, or later."""
    return ApiError(503, "device_stalled", detail, {"Retry-After": "5"})


def timeout(detail: str) -> ApiError:
    return ApiError(504, "timeout", detail)


def client_closed(detail: str) -> ApiError:
    """nginx's 499: the client left before it was answered. Nobody reads the answer; the status is for the
    metrics, where a client that gives up is neither a server error nor the variant's fault."""
    return ApiError(499, "client_closed_request", detail)


def internal(detail: str) -> ApiError:
    return ApiError(500, "internal", detail)


def invalid_request(detail: str) -> ApiError:
    """A request the Open Inference Protocol's rules refuse: malformed JSON, a tensor that contradicts its
    shape, ..."""
    return ApiError(400, "invalid_request", detail)


# The Open Inference Protocol's error body is {"error": "<text>"}: the text starts with the server's stable
# code ("unknown_variant: ..."), as the protocol has one field only. Statuses stay the server's (404 unknown
# model or version, 413, 503 with Retry-After, 504), except that a bad request is always 400, as the
# protocol and Triton have it (the /v1 routes say 422 invalid_parameter).
def oip_status(exc: ApiError) -> int:
    return 400 if exc.status == 422 else exc.status


def error_body(exc: ApiError) -> bytes:
    """The error as the Open Inference Protocol's body."""
    return json.dumps({"error": f"{exc.code}: {exc.detail}"}, ensure_ascii=False).encode()

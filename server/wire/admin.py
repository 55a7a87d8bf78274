"""The admin API's bearer token (`MAME_ADMIN_TOKEN`), checked by the engine and by front-end processes
alike before anything reads an admin request's body."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.wire.errors import ApiError

ADMIN_TOKEN_ENV = "MAME_ADMIN_TOKEN"
ADMIN_MAX_BODY_BYTES = 1 << 20  # an admin request's body (JSON of a few hundred bytes): no more is read


def admin_token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin bearer token, or None (admin disabled) when the variable is unset or blank."""
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


@dataclass(frozen=True)
class AdminDenied:
    """Why an admin request is refused: the HTTP status, the contract's error code, headers to send."""

    status: int
    error: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)

    def as_api_error(self) -> ApiError:
        return ApiError(self.status, self.error, self.detail, self.headers)


def check_admin(authorization: str | None, token: str | None) -> AdminDenied | None:
    """None when `Authorization: Bearer <token>` matches; else the refusal.

    No token configured -> 404 (the admin endpoints do not exist); no or malformed header -> 401;
    a wrong token -> 403. Tokens are compared in constant time, on their SHA-256 digests (so the token's
    length does not leak either).
    """
    if token is None:
        return AdminDenied(
            404, "admin_disabled", f"admin endpoints are disabled: {ADMIN_TOKEN_ENV} is not set"
        )
    challenge = {"WWW-Authenticate": 'Bearer realm="mame-admin"'}
    if authorization is None or not authorization.strip():
        return AdminDenied(401, "unauthorized", "missing Authorization: Bearer <token> header", challenge)
    scheme, _, given = authorization.strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given or " " in given:
        return AdminDenied(
            401,
            "unauthorized",
            "malformed Authorization header: expected 'Bearer <token>'",
            {"WWW-Authenticate": 'Bearer realm="mame-admin", error="invalid_request"'},
        )
    if not hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(token.encode()).digest()
    ):
        return AdminDenied(403, "forbidden", "wrong admin token")
    return None

"""The engine's middleware and error handlers: every answer has an X-Request-Id and every error the
contract's JSON body; admin routes are refused without the right token before their body is read."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http.answers import error_response, unexpected_error
from server.wire.admin import ADMIN_MAX_BODY_BYTES, check_admin
from server.wire.body import read_limited
from server.wire.errors import ApiError, invalid_parameter
from server.wire.protocol import request_id_of, without_reserved


class RequestIdMiddleware:
    """Puts the request id (the client's valid X-Request-Id, else a new one) in `request.state.request_id`
    and in the answer's X-Request-Id header. Plain ASGI: `@app.middleware("http")` (Starlette's
    BaseHTTPMiddleware) spends a task group, streams and events on every request and every body read."""

    def __init__(self, app: ASGIApp, drop_reserved: bool = True) -> None:
        self.app = app
        self.drop_reserved = drop_reserved  # x-mame-* headers; kept behind front-ends, which set them

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # as GET (load balancers probe with HEAD); uvicorn sends no body
            scope = {**scope, "method": "GET"}
        if self.drop_reserved:
            scope["headers"] = without_reserved(scope["headers"])
        request_id = request_id_of(scope["headers"])
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # too late for an answer: uvicorn closes the connection
                raise
            # A bug, answered here: Starlette's would be a text/plain 500 without an id, and uvicorn would
            # then
            # close the connection, failing the client's next request on it too.
            await unexpected_error(scope["method"], scope["path"], request_id)(scope, receive, send)


class AdminAuthMiddleware:
    """Refuses `/v1/admin/...` without the right token (MAME_ADMIN_TOKEN: 404 when unset, 401 without, 403
    when wrong) before anything reads the body: FastAPI parses a body parameter before it runs a route's
    dependencies, so a malformed body with a wrong token got a 422. Front-ends check the same way."""

    def __init__(self, app: ASGIApp, token: str | None, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.token = token
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/admin/"):
            headers = Headers(scope=scope)
            denied = check_admin(headers.get("authorization"), self.token)
            if denied is not None:
                answer = error_response(denied.as_api_error(), scope["state"]["request_id"])
                await answer(scope, receive, send)
                return
            # Read here within ADMIN_MAX_BODY_BYTES and the deadline, as front-ends do (FastAPI reads any
            # size).
            try:
                body = await read_limited(receive, headers.get("content-length", ""), ADMIN_MAX_BODY_BYTES,
                                          self.body_timeout_s)
            except ApiError as exc:
                await error_response(exc, scope["state"]["request_id"])(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """An ASGI `receive` that gives the body already read, then waits on the connection's own."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc, request.state.request_id)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return error_response(invalid_parameter(problems), request.state.request_id)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    request_id = request.state.request_id
    if exc.status_code == 400:  # FastAPI's "There was an error parsing the body" (not UTF-8, cut short, ...)
        cause = f"{type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else exc.detail
        return error_response(invalid_parameter(f"body: could not be read ({cause})"), request_id)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    # Starlette's headers too: a 405 must say what is allowed (RFC 9110 15.5.6).
    return error_response(
        ApiError(exc.status_code, code, str(exc.detail), dict(exc.headers or {})), request_id
    )


def install(app: FastAPI, *, admin_token: str | None, drop_reserved: bool,
            body_timeout_s: float = 30.0) -> None:
    """The middleware (request id outermost, then admin auth) and the contract's error answers."""
    # inside RequestIdMiddleware: the id is set
    app.add_middleware(AdminAuthMiddleware, token=admin_token, body_timeout_s=body_timeout_s)
    app.add_middleware(RequestIdMiddleware, drop_reserved=drop_reserved)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

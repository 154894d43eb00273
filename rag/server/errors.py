"""OpenAI-style error bodies for every failure, and the request-body size limit.

Clients get `{"error": {"message", "type", "param", "code"}}` with a 4xx for
anything they can fix and a bare 500 message otherwise: a stack trace goes to
the server log, never into a response.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_busy",
}


class ApiError(HTTPException):
    """An error with an OpenAI-style body; raise it anywhere in a handler."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message, headers)
        self.code, self.param = code, param
        self.type = type_ or _TYPES.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(e.detail, e.type, e.code, e.param), e.status_code, headers=e.headers
    )


def _loc(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _loc(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        param = "body"
        where = first.get("loc", ())[-1]
        first = {**first, "msg": f"invalid JSON at character {where}: {first.get('msg')}"}
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_response(
        ApiError(400, f"{param}: {first.get('msg')}{more}", "invalid_request", param)
    )


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(exc)
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(ApiError(exc.status_code, detail, headers=getattr(exc, "headers", None)))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error", "internal_error"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimit:
    """Refuses bodies over a byte limit (413) by Content-Length or, when chunked, while reading."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        upload_max_bytes: int,
        upload_paths: tuple[str, ...] = ("/v1/documents",),
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_max_bytes = upload_max_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_max_bytes if scope["path"] in self.upload_paths else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send(send, ApiError(400, "invalid Content-Length header"))
                return
            if int(length) > limit:
                await _send(
                    send, ApiError(413, f"request body over {limit} bytes", "body_too_large")
                )
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if (
                seen > limit
            ):  # handled by _http like any HTTPException raised while reading the body
                raise ApiError(413, f"request body over {limit} bytes", "body_too_large")
            return message

        await self.app(scope, counted, send)


async def _send(send: Send, e: ApiError) -> None:
    response = error_response(e)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})

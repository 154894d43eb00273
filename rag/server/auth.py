"""Bearer-token auth for the /v1 routes (KVRAG_API_KEYS, comma-separated; empty = open)."""

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rag.server.errors import ApiError


def parse_keys(raw: str) -> list[str]:
    return [k.strip() for k in raw.split(",") if k.strip()]


def bearer_auth(keys: list[str]) -> Callable[..., Awaitable[None]]:
    """A dependency that accepts `Authorization: Bearer <one of keys>`; 401 otherwise."""
    encoded = [k.encode() for k in keys]
    scheme = HTTPBearer(auto_error=False, description="one of KVRAG_API_KEYS")

    # No `from __future__ import annotations` here: FastAPI must see `scheme` in this
    # annotation at definition time, and it is a local.
    async def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(scheme)]) -> None:
        token = creds.credentials.encode() if creds else b""
        ok = False
        for key in encoded:  # every key compared, each in constant time: no early exit to time
            ok |= hmac.compare_digest(token, key)
        if not ok:
            raise ApiError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check

"""The request guard: bearer token, body size cap and body deadline, checked in front of routing.

FastAPI reads and parses a JSON body before any route dependency runs, so a check placed in a dependency runs
after a multi-GB body is already in memory. `RequestGuard` is a pure ASGI middleware instead: it answers 401 from
the headers alone, reads the body itself in chunks and answers 413 as soon as it passes `max_body_bytes` (chunked
uploads included), 408 when the whole body has not arrived within `body_timeout_s` (a slow-loris client), and
only then hands the buffered body to the app. A request therefore costs at most `max_body_bytes` of memory
before it is authenticated and bounded.

    api.add_middleware(RequestGuard, settings=lambda: GuardSettings(token="s3cret", max_body_bytes=1 << 20,
                                                                    body_timeout_s=10.0))
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi.security.utils import get_authorization_scheme_param

TOKEN_ENV = "QGATE_API_TOKEN"
OPEN_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # no token needed


@dataclass(frozen=True)
class GuardSettings:
    token: str | None  # the bearer token every other path needs; None: an open endpoint
    max_body_bytes: int  # a body past this many bytes is 413, read no further
    body_timeout_s: float  # the whole body must arrive within this many seconds, else 408


class Refusal(Exception):
    """An HTTP error answered by the guard itself, before the app sees the request."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


# ---- the token -----------------------------------------------------------------------------------


def read_token(explicit: str | None, token_file: str | None) -> str | None:
    """The API token of this process: `explicit` if given ("" = deliberately open), else the first line of
    `token_file`, else `$QGATE_API_TOKEN` (the node's environment or the Ray runtime env's `env_vars`)."""
    if explicit is not None:
        return explicit or None
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"serve.token_file {path} does not exist on this node")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"serve.token_file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, allow_open: bool) -> None:
    """Refuse to serve on a non-loopback address without a token, unless the operator said `allow_open`."""
    if token or allow_open or is_loopback(host):
        return
    raise PermissionError(
        f"refusing to serve on {host} without an API token: set serve.token_file (or {TOKEN_ENV} in the "
        "replicas' environment), bind serve.host=127.0.0.1, or set serve.allow_open=true to serve anyone")


def check_bearer(authorization: str | None, token: str) -> None:
    """`fastapi.security.HTTPBearer`'s parsing, a constant-time compare; a Refusal(401) unless it matches."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    challenge = {"www-authenticate": "Bearer"}
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        raise Refusal(401, "missing bearer token: send `Authorization: Bearer <token>`", challenge)
    if not hmac.compare_digest(credentials.encode("latin-1"), token.encode()):
        raise Refusal(401, "wrong bearer token", challenge)


# ---- the middleware ------------------------------------------------------------------------------


class RequestGuard:
    """Pure ASGI middleware: token, then size and deadline on a streamed body, then the app."""

    def __init__(self, app, settings: Callable[[], GuardSettings]):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        try:
            self._check_headers(scope, settings)
            body = await read_body(receive, settings.max_body_bytes, settings.body_timeout_s)
        except Refusal as refusal:
            await respond(send, refusal)
            return
        except ClientGone:
            return
        await self.app(scope, replay(body, receive), send)

    def _check_headers(self, scope, settings: GuardSettings) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if settings.token and relative_path(scope) not in OPEN_PATHS:
            check_bearer(headers.get("authorization"), settings.token)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise Refusal(413, f"request body of {declared} bytes is over the limit of {settings.max_body_bytes}")


def relative_path(scope) -> str:
    """The path below the app's route prefix (Serve mounts an app at `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


async def read_body(receive, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body, or a Refusal as soon as it is too large (413) or too slow (408)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise Refusal(408, f"request body not complete after {timeout_s:g} s") from None
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise Refusal(413, f"request body over the limit of {max_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """An ASGI `receive` that yields the buffered body once, then defers to the real one (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def respond(send, refusal: Refusal) -> None:
    """A JSON error like FastAPI's (`{"detail": ...}`); the connection closes, the unread body with it."""
    payload = json.dumps({"detail": refusal.detail}).encode()
    headers = {"content-type": "application/json", "content-length": str(len(payload)), "connection": "close",
               **refusal.headers}
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(key.encode(), value.encode()) for key, value in headers.items()]})
    await send({"type": "http.response.body", "body": payload})

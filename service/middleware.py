"""Pure ASGI middleware of the API: the request-body limit, request metrics, request ids.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the route still sees the client's
``http.disconnect`` and can drop the work of a client that went away.
"""

from __future__ import annotations

import time
import uuid

from . import metrics
from .errors import error_response

# Endpoint label values: the API's own paths; anything else is "other" so that a scan of
# random URLs cannot create unbounded label sets.
ENDPOINTS = frozenset(
    {
        "/tokenize",
        "/decode",
        "/reconstruct",
        "/generate",
        "/models",
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/openapi.json",
    }
)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: by Content-Length before reading anything, and by
    counting while reading (chunked uploads, lying headers). The body is read here in full
    (at most ``max_bytes``) and replayed to the app; later ``receive`` calls go straight to
    the server, so disconnects still arrive."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self):
        return error_response(
            413, "body_too_large", f"request body over the limit of {self.max_bytes} bytes"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await error_response(400, "bad_request", "invalid Content-Length")(
                        scope, receive, send
                    )
                if declared > self.max_bytes:
                    return await self._too_large()(scope, receive, send)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-body
                return await self.app(scope, _replay([message], receive), send)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    pending = list(messages)

    async def replayed():
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


class MetricsMiddleware:
    """Counts every request (``softvq_requests_total``) and times it
    (``softvq_request_duration_seconds``), errors included. Routes name the model they
    resolved in ``request.state.model``; requests that never got that far have model ""."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # if the app raises before answering

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            model = str(scope.get("state", {}).get("model", ""))
            metrics.REQUESTS.labels(endpoint, model, str(status)).inc()
            metrics.REQUEST_LATENCY.labels(endpoint, model).observe(time.perf_counter() - start)


class RequestIdMiddleware:
    """Every answer carries ``X-Request-ID``: the client's own (when short and printable) or
    a fresh one, so a request can be followed through logs and load-test reports."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id" and 0 < len(value) <= 128 and value.isascii():
                text = value.decode("ascii")
                rid = text if text.isprintable() else None
        rid = rid or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)

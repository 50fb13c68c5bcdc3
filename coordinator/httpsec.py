"""The HTTP API's edge: TLS for `coordinator up` (--tls-cert/--tls-key) and a cap on request
bodies, checked before any JSON is parsed (docs/security.md).

Trust boundary: every byte of a request is untrusted. uvicorn and Starlette read a body of
any size into memory; a body over the cap is answered 413 in OpenAI's error shape (Ollama's
under /api/) without reaching the endpoint, and the rest of the checks (schema, token limits
against the context) are the endpoints' own (coordinator/api.py, coordinator/ollama_api.py).
"""

from __future__ import annotations

import argparse
import json
import ssl
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.errors import UserError

MAX_BODY_BYTES = 8 * 1024 * 1024


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HTTPS")
    g.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="PEM",
        help="serve HTTPS with this certificate",
    )
    g.add_argument(
        "--tls-key", type=Path, default=None, metavar="PEM", help="the certificate's private key"
    )


def tls_files(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The certificate and key files for HTTPS ((None, None): plain HTTP); raises UserError
    when the pair is incomplete or does not load."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return None, None
    if cert is None or key is None:
        raise UserError("HTTPS needs both --tls-cert and --tls-key")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot use {cert} / {key} for HTTPS: {e}") from None
    return str(cert), str(key)


def url_scheme(args: argparse.Namespace) -> str:
    return "https" if getattr(args, "tls_cert", None) is not None else "http"


def _error(message: str, code: str, path: str = "") -> bytes:
    """OpenAI's error shape, or Ollama's (`{"error": message}`) under Ollama's /api/ routes."""
    if path.startswith("/api/"):
        return json.dumps({"error": message}).encode()
    body = {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }
    return json.dumps(body).encode()


class BodyLimit:
    """ASGI middleware: reads each HTTP request body (at most `max_bytes`) before the app
    runs, refuses bodies over the cap (413), and hands the app the body in one piece; later
    `receive` calls (disconnect watching) reach the server as usual."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, 413, self._too_large(), "request_too_large", scope)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, 413, self._too_large(), "request_too_large", scope)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body exceeds {self.max_bytes} bytes"

    @staticmethod
    async def _refuse(send: Send, status: int, message: str, code: str, scope: Scope) -> None:
        payload = _error(message, code, str(scope.get("path", "")))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload, "more_body": False})

"""JSON answers of the pages' API: a body with its status, or an error."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def json_text(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_bytes(request: Request, body: bytes, code: int = 200) -> bytes:
    """An answer of JSON ``body`` already encoded (rows kept as bytes)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return body


def json_response(request: Request, code: int, body: Any) -> bytes:
    return json_bytes(request, json_text(body), code)


def json_error(request: Request, code: int, message: str) -> bytes:
    return json_response(request, code, {"error": message})

"""JSON answers of the pages' API: a body with its status, or an error."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def json_response(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def json_error(request: Request, code: int, message: str) -> bytes:
    return json_response(request, code, {"error": message})

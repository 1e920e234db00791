"""Request and response bodies of Connect unary calls: binary proto or proto3 JSON,
optionally gzip-compressed on the way in."""

from __future__ import annotations

import json
import zlib

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from fluster_worker.web.rpc.errors import Code, ConnectError

PROTO = "application/proto"
JSON = "application/json"


#: The codecs by the exact Content-Type value a peer sends (the usual case).
_MEDIA_TYPES = {b"application/proto": PROTO, b"application/json": JSON}
#: The Content-Type value of an answer in each codec.
CONTENT_TYPES = {PROTO: b"application/proto", JSON: b"application/json"}


def media_type(content_type: bytes | None) -> str | None:
    """The codec named by a Content-Type header, or None when we do not speak it."""
    if not content_type:
        return None
    exact = _MEDIA_TYPES.get(content_type)
    if exact is not None:
        return exact
    return _MEDIA_TYPES.get(content_type.split(b";", 1)[0].strip().lower())


def _inflate(body: bytes, encoding: str | None, limit: int) -> tuple[bytes, bool] | None:
    """None for an identity body; else at most ``limit + 1`` bytes of it inflated,
    and whether the gzip stream ended there (gzip bombs never inflate further)."""
    if not encoding or encoding.strip().lower() == "identity":
        return None
    if encoding.strip().lower() != "gzip":
        raise ConnectError(Code.UNIMPLEMENTED, f"unsupported content encoding: {encoding[:40]!r}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ConnectError(Code.INVALID_ARGUMENT, f"malformed gzip body: {e}") from None
    return out, inflater.eof


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo Content-Encoding, never producing more than ``limit`` bytes (gzip bombs)."""
    inflated = _inflate(body, encoding, limit)
    if inflated is None:
        return body
    out, ended = inflated
    if len(out) > limit:
        raise ConnectError(Code.RESOURCE_EXHAUSTED, f"request body exceeds {limit} bytes")
    if not ended:
        raise ConnectError(Code.INVALID_ARGUMENT, "malformed gzip body: truncated")
    return out


def inflate_small(body: bytes, encoding: str | None, limit: int) -> bytes | None:
    """``body`` decompressed if that is at most ``limit`` bytes, else None (the
    caller then decompresses it in full elsewhere). Never inflates past ``limit``."""
    inflated = _inflate(body, encoding, limit)
    if inflated is None:
        return body if len(body) <= limit else None
    out, ended = inflated
    return out if len(out) <= limit and ended else None  # else big, or truncated: ``decompress`` tells which


def decode(body: bytes, codec: str, message_type: type[Message]) -> Message:
    message = message_type()
    if not body:  # an empty message, in either codec (HealthCheck, ListJobs)
        return message
    try:
        if codec == PROTO:
            message.ParseFromString(body)
        else:
            json_format.Parse(body.decode("utf-8") or "{}", message, ignore_unknown_fields=True)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConnectError(Code.INVALID_ARGUMENT, f"malformed request body: {first_line}") from None
    return message


def encode(message: Message, codec: str) -> bytes:
    if codec == PROTO:
        return message.SerializeToString()
    return json_format.MessageToJson(message, indent=None).encode("utf-8")


def error_body(code: Code, message: str, details: list[dict[str, str]] | None = None) -> bytes:
    body: dict[str, object] = {"code": code.wire_name, "message": message}
    if details:
        body["details"] = details
    return json.dumps(body).encode("utf-8")

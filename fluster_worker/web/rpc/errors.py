"""Connect error codes and the exception a service raises to answer with one."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Connect error codes with the HTTP status each maps to."""

    CANCELED = ("canceled", 499)
    UNKNOWN = ("unknown", 500)
    INVALID_ARGUMENT = ("invalid_argument", 400)
    DEADLINE_EXCEEDED = ("deadline_exceeded", 504)
    NOT_FOUND = ("not_found", 404)
    ALREADY_EXISTS = ("already_exists", 409)
    PERMISSION_DENIED = ("permission_denied", 403)
    RESOURCE_EXHAUSTED = ("resource_exhausted", 429)
    FAILED_PRECONDITION = ("failed_precondition", 400)
    ABORTED = ("aborted", 409)
    OUT_OF_RANGE = ("out_of_range", 400)
    UNIMPLEMENTED = ("unimplemented", 501)
    INTERNAL = ("internal", 500)
    UNAVAILABLE = ("unavailable", 503)
    DATA_LOSS = ("data_loss", 500)
    UNAUTHENTICATED = ("unauthenticated", 401)

    def __init__(self, wire_name: str, http_status: int) -> None:
        self.wire_name = wire_name
        self.http_status = http_status


class ConnectError(Exception):
    """Raised by a service method (or the framing layer) to answer with ``code``.

    ``message`` is one line for the caller; it never carries a traceback.
    """

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.wire_name}: {message}")
        self.code = code
        self.message = message

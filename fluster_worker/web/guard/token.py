"""The optional bearer token (``--auth-token-file``).

Calls send ``Authorization: Bearer <token>``. Browsers give it once (``?token=``
on any page, or the form a refused page shows) and then keep a cookie holding
a value derived from the token (HttpOnly, SameSite=Strict, Secure whenever the
browser will keep a Secure cookie: over TLS and on loopback). Every
comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from twisted.web.server import Request

COOKIE = b"fluster_worker_auth"
MAX_TOKEN_BYTES = 4096
#: One year: the cookie lasts until the token changes (which changes its value).
COOKIE_MAX_AGE_S = 365 * 24 * 3600


class TokenError(ValueError):
    """The token file is unusable; the message is one line naming why."""


def load_token(path: Path) -> bytes:
    """The token in ``path`` (surrounding whitespace dropped). Small, blocking:
    read once at start-up, before the reactor runs."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise TokenError(f"cannot read the token file {str(path)[:200]}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise TokenError(f"the token file {str(path)[:200]} is not a regular file")
    if len(raw) > MAX_TOKEN_BYTES:
        raise TokenError(f"the token file {str(path)[:200]} holds more than {MAX_TOKEN_BYTES} bytes")
    token = raw.strip()
    if len(token) < 16:
        raise TokenError(f"the token in {str(path)[:200]} is shorter than 16 characters")
    if any(b < 0x21 or b > 0x7E for b in token):
        raise TokenError(f"the token in {str(path)[:200]} must be printable ASCII without spaces")
    return token


class BearerToken:
    """Checks a request's credentials against one token."""

    def __init__(self, token: bytes) -> None:
        self._token = token
        self._cookie = hmac.new(token, b"fluster-worker dashboard cookie", hashlib.sha256).hexdigest().encode()

    def matches(self, given: bytes) -> bool:
        return hmac.compare_digest(given, self._token)

    def carried_by(self, request: Request) -> bool:
        """Whether the request carries the token (header) or the cookie."""
        header = request.getHeader(b"authorization")
        if header is not None:
            scheme, _, value = header.partition(b" ")
            if scheme.lower() == b"bearer" and self.matches(value.strip()):
                return True
        cookie = request.getCookie(COOKIE)
        return cookie is not None and hmac.compare_digest(cookie, self._cookie)

    def set_cookie(self, request: Request, secure: bool) -> None:
        request.addCookie(
            COOKIE,
            self._cookie,
            path=b"/",
            max_age=str(COOKIE_MAX_AGE_S).encode(),
            httpOnly=True,
            secure=secure,
            sameSite="strict",
        )

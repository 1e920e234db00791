"""The token's pages: the login form, the redirect that drops ``?token=`` from
the address bar, and the cookie's Secure flag (``gate.AccessGate`` decides
when they are shown)."""

from __future__ import annotations

import html
from urllib.parse import quote, urlencode, urlsplit

from twisted.web.server import Request

from fluster_worker.host import is_local_host
from fluster_worker.web.guard.hosts import host_name
from fluster_worker.web.rpc.errors import Code


def cookie_secure(request: Request) -> bool:
    """Browsers keep a Secure cookie only over TLS, or on loopback."""
    if request.isSecure():
        return True
    header = request.getHeader(b"host")
    host = host_name(header.decode("latin-1")) if header is not None else None
    return host is not None and is_local_host(host)


def form_arg(request: Request, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


def local_path(target: str) -> str:
    """A path on this worker to send a browser to: never another site."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return quote(parts.path, safe="/%:@!$&'()*+,;=-._~") or "/"


def without_token(request: Request) -> str:
    path = local_path((request.path or b"/").decode("latin-1"))
    rest = [(k, v) for k, values in (request.args or {}).items() if k != b"token" for v in values]
    return path + ("?" + urlencode(rest) if rest else "")


def redirect(request: Request, target: str) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"location", target.encode("ascii", "replace"))
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return b"see " + target.encode("ascii", "replace") + b"\n"


def login_page(request: Request, target: str, reason: str) -> bytes:
    request.setResponseCode(Code.PERMISSION_DENIED.http_status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    note = f"<p>{html.escape(reason)}</p>" if reason else ""
    return (
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Fluster worker: token</title>"
        "</head><body><h1>This worker needs its token</h1>"
        f"{note}<form method=\"post\" action=\"/login\">"
        f"<input type=\"hidden\" name=\"next\" value=\"{html.escape(local_path(target))}\">"
        "<label>Token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus></label> "
        "<button type=\"submit\">Sign in</button></form></body></html>"
    ).encode()

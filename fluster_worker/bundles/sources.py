"""Where bundles come from: which URLs are accepted (absolute paths, file://,
http(s):// and gs://), how one is shown in a line (no credentials, no query:
signed URLs), what a fetch of one gives (Fetched), and BundleError, the
one-line error of a bundle."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from fluster_worker.bundles import unzip

__all__ = ["BundleError", "Fetched", "Source", "parse_source", "shown"]

Source = tuple[str, str]  # ("file", "/abs/path") or (scheme, url)


class BundleError(Exception):
    """A bundle cannot be fetched or unpacked; ``str(e)`` is one line naming the cause."""


@dataclass(frozen=True)
class Fetched:
    digest: str  # sha256 of the zip
    zip_path: Path | None  # a temp file, or None: unchanged since `digest`, still cached


def parse_source(url: str) -> Source:
    """Check a bundle URL: absolute paths, file://, http(s):// and gs:// only."""
    if not url:
        raise BundleError("bundle URL is empty")
    if url.startswith("/"):
        return ("file", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BundleError(f"invalid bundle URL: {shown(url)}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            raise BundleError(f"file:// bundle URL names a remote host: {shown(url)}")
        if not path.startswith("/"):
            raise BundleError(f"bundle path is not absolute: {shown(url)}")
        return ("file", path)
    if scheme in ("http", "https", "gs"):
        if not parts.netloc:
            raise BundleError(f"bundle URL has no host: {shown(url)}")
        return (scheme, url)
    if not scheme:
        raise BundleError(f"bundle path is not absolute: {shown(url)}")
    raise BundleError(f"unsupported bundle URL scheme {unzip.oneline(scheme)!r}: {shown(url)}")


def shown(url: str) -> str:
    """``url`` fit for a log line: one line, no credentials or query (signed URLs)."""
    try:
        parts = urlsplit(url)
        if parts.scheme and (parts.query or parts.fragment or "@" in parts.netloc):
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
            url += "?..." if parts.query else ""
    except ValueError:
        pass
    return unzip.oneline(url)

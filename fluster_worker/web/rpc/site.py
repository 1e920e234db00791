"""An HTTP Site whose requests stop buffering a body past a size limit."""

from __future__ import annotations

import io
from typing import Any

from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from fluster_worker.common.http import quiet_channel

DEFAULT_MAX_BODY_BYTES = 32 * 2**20


class BoundedRequest(Request):
    """A Request that discards body bytes past ``max_body_bytes``.

    Twisted buffers a whole body before the resource sees it; an oversized one
    is instead dropped as it arrives and flagged, so a handler answers
    resource_exhausted without the worker ever holding it.
    """

    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    body_too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self.body_too_large = True
            if self.content is not None:
                self.content.close()
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)


def bounded_site(resource: IResource, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Site:
    """A Site for ``resource`` whose request bodies are capped at ``max_body_bytes``."""

    class _Request(BoundedRequest):
        pass

    _Request.max_body_bytes = max_body_bytes

    def factory(*args: Any, **kwargs: Any) -> Request:
        return _Request(*args, **kwargs)

    site = QuietSite(resource, requestFactory=factory)
    # Twisted prints every request to the log by default; the RPC layer logs what matters.
    site.noisy = False
    return site


class QuietSite(Site):
    """A Site whose connections do not log ``Timing out client`` when an idle
    keep-alive connection (a controller's, a polling client's) is closed."""

    def buildProtocol(self, addr: Any) -> Any:
        return quiet_channel(super().buildProtocol(addr))

"""Quiet HTTP: an outgoing connection pool and an HTTP server channel that do not
write a line to the log per connection.

Twisted's client factories log ``Starting factory`` / ``Stopping factory`` for
every new connection (``Factory.noisy``), and its server channel logs ``Timing
out client`` for every idle keep-alive connection it closes. A worker heartbeats
every 10 s and is polled by clients all day: those lines would bury the ones
that matter. Failures still surface as errors of the calls.
"""

from __future__ import annotations

from typing import Any, cast

from treq.client import HTTPClient
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAgent
from zope.interface import provider

#: The HTTPChannel events that are routine for a long-lived server.
_ROUTINE_CHANNEL_EVENTS = ("Timing out client", "Forcibly timing out client")


class QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """A persistent HTTPConnectionPool whose connections are not logged."""

    _factory = QuietHTTP11ClientFactory


def quiet_http_client(
    reactor: Any, *, max_per_host: int = 2, idle_timeout_s: int = 240, retry: bool = False
) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client over its own persistent, quiet pool (close the pool with
    ``closeCachedConnections`` when done)."""
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_per_host
    pool.cachedConnectionTimeout = idle_timeout_s
    pool.retryAutomatically = retry
    return HTTPClient(cast(IAgent, Agent(reactor, pool=pool))), pool


@provider(ILogObserver)
def _drop_routine_channel_events(event: LogEvent) -> None:
    if str(event.get("log_format", "")).startswith(_ROUTINE_CHANNEL_EVENTS):
        return
    globalLogPublisher(event)


#: Given to each server channel: everything it logs but the routine idle timeouts.
QUIET_CHANNEL_LOG = Logger(
    namespace="twisted.web.http.HTTPChannel", observer=cast(ILogObserver, _drop_routine_channel_events)
)


def quiet_channel(protocol: Any) -> Any:
    """Make the HTTPChannel under a protocol that ``Site.buildProtocol`` returned
    skip the routine idle-timeout lines (other events still reach the log)."""
    channel = getattr(protocol, "_channel", protocol)
    if isinstance(channel, HTTPChannel):
        channel._log = QUIET_CHANNEL_LOG
    return protocol

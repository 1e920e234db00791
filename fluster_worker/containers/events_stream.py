"""The events-stream thread of one worker id's containers: one long-lived HTTP
request on its own thread (never a pool thread), filtered by our label, that
hands each ``die``, ``kill`` and ``oom`` event to the reactor, reconnecting with
backoff until it is closed. ExitWatcher (events.py) makes sense of them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger

from fluster_worker.common.backoff import Backoff
from fluster_worker.containers.engine import Engine, explain
from fluster_worker.containers.spec import WORKER_ID_LABEL

__all__ = ["EventsStream"]

log = Logger()

_RECONNECT = Backoff(initial_s=0.5, max_s=5.0, factor=2.0, jitter=0.0)


class EventsStream:
    """The thread (``thread`` while there is one) and its stream. Its news reach
    the reactor thread as calls: ``subscribed(live_restore)`` after every
    (re)connect, ``connect_failed(reason)``, ``lost()`` when a stream ends,
    ``event(event)``, and ``ended()`` once the thread is over."""

    def __init__(
        self,
        reactor: IReactorTime,
        engine: Engine,
        worker_id: str,
        *,
        subscribed: Callable[[bool], None],
        connect_failed: Callable[[str], None],
        lost: Callable[[], None],
        event: Callable[[dict[str, Any]], None],
        ended: Callable[[], None],
    ) -> None:
        # The real reactor provides both; the events thread hands its news over.
        self._from_threads = cast(IReactorFromThreads, reactor)
        self._engine = engine
        self.worker_id = worker_id
        self._subscribed = subscribed
        self._connect_failed = connect_failed
        self._lost = lost
        self._event = event
        self._ended = ended
        self._stop_event = threading.Event()
        self._stream_lock = threading.Lock()
        self._stream: Any = None  # docker.types.CancellableStream while connected
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop_event.clear()
        self.thread = threading.Thread(
            target=self._events_loop, name=f"docker-events-{self.worker_id[:32]}", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        """Close the stream: the thread ends soon after (``ended``)."""
        self._stop_event.set()
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            _close_quietly(stream)

    def _thread_ended(self) -> None:
        self.thread = None
        self._ended()

    def _log_from_thread(self, text: str, **fields: object) -> None:
        self._from_threads.callFromThread(lambda: log.warn(text, **fields))

    def _events_loop(self) -> None:
        """The events thread: stream `die` events of our containers to the reactor,
        reconnecting with backoff until close() sets the stop event."""
        failures = 0
        filters = {
            "type": "container",
            "event": ["die", "kill", "oom"],
            "label": f"{WORKER_ID_LABEL}={self.worker_id}",
        }
        try:
            while not self._stop_event.is_set():
                try:
                    stream = self._engine.api().events(decode=True, filters=filters)
                except Exception as e:
                    if failures == 0:
                        self._log_from_thread(
                            "docker events: connect failed ({error}); retrying with backoff",
                            error=explain(e),
                        )
                    self._from_threads.callFromThread(self._connect_failed, explain(e))
                    self._stop_event.wait(_RECONNECT.base(failures))
                    failures += 1
                    continue
                with self._stream_lock:
                    if self._stop_event.is_set():
                        _close_quietly(stream)
                        break
                    self._stream = stream
                failures = 0
                self._from_threads.callFromThread(self._subscribed, self._live_restore())
                try:
                    for event in stream:
                        if isinstance(event, dict):
                            self._from_threads.callFromThread(self._event, event)
                except Exception as e:
                    if not self._stop_event.is_set():
                        self._log_from_thread("docker events: stream failed: {error}", error=explain(e))
                with self._stream_lock:
                    self._stream = None
                _close_quietly(stream)
                if not self._stop_event.is_set():
                    self._from_threads.callFromThread(self._lost)
                    self._log_from_thread("docker events: stream ended; reconnecting")
                    self._stop_event.wait(_RECONNECT.base(failures))
        finally:
            self._from_threads.callFromThread(self._thread_ended)

    def _live_restore(self) -> bool:
        """Events thread: whether the engine keeps containers running through its
        restarts (False when it cannot say)."""
        try:
            return bool(self._engine.api().info().get("LiveRestoreEnabled"))
        except Exception:
            return False


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass

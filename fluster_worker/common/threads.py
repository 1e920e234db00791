"""The dedicated thread pool that every blocking call (docker-py, file I/O) runs on."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingPool(Service):
    """Owns a ThreadPool for blocking work, so the reactor's own pool stays free
    for DNS. ``run`` is the one way in; it returns a Deferred."""

    def __init__(self, reactor: IReactorThreads, name: str, max_threads: int = 16) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)  # type: ignore[arg-type]

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # ThreadPool.stop() joins its workers: never on the reactor thread, and not
        # on the reactor's own pool either (it serves DNS): a thread of its own.
        stopped: Deferred[None] = Deferred()

        def stop() -> None:
            self.pool.stop()
            self._reactor.callFromThread(stopped.callback, None)

        threading.Thread(target=stop, name=f"stop-{self.pool.name}", daemon=True).start()
        return stopped

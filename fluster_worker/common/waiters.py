"""Waiting for something, one new Deferred per waiter.

Handing one Deferred to two waiters lets the first one's callbacks change what
the second one sees; so each waiter gets a Deferred of its own, and cancelling
it drops only that waiter.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")


class Waiters(Generic[T]):
    """Everyone waiting for the next time something happens."""

    def __init__(self) -> None:
        self._pending: list[Deferred[T]] = []

    def wait(self) -> Deferred[T]:
        d: Deferred[T] = Deferred(canceller=self._drop)
        self._pending.append(d)
        return d

    def fire(self, result: T) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.callback(result)

    def fail(self, error: BaseException | Failure) -> None:
        pending, self._pending = self._pending, []
        for d in pending:
            d.errback(error if isinstance(error, Failure) else Failure(error))

    def __len__(self) -> int:
        return len(self._pending)

    def _drop(self, d: Deferred[T]) -> None:
        if d in self._pending:
            self._pending.remove(d)


class Once(Generic[T]):
    """Something that happens once: waiters before it get its result when it
    happens, waiters after it get the result at once."""

    def __init__(self) -> None:
        self._waiters: Waiters[T] = Waiters()
        self._outcome: tuple[T] | Failure | None = None

    @property
    def happened(self) -> bool:
        return self._outcome is not None

    def wait(self) -> Deferred[T]:
        if self._outcome is None:
            return self._waiters.wait()
        if isinstance(self._outcome, Failure):
            return fail(self._outcome)
        return succeed(self._outcome[0])

    def fire(self, result: T) -> None:
        if self._outcome is None:
            self._outcome = (result,)
            self._waiters.fire(result)

    def fail(self, error: BaseException | Failure) -> None:
        if self._outcome is None:
            failure = error if isinstance(error, Failure) else Failure(error)
            self._outcome = failure
            self._waiters.fail(failure)

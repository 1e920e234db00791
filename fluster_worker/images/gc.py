"""Leases and garbage collection of job images (owned by `ImageBuilder`).

A tag is in use while leased (a job runs on it) or while its build is in
flight; gc never removes it then. Last-use times live in memory (lease, release,
build); images not seen since the worker started fall back to their creation
time. A build that finds its tag being removed waits for the removal
(`removal`) and then builds it again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fluster_worker.common.text import one_line as text_line
from fluster_worker.common.threads import BlockingPool
from fluster_worker.common.waiters import Waiters
from fluster_worker.images.dockerfile import IMAGE_LABEL, LAYER_LABEL


@dataclass(frozen=True)
class JobImage:
    image_id: str
    tags: tuple[str, ...]
    added_bytes: int  # what the image adds on top of the base image
    created: float


class ImageGC:
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: BlockingPool,
        docker_client: Callable[[], docker.DockerClient],
        base_image: str,
        repository: str,
        *,
        building: Callable[[str], bool],
        max_images: int,
        max_image_bytes: int,
        dangling_max_age: float,
        removing: Callable[[str], None] = lambda tag: None,
    ) -> None:
        """``removing(tag)`` is called when a removal of ``tag`` starts."""
        self._clock = clock
        self._on_removing = removing
        self._pool = pool
        self._docker = docker_client
        self._base_image = base_image
        self._repository = repository
        self._building = building
        self._max_images = max_images
        self._max_image_bytes = max_image_bytes
        self._dangling_max_age = dangling_max_age
        self._leases: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._removing: dict[str, Waiters[None]] = {}
        self._lock = DeferredLock()

    # --- called by the builder and its users ----------------------------------

    def lease(self, tag: str) -> Callable[[], None]:
        self._leases[tag] = self._leases.get(tag, 0) + 1
        self.touch(tag)
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._leases[tag] -= 1
            if not self._leases[tag]:
                del self._leases[tag]
            self.touch(tag)

        return release

    def touch(self, tag: str) -> None:
        self._last_used[tag] = self._clock.seconds()

    def removal(self, tag: str) -> Deferred[None]:
        """Fires once no removal of tag is in progress (at once if none is)."""
        waiters = self._removing.get(tag)
        if waiters is None:
            return succeed(None)
        return waiters.wait()

    def gc(self) -> Deferred[list[str]]:
        """Remove job images of our repository, oldest-unused first, until at
        most max_images remain and they add at most max_image_bytes to the base
        image (layers shared between job images count once per image, so the
        budget is conservative); then the dangling leftovers of failed builds
        older than dangling_max_age. Fires with the removed tags; one gc at a
        time."""
        return Deferred.fromCoroutine(self._gc())

    # --- internals ------------------------------------------------------------

    async def _gc(self) -> list[str]:
        await self._lock.acquire()
        try:
            removed = await self._remove_over_budget()
            try:
                pruned = await self._pool.run(self._prune_dangling, self._clock.seconds())
            except Exception:
                self.log.failure("image gc could not prune dangling build layers")
            else:
                if pruned:
                    self.log.info("image gc pruned {count} dangling build layers", count=pruned)
            return removed
        finally:
            self._lock.release()

    async def _remove_over_budget(self) -> list[str]:
        images = await self._pool.run(self._list_job_images)
        count = len(images)
        total = sum(i.added_bytes for i in images)
        removed: list[str] = []
        for image in sorted(images, key=self._last_use):
            if count <= self._max_images and total <= self._max_image_bytes:
                break
            if self._in_use(image):  # checked right before each removal
                continue
            try:
                ok = await self._remove(image)
            except Exception:
                self.log.failure("image gc could not remove {tags}", tags=image.tags)
                continue
            if ok:
                removed.extend(image.tags)
                count -= 1
                total -= image.added_bytes
        if removed:
            self.log.info("image gc removed {tags}", tags=removed)
        return removed

    def _last_use(self, image: JobImage) -> float:
        return max(self._last_used.get(t, image.created) for t in image.tags)

    def _in_use(self, image: JobImage) -> bool:
        return any(t in self._leases or self._building(t) for t in image.tags)

    async def _remove(self, image: JobImage) -> bool:
        for tag in image.tags:
            self._removing.setdefault(tag, Waiters())
            self._on_removing(tag)
        removed = False
        try:
            removed = await self._pool.run(self._remove_tags, image)
            return removed
        finally:
            for tag in image.tags:
                if removed:
                    self._last_used.pop(tag, None)
                self._removing.pop(tag, Waiters()).fire(None)

    # --- blocking (in the pool) -------------------------------------------------

    def _list_job_images(self) -> list[JobImage]:
        api = self._docker().api
        try:
            base_size = int(api.inspect_image(self._base_image).get("Size") or 0)
        except docker.errors.ImageNotFound:
            base_size = 0
        images = []
        for info in api.images(filters={"label": f"{IMAGE_LABEL}=1"}):
            tags = tuple(t for t in info.get("RepoTags") or () if t.startswith(self._repository + ":"))
            if tags:
                size = max(0, int(info.get("Size") or 0) - base_size)
                images.append(JobImage(info["Id"], tags, size, float(info.get("Created", 0))))
        return images

    def _remove_tags(self, image: JobImage) -> bool:
        client = self._docker()
        for tag in image.tags:
            try:
                client.images.remove(tag, noprune=False)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code == 409:  # used by a container, running or not
                    self.log.info("image gc kept {tag}: {error}", tag=tag, error=one_line(e))
                    return False
                raise
        return True

    def _prune_dangling(self, now: float) -> int:
        """Remove the untagged leaf layers failed builds of our repository left
        behind. Younger ones may be the parent of a step about to start."""
        api = self._docker().api
        pruned = 0
        filters: dict[str, Any] = {"dangling": True, "label": f"{LAYER_LABEL}={self._repository}"}
        for info in api.images(filters=filters):
            if now - float(info.get("Created", now)) < self._dangling_max_age:
                continue
            try:
                api.remove_image(info["Id"], noprune=False)
                pruned += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                if e.status_code != 409:  # a container or a child image uses it
                    raise
        return pruned


def one_line(e: BaseException) -> str:
    """An exception as one bounded line (docker's explanation when it has one)."""
    if isinstance(e, docker.errors.APIError) and e.explanation:
        text = str(e.explanation)
    else:
        text = str(e) or type(e).__name__
    return text_line(text)

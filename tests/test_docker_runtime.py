"""ContainerRuntime on the real engine (marked docker), plus unit tests of names, specs
and usage sampling against a fake client."""

from __future__ import annotations

import queue
import random
import re
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.task import deferLater

from fluster_worker.common.threads import BlockingPool
from fluster_worker.containers.ports import PortAllocator
from fluster_worker.containers.runtime import (
    ContainerError,
    ContainerRuntime,
    ContainerSpec,
    ExitStatus,
    Mount,
    UsageSample,
    container_name,
    sanitize_name_part,
)

MiB = 2**20
DOCKER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")


# ---------------------------------------------------------------------------
# Helpers


def now() -> float:
    return reactor.seconds()  # type: ignore[attr-defined,no-any-return,misc]


async def pause(seconds: float = 0.05) -> None:
    """Yield to the reactor between polls (always inside a deadline loop)."""
    await deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


async def poll(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float = 20.0
) -> None:
    deadline = now() + timeout
    while not await check():
        if now() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await pause()


async def within(d: Deferred[Any], seconds: float = 30.0) -> Any:
    """Await ``d``, failing the test (TimeoutError) instead of hanging the suite."""
    return await d.addTimeout(seconds, reactor)  # type: ignore[arg-type]


def spec_for(
    runtime: ContainerRuntime, image: str, command: list[str], **kwargs: Any
) -> ContainerSpec:
    job_id = kwargs.pop("job_id", f"job-{uuid.uuid4().hex[:8]}")
    labels = {"fluster.job_id": job_id, "fluster.attempt_id": "0", **kwargs.pop("labels", {})}
    return ContainerSpec(
        name=container_name(runtime.worker_id, job_id, 0),
        image=image,
        command=command,
        labels=labels,
        **kwargs,
    )


async def logs(pool: BlockingPool, client: Any, container_id: str) -> str:
    raw = await pool.run(client.api.logs, container_id, stdout=True, stderr=True)
    return raw.decode("utf-8", "replace")  # type: ignore[no-any-return]


async def run_to_exit(runtime: ContainerRuntime, spec: ContainerSpec) -> tuple[str, ExitStatus]:
    cid = await runtime.create(spec)
    await runtime.start(cid)
    return cid, await within(runtime.wait(cid))


async def wait_for_output(
    pool: BlockingPool, client: Any, container_id: str, text: str
) -> None:
    async def seen() -> bool:
        return text in await logs(pool, client, container_id)

    await poll(f"{text!r} in the logs of {container_id[:12]}", seen)


def host_ports() -> PortAllocator:
    """A slice of the usual range at random: other test runs on this machine allocate
    ports too, and a bind check cannot see a port another process is about to take."""
    low = random.randrange(30000, 39000)
    return PortAllocator(low, low + 999)


def new_worker_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest_twisted.async_yield_fixture
async def runtime(blocking_pool: BlockingPool, docker_client: Any) -> AsyncIterator[ContainerRuntime]:
    rt = ContainerRuntime(reactor, blocking_pool, docker.from_env, new_worker_id())  # type: ignore[arg-type]
    rt.startService()
    try:
        yield rt
    finally:
        await rt.remove_orphans()
        await rt.stopService()


# ---------------------------------------------------------------------------
# Names and specs (no engine)


def test_container_name_is_readable_and_valid() -> None:
    name = container_name("worker-1", "my_job.v2", 3)
    assert name.startswith("fluster-worker-1-my_job.v2-3-")
    assert DOCKER_NAME.fullmatch(name)


def test_container_name_sanitizes_hostile_ids() -> None:
    name = container_name("w/../x", "../../etc/passwd; rm -rf / \n\u00e9\u0000", 0)
    assert DOCKER_NAME.fullmatch(name)
    assert "/" not in name and " " not in name
    assert name.startswith("fluster-w-..-x-etc-passwd-rm--rf-0-")


def test_container_name_distinguishes_ids_that_sanitize_alike() -> None:
    names = {
        container_name("w", "a/b", 0),
        container_name("w", "a b", 0),
        container_name("w", "a-b", 0),
        container_name("w", "a-b", 1),
        container_name("w-a", "b", 0),
    }
    assert len(names) == 5


@given(worker=st.text(max_size=300), job=st.text(max_size=300), attempt=st.integers(0, 2**31 - 1))
def test_container_name_always_valid_and_bounded(worker: str, job: str, attempt: int) -> None:
    name = container_name(worker, job, attempt)
    assert DOCKER_NAME.fullmatch(name)
    assert len(name) <= 140
    ContainerSpec(name=name, image="x", command=[])  # accepted by the spec


@given(st.text(max_size=200), st.integers(1, 64))
def test_sanitize_name_part(text: str, max_len: int) -> None:
    part = sanitize_name_part(text, max_len)
    assert 1 <= len(part) <= max_len
    assert re.fullmatch(r"[a-zA-Z0-9_.-]+", part)
    assert part == "x" or (part[0] not in "-._" and part[-1] not in "-._")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "-bad"},
        {"name": "a/b"},
        {"name": "x"},
        {"image": ""},
        {"image": "a b"},
        {"command": "sh -c true"},
        {"command": ["a\x00"]},
        {"env": {"A=B": "c"}},
        {"env": {"": "c"}},
        {"env": {"A": "\x00"}},
        {"labels": {"": "v"}},
        {"working_dir": "app"},
        {"ports": {0: 1}},
        {"ports": {80: 65536}},
        {"nano_cpus": 0},
        {"memory_bytes": 1024},
        {"pids_limit": 0},
        {"mounts": ["/tmp:/tmp"]},
    ],
)
def test_spec_rejects_invalid_fields(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"name": "fluster-ok", "image": "img", "command": ["true"]}
    fields.update(kwargs)
    with pytest.raises(ValueError) as info:
        ContainerSpec(**fields)
    assert "\n" not in str(info.value)


def test_mount_requires_absolute_paths() -> None:
    with pytest.raises(ValueError):
        Mount(Path("relative"), "/data")
    with pytest.raises(ValueError):
        Mount(Path("/tmp"), "data")
    assert Mount(Path("/tmp"), "/data", read_only=True).read_only


# ---------------------------------------------------------------------------
# sample() arithmetic, against a fake client (no engine)


class _FakeApi:
    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.answers = answers

    def stats(self, container_id: str, stream: bool, one_shot: bool) -> dict[str, Any]:
        assert (stream, one_shot) == (False, True)
        return self.answers.pop(0)


class _FakeClient:
    def __init__(self, answers: list[dict[str, Any]]) -> None:
        self.api = _FakeApi(answers)

    def close(self) -> None:
        pass


def _stats(read: str, total: int, system: int, usage: int, max_usage: int) -> dict[str, Any]:
    return {
        "read": read,
        "preread": "0001-01-01T00:00:00Z",
        "pids_stats": {"current": 3},
        "cpu_stats": {
            "cpu_usage": {"total_usage": total},
            "system_cpu_usage": system,
            "online_cpus": 2,
        },
        "precpu_stats": {"cpu_usage": {"total_usage": 0}},
        "memory_stats": {
            "usage": usage,
            "max_usage": max_usage,
            "stats": {"total_inactive_file": 1 * MiB},
        },
    }


_NOT_RUNNING = {
    "read": "0001-01-01T00:00:00Z",
    "preread": "0001-01-01T00:00:00Z",
    "pids_stats": {},
    "memory_stats": {},
    "cpu_stats": {"cpu_usage": {"total_usage": 0}},
}


@pytest_twisted.ensureDeferred
async def test_sample_computes_cpu_from_the_previous_sample(
    blocking_pool: BlockingPool,
) -> None:
    answers = [
        _stats("2024-05-01T10:00:00.000000000Z", 1_000_000_000, 100_000_000_000, 50 * MiB, 60 * MiB),
        # 0.5 s later: 0.25 s of CPU used, of 1 s of system time over 2 CPUs.
        _stats("2024-05-01T10:00:00.500000000Z", 1_250_000_000, 101_000_000_000, 40 * MiB, 60 * MiB),
        _NOT_RUNNING,
    ]
    rt = ContainerRuntime(reactor, blocking_pool, lambda: _FakeClient(answers), "w")  # type: ignore[arg-type]
    first = await rt.sample("c1")
    assert first == UsageSample(
        memory_bytes=49 * MiB, memory_peak_bytes=60 * MiB, cpu_percent=0.0, cpu_millicores=0,
        process_count=3,
    )
    second = await rt.sample("c1")
    assert second is not None
    assert second.cpu_millicores == 500
    assert second.cpu_percent == pytest.approx(50.0)
    assert second.memory_bytes == 39 * MiB
    assert second.memory_peak_bytes == 60 * MiB
    assert await rt.sample("c1") is None


# ---------------------------------------------------------------------------
# Exit detection from the events stream, against a fake engine (no engine)


class _FakeStream:
    """A blocking events stream fed by the test; close() ends the iteration."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        self.closed = False

    def push(self, event: dict[str, Any]) -> None:
        self._queue.put(event)

    def end(self) -> None:
        self._queue.put(self._END)

    def close(self) -> None:
        self.closed = True
        self.end()

    def __iter__(self) -> _FakeStream:
        return self

    def __next__(self) -> object:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        return item


class _FakeEngineApi:
    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}
        self.streams: list[_FakeStream] = []
        self.inspect_errors = 0  # fail this many inspects with a 500
        self.inspects = 0
        self.removed: list[str] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()

    def remove_container(self, container_id: str, force: bool) -> None:
        with self.lock:
            self.removed.append(container_id)
            self.states.pop(container_id, None)

    def events(self, decode: bool, filters: dict[str, Any]) -> _FakeStream:
        assert decode is True
        assert filters["label"].startswith("fluster.worker_id=")
        stream = _FakeStream()
        with self.lock:
            self.streams.append(stream)
        self.subscribed.set()
        return stream

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        with self.lock:
            self.inspects += 1
            if self.inspect_errors:
                self.inspect_errors -= 1
                raise docker.errors.APIError("boom", explanation="engine hiccup")
            if container_id not in self.states:
                raise docker.errors.NotFound("gone", explanation=f"No such container: {container_id}")
            return {"Id": container_id, "State": dict(self.states[container_id])}


class _FakeEngine:
    def __init__(self) -> None:
        self.api = _FakeEngineApi()


RUNNING = {"Status": "running", "Running": True, "FinishedAt": "0001-01-01T00:00:00Z"}


def _exited(code: int, oom: bool = False) -> dict[str, Any]:
    return {
        "Status": "exited",
        "Running": False,
        "ExitCode": code,
        "OOMKilled": oom,
        "FinishedAt": "2024-05-01T10:00:00.123456789Z",
    }


def _die(container_id: str, code: int) -> dict[str, Any]:
    return {
        "Type": "container",
        "Action": "die",
        "Actor": {"ID": container_id, "Attributes": {"exitCode": str(code)}},
    }


async def _waiting_on_running(rt: ContainerRuntime, api: _FakeEngineApi, cid: str) -> Deferred[ExitStatus]:
    """Subscribe, then wait() on a running container and let its first inspect land."""
    api.states[cid] = RUNNING
    await poll("the stream", lambda: succeed(api.subscribed.is_set()))
    await pause()  # the reactor has seen the subscription
    before = api.inspects
    waiting = rt.wait(cid)
    await poll("the first inspect", lambda: succeed(api.inspects > before))
    await pause()  # and its answer
    assert not waiting.called
    return waiting


@pytest_twisted.async_yield_fixture
async def fake_runtime(blocking_pool: BlockingPool) -> AsyncIterator[tuple[ContainerRuntime, _FakeEngineApi]]:
    engine = _FakeEngine()
    rt = ContainerRuntime(reactor, blocking_pool, lambda: engine, "w-fake")  # type: ignore[arg-type]
    rt.startService()
    try:
        yield rt, engine.api
    finally:
        await within(rt.stopService())


@pytest_twisted.ensureDeferred
async def test_die_event_releases_waiters_with_inspected_status(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = fake_runtime
    cid = "a" * 64
    first = await _waiting_on_running(rt, api, cid)
    second = rt.wait(cid)
    with api.lock:
        api.states[cid] = _exited(137, oom=True)
    api.streams[-1].push(_die(cid, 137))
    status = await within(first)
    assert status == ExitStatus(137, True, 1714557600123)
    assert await within(second) == status


@pytest_twisted.ensureDeferred
async def test_die_of_an_already_removed_container_uses_the_event_code(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = fake_runtime
    cid = "b" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    with api.lock:
        del api.states[cid]  # force-removed: die, then destroy, before we inspect
    api.streams[-1].push(_die(cid, 137))
    status = await within(waiting)
    assert (status.exit_code, status.oom_killed) == (137, False)


@pytest_twisted.ensureDeferred
async def test_exit_missed_while_the_stream_was_down_is_found_on_reconnect(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = fake_runtime
    cid = "c" * 64
    waiting = await _waiting_on_running(rt, api, cid)
    first_stream = api.streams[-1]
    with api.lock:
        api.states[cid] = _exited(4)  # its die event is lost with the stream
    first_stream.end()
    status = await within(waiting)
    assert status.exit_code == 4
    assert len(api.streams) >= 2  # it did reconnect


@pytest_twisted.ensureDeferred
async def test_failed_inspect_is_retried(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    rt, api = fake_runtime
    cid = "d" * 64
    with api.lock:
        api.states[cid] = _exited(9)
        api.inspect_errors = 1
    status = await within(rt.wait(cid))
    assert status.exit_code == 9


@pytest_twisted.ensureDeferred
async def test_a_container_watched_from_before_its_start_costs_one_inspect_and_no_more(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    """Registered before the start, the waiter needs no inspect (the container
    cannot have exited); after its die, whether it runs is known without asking,
    and a container known to have started is removed without an inspect."""
    rt, api = fake_runtime
    cid = "f" * 64
    api.states[cid] = {"Status": "created", "Running": False}
    await poll("the stream", lambda: succeed(api.subscribed.is_set()))
    await pause()
    waiting = rt.wait(cid, before_start=True)
    with api.lock:
        api.states[cid] = RUNNING
    await pause()
    assert api.inspects == 0 and not waiting.called
    with api.lock:
        api.states[cid] = _exited(3)
    api.streams[-1].push(_die(cid, 3))
    assert (await within(waiting)).exit_code == 3
    assert api.inspects == 1  # the exit's own (code, OOM flag, time)
    assert await rt.is_running(cid) is False
    await rt.remove(cid, started=True)
    assert api.inspects == 1
    assert api.removed == [cid]


@pytest_twisted.ensureDeferred
async def test_is_running_asks_the_engine_until_an_exit_is_reported(
    fake_runtime: tuple[ContainerRuntime, _FakeEngineApi],
) -> None:
    """is_running asks the engine while no exit was reported, and after a
    removal (the container's exit is forgotten with it)."""
    rt, api = fake_runtime
    cid = "9" * 64
    api.states[cid] = RUNNING
    assert await rt.is_running(cid) is True
    assert api.inspects == 1
    await rt.remove(cid, started=True)
    assert await rt.is_running(cid) is False  # gone: asked again
    assert api.inspects == 2


def test_demultiplexing_the_engine_log_stream() -> None:
    from fluster_worker.containers.last_logs import demultiplex

    def frame(fd: int, data: bytes) -> bytes:
        return bytes([fd, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    raw = frame(1, b"2024-01-01T00:00:00Z out\n") + frame(2, b"err\n") + frame(1, b"more\n") + b"\x01\x00"
    assert demultiplex(raw, 1) == b"2024-01-01T00:00:00Z out\nmore\n"
    assert demultiplex(raw, 2) == b"err\n"
    assert demultiplex(b"", 1) == b""


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_stream_and_fails_waiters(blocking_pool: BlockingPool) -> None:
    engine = _FakeEngine()
    rt = ContainerRuntime(reactor, blocking_pool, lambda: engine, "w-fake")  # type: ignore[arg-type]
    rt.startService()
    cid = "e" * 64
    engine.api.states[cid] = RUNNING
    waiting = rt.wait(cid)
    await poll("the stream", lambda: succeed(engine.api.subscribed.is_set()))
    await within(rt.stopService())
    assert engine.api.streams[-1].closed
    assert rt._thread is None
    with pytest.raises(ContainerError, match="runtime stopped"):
        await waiting
    with pytest.raises(ContainerError, match="not running"):
        await rt.wait(cid)


# ---------------------------------------------------------------------------
# The real engine


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_env_labels_working_dir_and_mounts_inside(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool,
    tmp_path: Path,
) -> None:
    (tmp_path / "hello.txt").write_text("hello from the host\n")
    spec = spec_for(
        runtime,
        base_image,
        ["sh", "-c", "env; pwd; cat /data/hello.txt; touch /data/x 2>/dev/null || echo read-only"],
        env={"FLUSTER_JOB_ID": "j1", "ODD": "a b=c 'd'"},
        mounts=[Mount(tmp_path, "/data", read_only=True)],
    )
    cid, status = await run_to_exit(runtime, spec)
    assert status.exit_code == 0
    out = await logs(blocking_pool, docker_client, cid)
    lines = out.splitlines()
    assert "FLUSTER_JOB_ID=j1" in lines
    assert "ODD=a b=c 'd'" in lines
    assert "/app" in lines
    assert "hello from the host" in lines
    assert "read-only" in lines
    info = await blocking_pool.run(docker_client.api.inspect_container, cid)
    labels = info["Config"]["Labels"]
    assert labels["fluster.worker_id"] == runtime.worker_id
    assert labels["fluster.job_id"] == spec.labels["fluster.job_id"]
    assert info["Name"] == "/" + spec.name
    assert info["HostConfig"]["Init"] is True
    assert info["Config"]["Tty"] is False
    assert not (tmp_path / "x").exists()


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_wait_reports_exit_code(runtime: ContainerRuntime, base_image: str) -> None:
    before_ms = int(now() * 1000)
    _, status = await run_to_exit(runtime, spec_for(runtime, base_image, ["sh", "-c", "exit 7"]))
    assert status.exit_code == 7
    assert status.oom_killed is False
    assert before_ms - 2000 <= status.finished_at_ms <= int(now() * 1000) + 2000


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_last_log_entries_per_stream_and_a_started_container_removed(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    # The engine copies the two streams into its log separately: the pause puts
    # the stderr lines after all the stdout ones.
    script = "for i in $(seq 1 20); do echo out$i; done; sleep 0.5; echo err1 >&2; echo err2 >&2"
    cid, status = await run_to_exit(runtime, spec_for(runtime, base_image, ["sh", "-c", script]))
    assert status.exit_code == 0
    assert await runtime.is_running(cid) is False
    entries = await runtime.last_log_entries(cid, 16)
    stdout = [line.split(b" ", 1) for line in entries[1].splitlines()]
    stderr = [line.split(b" ", 1) for line in entries[2].splitlines()]
    # The last 16 entries of the container's log, both streams together (as
    # `docker logs --tail 16` counts them), split per stream.
    assert [text for _, text in stdout] == [f"out{i}".encode() for i in range(7, 21)]
    assert [text for _, text in stderr] == [b"err1", b"err2"]
    assert all(stamp.endswith(b"Z") and b"T" in stamp for stamp, _ in stdout + stderr)
    await runtime.remove(cid, started=True)
    with pytest.raises(docker.errors.NotFound):
        await blocking_pool.run(docker_client.api.inspect_container, cid)
    await runtime.remove(cid, started=True)  # gone already: fine


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_wait_after_the_container_already_exited(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    cid = await runtime.create(spec_for(runtime, base_image, ["sh", "-c", "exit 3"]))
    await runtime.start(cid)

    async def exited() -> bool:
        info = await blocking_pool.run(docker_client.api.inspect_container, cid)
        return info["State"]["Status"] == "exited"  # type: ignore[no-any-return]

    await poll("the container to exit", exited)
    # Two waiters, each with its own Deferred, by id and by name.
    name = (await blocking_pool.run(docker_client.api.inspect_container, cid))["Name"][1:]
    first, second = runtime.wait(cid), runtime.wait(name)
    assert first is not second
    results = await within(gatherResults([first, second]))
    assert [r.exit_code for r in results] == [3, 3]


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_wait_before_start_and_many_containers(
    runtime: ContainerRuntime, base_image: str
) -> None:
    ids = [
        await runtime.create(spec_for(runtime, base_image, ["sh", "-c", f"exit {n}"]))
        for n in range(5)
    ]
    waits = [runtime.wait(cid) for cid in ids]  # created, not started: keeps waiting
    assert not any(d.called for d in waits)
    await gatherResults([runtime.start(cid) for cid in ids])
    statuses = await within(gatherResults(waits))
    assert [s.exit_code for s in statuses] == [0, 1, 2, 3, 4]


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_cancelling_a_wait_drops_only_that_waiter(
    runtime: ContainerRuntime, base_image: str
) -> None:
    cid = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"]))
    await runtime.start(cid)
    cancelled, kept = runtime.wait(cid), runtime.wait(cid)
    cancelled.cancel()
    with pytest.raises(CancelledError):
        await cancelled
    await runtime.signal(cid, "SIGKILL")
    status = await within(kept)
    assert status.exit_code == 137


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_memory_limit_oom_kill_is_detected(runtime: ContainerRuntime, base_image: str) -> None:
    spec = spec_for(
        runtime,
        base_image,
        ["python3", "-c", "b = bytearray(512 * 2**20)"],
        memory_bytes=64 * MiB,
    )
    _, status = await run_to_exit(runtime, spec)
    assert status.oom_killed is True
    assert status.exit_code == 137


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_terminate_kills_a_container_that_ignores_sigterm(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    cid = await runtime.create(
        spec_for(runtime, base_image, ["sh", "-c", 'trap "" TERM; echo ready; sleep 1000'])
    )
    await runtime.start(cid)
    await wait_for_output(blocking_pool, docker_client, cid, "ready")
    grace = 1.0
    started = now()
    status = await within(runtime.terminate(cid, grace))
    assert status.exit_code == 137  # SIGKILL, which only the grace timer sends
    # Never before the grace. That it comes at the grace to the tick is
    # test_container_terminate.py; how soon after, on the engine, bench/kill.py.
    assert now() - started >= grace


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_terminate_of_a_cooperative_container_beats_the_grace(
    runtime: ContainerRuntime, base_image: str
) -> None:
    cid = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"]))
    await runtime.start(cid)
    grace = 600.0  # far beyond within()'s 30 s: a terminate that waited for it fails here
    status = await within(runtime.terminate(cid, grace))
    assert status.exit_code == 143  # 128 + SIGTERM, via the init
    # Terminating it again: already dead is fine.
    again = await within(runtime.terminate(cid, grace))
    assert again.exit_code == 143


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_terminate_or_remove_of_a_never_started_container_says_so(
    runtime: ContainerRuntime, base_image: str
) -> None:
    cid = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"]))
    with pytest.raises(ContainerError, match="never started"):
        await within(runtime.terminate(cid, 1.0))
    waiting = runtime.wait(cid)
    await runtime.remove(cid)
    with pytest.raises(ContainerError, match="removed before it started"):
        await within(waiting)


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_caps_dropped_no_new_privileges_and_pids_limit(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    script = (
        "import os, re, time\n"
        "status = open('/proc/self/status').read()\n"
        "for key in ('CapEff', 'CapPrm', 'CapBnd', 'NoNewPrivs'):\n"
        "    print(re.search(key + r':\\s*(\\S+)', status).group(0).replace('\\t', ' '))\n"
        "n = 0\n"
        "try:\n"
        "    while n < 100:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('fork failed', e.errno)\n"
        "print('forked', n, flush=True)\n"
        "os._exit(0)\n"
    )
    spec = spec_for(runtime, base_image, ["python3", "-c", script], pids_limit=20)
    cid, status = await run_to_exit(runtime, spec)
    assert status.exit_code == 0
    out = await logs(blocking_pool, docker_client, cid)
    assert "CapEff: 0000000000000000" in out
    assert "CapPrm: 0000000000000000" in out
    assert "CapBnd: 0000000000000000" in out
    assert "NoNewPrivs: 1" in out
    assert "fork failed 11" in out  # EAGAIN: the pids cgroup said no
    forked = int(re.search(r"forked (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 10 <= forked < 20
    info = await blocking_pool.run(docker_client.api.inspect_container, cid)
    assert info["HostConfig"]["PidsLimit"] == 20
    assert info["HostConfig"]["CapDrop"] == ["ALL"]
    assert info["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_cpu_and_memory_limits_are_set(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    spec = spec_for(runtime, base_image, ["true"], nano_cpus=10**9, memory_bytes=256 * MiB)
    cid = await runtime.create(spec)
    info = await blocking_pool.run(docker_client.api.inspect_container, cid)
    host = info["HostConfig"]
    assert host["NanoCpus"] == 10**9
    assert host["Memory"] == 256 * MiB
    assert host["MemorySwap"] == 256 * MiB  # no swap
    assert host["ExtraHosts"] == ["host.docker.internal:host-gateway"]
    assert host["AutoRemove"] is False


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_mapped_port_is_reachable_from_the_host(
    runtime: ContainerRuntime, base_image: str, blocking_pool: BlockingPool
) -> None:
    port = host_ports().allocate(["http"])["http"]
    spec = spec_for(
        runtime,
        base_image,
        ["python3", "-m", "http.server", str(port), "--bind", "0.0.0.0"],
        ports={port: port},
    )
    cid = await runtime.create(spec)
    await runtime.start(cid)

    def fetch() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return response.status  # type: ignore[no-any-return]

    async def answers() -> bool:
        try:
            return await blocking_pool.run(fetch) == 200
        except OSError:  # refused, or reset by docker-proxy before the server listens
            return False

    await poll(f"http.server on host port {port}", answers)
    status = await within(runtime.terminate(cid, 5.0))
    assert status.exit_code in (143, 0, 1)  # whichever way python exits on SIGTERM


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_sample_while_running(
    runtime: ContainerRuntime, base_image: str, docker_client: Any, blocking_pool: BlockingPool
) -> None:
    script = "b = bytearray(40 * 2**20)\nprint('ready', flush=True)\nwhile True: pass\n"
    spec = spec_for(runtime, base_image, ["python3", "-c", script], nano_cpus=10**9)
    cid = await runtime.create(spec)
    await runtime.start(cid)
    await wait_for_output(blocking_pool, docker_client, cid, "ready")
    first = await runtime.sample(cid)
    assert first is not None
    assert first.memory_bytes > 30 * MiB
    assert first.memory_peak_bytes >= first.memory_bytes
    assert first.process_count >= 2  # init + python
    samples: list[UsageSample] = []

    async def busy_seen() -> bool:
        sample = await runtime.sample(cid)
        assert sample is not None
        samples.append(sample)
        return sample.cpu_millicores > 50

    await poll("cpu usage in a sample", busy_seen)
    assert samples[-1].cpu_millicores <= 1300  # limited to one core (with slack)
    assert samples[-1].cpu_percent > 0
    await within(runtime.terminate(cid, 0))
    assert await runtime.sample(cid) is None
    await runtime.remove(cid)
    assert await runtime.sample(cid) is None


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_remove_orphans_removes_leftovers_of_this_worker_only(
    runtime: ContainerRuntime, base_image: str, blocking_pool: BlockingPool
) -> None:
    running = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"]))
    await runtime.start(running)
    created = await runtime.create(spec_for(runtime, base_image, ["true"]))
    exited, _ = await run_to_exit(runtime, spec_for(runtime, base_image, ["true"]))

    other = ContainerRuntime(reactor, blocking_pool, docker.from_env, new_worker_id())  # type: ignore[arg-type]
    try:
        theirs = await other.create(spec_for(other, base_image, ["true"]))
        # A new process of the same worker id finds and removes the leftovers.
        successor = ContainerRuntime(reactor, blocking_pool, docker.from_env, runtime.worker_id)  # type: ignore[arg-type]
        assert sorted(await successor.list_ours()) == sorted([running, created, exited])
        assert await successor.remove_orphans() == 3
        assert await successor.list_ours() == []
        assert await other.list_ours() == [theirs]
    finally:
        await other.remove_orphans()


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_docker_errors_become_one_line_container_errors(
    runtime: ContainerRuntime, base_image: str
) -> None:
    missing = f"fluster-no-such-image-{uuid.uuid4().hex[:8]}:latest"
    with pytest.raises(ContainerError) as info:
        await runtime.create(spec_for(runtime, missing, ["true"]))
    message = str(info.value)
    assert message.startswith("container create failed: ")
    assert missing in message and "\n" not in message

    with pytest.raises(ContainerError, match="^container start failed: "):
        await runtime.start("fluster-no-such-container-" + uuid.uuid4().hex)
    with pytest.raises(ContainerError, match="no such container|No such container"):
        await runtime.wait("f" * 64)
    with pytest.raises(ContainerError):
        await runtime.wait("fluster-no-such-container-" + uuid.uuid4().hex)

    # Gone or stopped containers are fine to signal and remove.
    await runtime.signal("f" * 64, "SIGTERM")
    await runtime.remove("f" * 64)
    cid, _ = await run_to_exit(runtime, spec_for(runtime, base_image, ["true"]))
    await runtime.signal(cid, "SIGTERM")
    await runtime.remove(cid)
    await runtime.remove(cid)
    with pytest.raises(ValueError):
        await runtime.signal(cid, "SIGNOPE")

    spec = spec_for(runtime, base_image, ["true"], labels={"fluster.worker_id": "someone-else"})
    with pytest.raises(ContainerError, match="not this worker's id"):
        await runtime.create(spec)


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_port_conflict_is_named(runtime: ContainerRuntime, base_image: str) -> None:
    port = host_ports().allocate(["p"])["p"]
    first = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"], ports={port: port}))
    await runtime.start(first)
    second = await runtime.create(spec_for(runtime, base_image, ["sleep", "1000"], ports={port: port}))
    with pytest.raises(ContainerError) as info:
        await runtime.start(second)
    assert str(info.value).startswith("container start failed: ")
    assert "already allocated" in str(info.value) or "address already in use" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_stop_service_ends_the_events_thread_and_fails_waiters(
    blocking_pool: BlockingPool, base_image: str, docker_client: Any
) -> None:
    rt = ContainerRuntime(reactor, blocking_pool, docker.from_env, new_worker_id())  # type: ignore[arg-type]
    with pytest.raises(ContainerError, match="not running"):
        await rt.wait("f" * 64)
    rt.startService()
    try:
        cid = await rt.create(spec_for(rt, base_image, ["sleep", "1000"]))
        await rt.start(cid)
        pending: Deferred[ExitStatus] = rt.wait(cid)
        thread = rt._thread
        assert thread is not None and thread.is_alive()
        await rt.stopService()
        # It has done its last work; let it finish returning.
        await poll("the events thread to end", lambda: succeed(not thread.is_alive()), 5.0)
        with pytest.raises(ContainerError, match="runtime stopped"):
            await pending
        # And it starts again.
        rt.startService()
        restarted = rt.wait(cid)
        await rt.signal(cid, "SIGKILL")
        assert (await within(restarted)).exit_code == 137
        await rt.stopService()
    finally:
        await rt.remove_orphans()

"""`python -m fluster_worker.try_job` against a real worker (real engine): it zips
the project, submits module:function with the official Connect client, follows
the logs live, prints the result or the error, and exits 0 only on SUCCEEDED.
Plus the pieces it is made of, without Docker."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import cloudpickle
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from fluster_worker.client.bundle import zip_project
from fluster_worker.client.entrypoint import parse_target, serialized_entrypoint
from fluster_worker.client.follow import Follower, LogCursor, show_result
from fluster_worker.images.builder import RUNNER_PATH
from fluster_worker.web.rpc import cluster_pb2 as pb
from tests.jobkit import Harness, start_worker, worker_config

HELLO = textwrap.dedent('''
    import sys

    def main(name="world"):
        print(f"hello {name}", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        return {"answer": 42, "name": name}

    def boom():
        raise ValueError("boom")

    class Tools:
        @staticmethod
        def double(x):
            return 2 * x
''')


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "pyproject.toml").write_text('[project]\nname = "proj"\nversion = "0.1.0"\nrequires-python = ">=3.10"\n')
    (root / "hello.py").write_text(HELLO)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "hello.cpython-311.pyc").write_bytes(b"junk")
    (root / "outside").symlink_to("/etc/hostname")
    return root


# -- the pieces ---------------------------------------------------------------------


def test_the_bundle_has_the_project_and_nothing_else(project: Path, tmp_path: Path) -> None:
    zip_path = tmp_path / "b.zip"
    assert zip_project(project, zip_path) == 2
    assert sorted(zipfile.ZipFile(zip_path).namelist()) == ["hello.py", "pyproject.toml"]


def test_targets_are_module_colon_function() -> None:
    assert parse_target("pkg.mod:Tools.double") == ("pkg.mod", "Tools.double")
    for bad in ("hello", "hello:", ":main", "a b:c", "hello:main()", "../x:y"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_the_entry_point_resolves_from_the_bundle_in_the_runner(project: Path, tmp_path: Path) -> None:
    """The runner, with the project as working directory, calls the referenced
    function: nothing of the project was imported where the job was built."""
    payload = serialized_entrypoint("hello:Tools.double", (21,))
    assert "hello" not in sys.modules
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "ep.pkl").write_bytes(payload)
    run = subprocess.run(
        [sys.executable, str(RUNNER_PATH), str(tmp_path / "ep.pkl"), str(out / "result.pkl")],
        cwd=project, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, capture_output=True, text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert cloudpickle.loads((out / "result.pkl").read_bytes()) == 42


class FakeRpc:
    def __init__(self, entries: list[pb.LogEntry], states: list[int]) -> None:
        self.entries = entries
        self.states = states
        self.filters: list[pb.FetchLogsFilter] = []

    def status(self, job_id: str, include_result: bool = False) -> pb.JobStatus:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return pb.JobStatus(job_id=job_id, state=state, serialized_result=cloudpickle.dumps([1, "two"]))

    def fetch_logs(self, job_id: str, log_filter: pb.FetchLogsFilter) -> list[pb.LogEntry]:
        self.filters.append(log_filter)
        after = log_filter.after_seq if log_filter.HasField("after_seq") else -1
        fresh = [e for e in self.entries if e.seq > after and e.timestamp_ms > log_filter.start_ms]
        return fresh[: log_filter.max_lines or None]


def test_the_follower_prints_each_line_once_by_source() -> None:
    entries = [
        pb.LogEntry(timestamp_ms=10, source="build", data="building", seq=1),
        pb.LogEntry(timestamp_ms=20, source="stdout", data="out 1", seq=2),
        pb.LogEntry(timestamp_ms=20, source="stderr", data="err 1", seq=3),
    ]
    rpc = FakeRpc(entries, [pb.JOB_STATE_RUNNING, pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED])
    out, err = io.StringIO(), io.StringIO()
    status = Follower(rpc, "j", out, err, sleep=lambda s: None).until_done()
    assert status.state == pb.JOB_STATE_SUCCEEDED
    assert out.getvalue() == "out 1\n"
    assert err.getvalue() == "[build] building\nerr 1\n"
    assert rpc.filters[-1].after_seq == 3  # exact paging once the worker numbers its lines


def test_the_cursor_falls_back_to_timestamps_without_seq() -> None:
    cursor = LogCursor()
    cursor.saw([pb.LogEntry(timestamp_ms=5, source="stdout", data="x")])
    f = cursor.next_filter()
    assert f.start_ms == 5 and not f.HasField("after_seq")


def test_results_are_shown_without_running_pickled_code() -> None:
    assert show_result(cloudpickle.dumps({"a": [1, 2.5, None, (True, b"x")], "s": {3}})) == (
        "{'a': [1, 2.5, None, (True, b'x')], 's': {3}}"
    )
    assert show_result(b"") == "None"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, ("touch /tmp/pwned-by-try-job",)

    shown = show_result(pickle.dumps(Evil()))
    assert "not loaded here" in shown and "system" in shown
    assert not os.path.exists("/tmp/pwned-by-try-job")


# -- against a real worker ----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_worker(worker_config(tmp_path / "worker"))
    yield h
    await h.worker.stopService()


async def try_job(url: str, *argv: str, cwd: Path) -> tuple[str, str, int]:
    out, err, code = await getProcessOutputAndValue(
        sys.executable, ["-m", "fluster_worker.try_job", "--worker", url, *argv],
        env=dict(os.environ), path=str(cwd), reactor=reactor,
    )
    return out.decode(), err.decode(), code


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_try_job_runs_a_function_of_a_project_on_a_real_worker(
    harness: Harness, project: Path, tmp_path: Path
) -> None:
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    out, err, code = await try_job(
        harness.url, str(project), "hello:main", "--kwargs", '{"name": "try"}', "--job-id", "try/hello",
        "--bundle-dir", str(bundles), cwd=tmp_path,
    )
    assert code == 0, (out, err)
    assert "hello try\n" in out and "to stderr\n" in err
    assert out.rstrip().endswith("result: {'answer': 42, 'name': 'try'}")
    assert "job try/hello SUCCEEDED" in err
    assert list(bundles.iterdir()) == []  # its bundle is gone once the job ended
    status = await harness.client.status("try/hello")
    assert status.state == pb.JOB_STATE_SUCCEEDED

    out, err, code = await try_job(harness.url, str(project), "hello:boom", cwd=tmp_path)
    assert code == 1, (out, err)
    assert "Traceback" in err  # the job's stderr, live
    assert err.rstrip().splitlines()[-1].endswith("FAILED: Exit code: 1: ValueError: boom")

    out, err, code = await try_job(harness.url, str(project), "nothere:main", cwd=tmp_path)
    assert code == 1, (out, err)
    assert "could not load the entrypoint: ModuleNotFoundError: No module named 'nothere'" in err

    out, err, code = await try_job(harness.url, str(project), "hello:main", "--job-id", "../x", cwd=tmp_path)
    assert code == 2 and "refused the job: invalid_argument: invalid job_id '../x'" in err

"""The in-container runner, run as a subprocess with the host Python (3.11,
cloudpickle installed) in temporary directories: the same contract as inside
a job image, without Docker."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from fluster_worker.images.builder import RUNNER_PATH

# Functions of this module are pickled by value: the runner cannot import tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    result_path: Path

    def result(self) -> Any:
        return cloudpickle.loads(self.result_path.read_bytes())


@pytest.fixture
def project(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    app.mkdir()
    return app


def run_runner(tmp_path: Path, cwd: Path, payload: bytes) -> Run:
    io = tmp_path / "io"
    (io / "out").mkdir(parents=True, exist_ok=True)
    entrypoint = io / "entrypoint.pkl"
    entrypoint.write_bytes(payload)
    result = io / "out" / "result.pkl"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run(
        [sys.executable, str(RUNNER_PATH), str(entrypoint), str(result)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, result)


def entrypoint(fn: Any, args: Any = (), kwargs: Any = None) -> bytes:
    return cloudpickle.dumps(types.SimpleNamespace(callable=fn, args=args, kwargs=kwargs))


def returns_none() -> None:
    print("side effect only")


def raises() -> None:
    raise ValueError("boom from the job")


def wait_for_sigterm(marker: str) -> str:
    import time

    try:
        Path(marker).write_text("started")
        time.sleep(60)
    finally:
        Path(marker).write_text("unwound")
    return "not reached"


def unpicklable_result() -> Any:
    return (x for x in range(3))


def test_value_is_written(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(operator.add, (2, 3)))
    assert run.returncode == 0, run.stderr
    assert run.result() == 5
    assert not list(run.result_path.parent.glob("*.tmp.*"))


def test_kwargs_and_none_args(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(dict, None, {"a": 1}))
    assert run.returncode == 0, run.stderr
    assert run.result() == {"a": 1}
    run = run_runner(tmp_path, project, entrypoint(list, None, None))
    assert run.returncode == 0, run.stderr
    assert run.result() == []


def test_none_result_writes_no_file(tmp_path: Path, project: Path) -> None:
    stale = tmp_path / "io" / "out" / "result.pkl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from an earlier attempt")
    run = run_runner(tmp_path, project, entrypoint(returns_none))
    assert run.returncode == 0, run.stderr
    assert "side effect only" in run.stdout
    assert not run.result_path.exists()


def test_raising_job_exits_1_with_traceback(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(raises))
    assert run.returncode == 1
    assert "Traceback (most recent call last)" in run.stderr
    assert "ValueError: boom from the job" in run.stderr
    assert not run.result_path.exists()


class HostileError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


def raises_hostile() -> None:
    raise HostileError()


def raises_long_multiline() -> None:
    raise KeyError("line one\nline two " + "x" * 5000)


def error_file(run: Run) -> str:
    from fluster_worker.jobs.store import ERROR_FILE

    return (run.result_path.parent / ERROR_FILE).read_text()


def test_raising_job_records_type_and_message_beside_the_result(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(raises))
    assert run.returncode == 1
    assert error_file(run) == "ValueError: boom from the job"


def test_recorded_error_is_one_bounded_line_even_for_hostile_exceptions(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(raises_hostile))
    assert run.returncode == 1
    assert error_file(run) == f"{__name__}.HostileError: <unprintable message>"
    run = run_runner(tmp_path, project, entrypoint(raises_long_multiline))
    text = error_file(run)
    assert text.startswith("KeyError: 'line one\\nline two xxx") and text.endswith("...")
    assert "\n" not in text and len(text) <= 500


def test_success_removes_an_earlier_error_file(tmp_path: Path, project: Path) -> None:
    from fluster_worker.jobs.store import ERROR_FILE

    stale = tmp_path / "io" / "out" / ERROR_FILE
    stale.parent.mkdir(parents=True)
    stale.write_text("ValueError: from an earlier attempt")
    run = run_runner(tmp_path, project, entrypoint(operator.add, (1, 2)))
    assert run.returncode == 0
    assert not stale.exists()


def test_system_exit_keeps_its_code(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(sys.exit, (3,)))
    assert run.returncode == 3
    assert not run.result_path.exists()


def test_sigterm_unwinds_the_job_and_exits_143(tmp_path: Path, project: Path) -> None:
    marker = tmp_path / "marker"
    io = tmp_path / "io"
    (io / "out").mkdir(parents=True)
    (io / "entrypoint.pkl").write_bytes(entrypoint(wait_for_sigterm, (str(marker),)))
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER_PATH), str(io / "entrypoint.pkl"), str(io / "out" / "result.pkl")],
        cwd=project,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert marker.exists(), "the job never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert marker.read_text() == "unwound"  # finally blocks ran


def test_unloadable_entrypoint(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, b"not a pickle")
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fluster-runner: could not load the entrypoint: ")
    assert "Traceback" in run.stderr
    assert error_file(run).startswith("could not load the entrypoint: _pickle.UnpicklingError: ")


def test_entrypoint_without_callable(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, cloudpickle.dumps({"callable": 1}))
    assert run.returncode == 1
    assert "could not load the entrypoint: TypeError" in run.stderr


def test_unpicklable_result(tmp_path: Path, project: Path) -> None:
    run = run_runner(tmp_path, project, entrypoint(unpicklable_result))
    assert run.returncode == 1
    assert "fluster-runner: could not write the result" in run.stderr
    assert not run.result_path.exists()
    assert error_file(run).startswith("could not write the result: TypeError: ")


def test_job_modules_import_from_cwd_and_src(tmp_path: Path, project: Path) -> None:
    (project / "src" / "jobpkg").mkdir(parents=True)
    (project / "src" / "jobpkg" / "__init__.py").write_text("def double(x):\n    return 2 * x\n")
    (project / "helper_mod.py").write_text("OFFSET = 100\n")
    sys.path[:0] = [str(project / "src"), str(project)]
    try:
        import helper_mod  # type: ignore[import-not-found]
        import jobpkg  # type: ignore[import-not-found]

        # Both are pickled by reference: the runner must import them itself.
        payload = entrypoint(jobpkg.double, (helper_mod.OFFSET,))
        assert b"jobpkg" in payload
    finally:
        sys.path.remove(str(project / "src"))
        sys.path.remove(str(project))
        sys.modules.pop("jobpkg", None)
        sys.modules.pop("helper_mod", None)
    run = run_runner(tmp_path, project, payload)
    assert run.returncode == 0, run.stderr
    assert run.result() == 200


# --- fluster.cluster.types.Entrypoint, pickled by reference --------------------

ENTRYPOINT_VARIANTS = {
    "plain": "@dataclass\n",
    "frozen": "@dataclass(frozen=True)\n",
    "frozen_slots": "@dataclass(frozen=True, slots=True)\n",
}


@pytest.fixture
def fluster_types(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[types.ModuleType]:
    """A real `fluster.cluster.types` with a dataclass Entrypoint, importable in
    this process only (the runner's subprocess cannot import it)."""
    root = tmp_path / "fake_fluster"
    pkg = root / "fluster" / "cluster"
    pkg.mkdir(parents=True)
    (root / "fluster" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "types.py").write_text(
        "from dataclasses import dataclass\nfrom typing import Any\n\n"
        + ENTRYPOINT_VARIANTS[request.param]
        + textwrap.dedent(
            """\
            class Entrypoint:
                callable: Any
                args: Any = None
                kwargs: Any = None
            """
        )
    )
    names = ["fluster", "fluster.cluster", "fluster.cluster.types"]
    # Other tests (tests/jobkit.py) may have installed their own stand-in: set it aside.
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(root))
    try:
        import fluster.cluster.types as module  # type: ignore[import-not-found]

        yield module
    finally:
        sys.path.remove(str(root))
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.mark.parametrize("fluster_types", list(ENTRYPOINT_VARIANTS), indirect=True)
def test_fluster_entrypoint_by_reference(
    tmp_path: Path, project: Path, fluster_types: types.ModuleType
) -> None:
    ep = fluster_types.Entrypoint(callable=operator.mul, args=(6, 7), kwargs=None)
    payload = cloudpickle.dumps(ep)
    assert b"fluster.cluster.types" in payload  # by reference, not by value
    run = run_runner(tmp_path, project, payload)
    assert run.returncode == 0, run.stderr
    assert run.result() == 42


@pytest.mark.parametrize("fluster_types", ["plain"], indirect=True)
def test_fluster_entrypoint_kwargs(tmp_path: Path, project: Path, fluster_types: types.ModuleType) -> None:
    ep = fluster_types.Entrypoint(callable=dict, args=None, kwargs={"k": "v"})
    run = run_runner(tmp_path, project, cloudpickle.dumps(ep))
    assert run.returncode == 0, run.stderr
    assert run.result() == {"k": "v"}


def test_stub_setstate_accepts_dataclass_states() -> None:
    namespace: dict[str, Any] = {"__name__": "runner_under_test"}
    exec(compile(RUNNER_PATH.read_text(), str(RUNNER_PATH), "exec"), namespace)
    stub = namespace["Entrypoint"]
    for state in (
        {"callable": len, "args": ("ab",), "kwargs": None},
        (None, {"callable": len, "args": ("ab",), "kwargs": None}),
        [len, ("ab",), None],
    ):
        ep = stub.__new__(stub)
        ep.__setstate__(state)
        assert (ep.callable, ep.args, ep.kwargs) == (len, ("ab",), None)
    with pytest.raises(TypeError):
        stub.__new__(stub).__setstate__(42)

"""ImageBuilder: pure parts (validation, Dockerfile, tag, error lines) against
plain values; builds, cache, concurrency, the runner in the image and gc on the
real engine (@pytest.mark.docker).

Every project built here carries a per-run nonce in its pyproject.toml, so its
tag is new (a real build) and belongs to this run only; the images are removed
at the end of the module. fluster-base:bookworm is never touched."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import docker
import docker.errors
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from fluster_worker.images.builder import (
    CONTAINER_APP_DIR,
    CONTAINER_ENTRYPOINT_PATH,
    CONTAINER_OUT_DIR,
    CONTAINER_RESULT_PATH,
    BuildError,
    BuildResult,
    ImageBuilder,
    InvalidBuildInput,
    runner_command,
    validate,
)
from fluster_worker.images.dockerfile import IMAGE_LABEL, INPUTS_LABEL, LAYER_LABEL, BuildInputs
from fluster_worker.images.output import BuildOutput
from fluster_worker.testing.builder import FakeImageBuilder

CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
NONCE = uuid.uuid4().hex[:12]
TAG_RE = re.compile(r"fluster-job:[0-9a-f]{16}")

# --- pure parts ----------------------------------------------------------------


def test_validate_normalizes() -> None:
    extras, packages = validate(["b", "a.b-c_d", "b"], [" six ", "requests[socks]>=2; python_version>'3'"])
    assert extras == ["a.b-c_d", "b"]
    assert packages == ["six", "requests[socks]>=2; python_version>'3'"]


@pytest.mark.parametrize("extra", ["", "a b", "-x", "--extra", "x;rm -rf /", "x\n", "é", "a" * 101])
def test_validate_rejects_extras(extra: str) -> None:
    with pytest.raises(InvalidBuildInput, match="invalid extra"):
        validate([extra], [])


@pytest.mark.parametrize(
    "package", ["", "   ", "six\nRUN evil", "-e .", "--index-url=http://x", " -r x", "a\x00b", "x" * 1001]
)
def test_validate_rejects_packages(package: str) -> None:
    with pytest.raises(InvalidBuildInput, match="invalid pip package"):
        validate([], [package])


def test_validate_rejects_strings_and_non_strings() -> None:
    with pytest.raises(InvalidBuildInput):
        validate("dev", [])  # a string is a sequence of letters: refused
    with pytest.raises(InvalidBuildInput):
        validate([], [b"six"])  # type: ignore[list-item]
    assert issubclass(InvalidBuildInput, ValueError) and issubclass(InvalidBuildInput, BuildError)


def inputs(**overrides: Any) -> BuildInputs:
    values: dict[str, Any] = {
        "base_image_id": "sha256:" + "0" * 64,
        "pyproject": b'[project]\nname = "p"\nversion = "1"\n',
        "uv_lock": None,
        "extras": (),
        "pip_packages": (),
        "runner_sha256": "r" * 64,
        "uv_version": "uv 0.13.9",
        "index_url": None,
        "extra_index_urls": (),
        "ca_sha256": None,
    }
    values.update(overrides)
    return BuildInputs(**values)


def test_hostile_packages_only_reach_exec_form_runs() -> None:
    hostile = ["six; touch /pwned", "$(touch /pwned)", 'a" "b', "x\\", "`id`"]
    _, packages = validate(["dev"], hostile)
    dockerfile = inputs(pip_packages=tuple(packages), extras=("dev",)).dockerfile
    [install] = [line for line in dockerfile.splitlines() if '"cloudpickle>=3"' in line]
    assert install.startswith("RUN [")
    assert json.loads(install[4:]) == ["uv", "pip", "install", "--", "cloudpickle>=3", *hostile]
    for line in dockerfile.splitlines():
        assert not line.startswith("RUN ") or line.startswith("RUN ["), line


def test_dependency_modes() -> None:
    locked = inputs(uv_lock=b"version = 1\n", extras=("gpu",)).dockerfile
    assert (
        '"uv", "sync", "--project=/opt/fluster/project", "--frozen", "--no-install-project", "--extra=gpu"'
        in locked
    )
    plain = inputs(extras=("gpu",)).dockerfile
    assert '"uv", "pip", "install", "-r", "/opt/fluster/project/pyproject.toml", "--extra=gpu"' in plain
    no_project_table = inputs(pyproject=b"[tool.ruff]\nline-length = 100\n").dockerfile
    assert "pyproject" not in no_project_table
    assert "pyproject" not in inputs(pyproject=None).dockerfile


def test_tag_hashes_every_input() -> None:
    base = inputs()
    assert TAG_RE.fullmatch(base.tag)
    assert inputs().tag == base.tag
    variants = [
        inputs(base_image_id="sha256:" + "1" * 64),
        inputs(pyproject=base.pyproject + b"\n"),  # type: ignore[operator]
        inputs(pyproject=None),
        inputs(uv_lock=b""),  # an empty lock is not an absent one
        inputs(extras=("x",)),
        inputs(pip_packages=("six",)),
        inputs(runner_sha256="s" * 64),
        inputs(uv_version="uv 0.14.0"),
        inputs(index_url="https://pypi.example/simple"),
        inputs(extra_index_urls=("https://extra.example/simple",)),
        inputs(ca_sha256="c" * 64),
    ]
    tags = {v.tag for v in variants}
    assert base.tag not in tags and len(tags) == len(variants)
    # Tool settings only: nothing of the file reaches the image.
    tool_only = [inputs(pyproject=f"[tool.ruff]\nline-length = {n}\n".encode()) for n in (99, 100)]
    assert tool_only[0].tag == tool_only[1].tag == inputs(pyproject=None).tag


def test_index_urls_are_checked() -> None:
    with pytest.raises(InvalidBuildInput):
        inputs(index_url="https://x/simple $HOME").dockerfile  # noqa: B018
    dockerfile = inputs(
        index_url="https://a/simple", extra_index_urls=("https://b/s", "http://c/s")
    ).dockerfile
    assert 'UV_INDEX_URL=https://a/simple UV_EXTRA_INDEX_URL="https://b/s http://c/s"' in dockerfile


def test_build_output_lines_and_failure() -> None:
    out = BuildOutput()
    assert out.feed('Step 7/13 : RUN ["uv", "pip", "install", "--", "cloudpickle>=3", "nope"]') == []
    assert out.feed("\n ---> Running in 956cbe2cd5f6\n\x1b[91mUsing Python") == [
        'Step 7/13 : RUN ["uv", "pip", "install", "--", "cloudpickle>=3", "nope"]',
        " ---> Running in 956cbe2cd5f6",
    ]
    lines = out.feed(
        " 3.11.2 environment at: /opt/venv\x1b[0m\x1b[91m\n\x1b[0m\x1b[91merror: No solution found when"
        " resolving dependencies\n  cause: Because nope was not found in the package registry and you"
        " require nope, we can conclude that your requirements are unsatisfiable.\n\x1b[0m"
    )
    assert lines[0] == "Using Python 3.11.2 environment at: /opt/venv"
    assert out.feed("Removing intermediate container 956cbe2cd5f6\n") == [
        "Removing intermediate container 956cbe2cd5f6"
    ]
    assert out.failure("The command 'uv pip install -- cloudpickle>=3 nope' returned a non-zero code: 1") == (
        "image build failed: uv pip install: No solution found when resolving dependencies: Because nope"
        " was not found in the package registry and you require nope, we can conclude that your"
        " requirements are unsatisfiable."
    )


def test_build_output_failure_falls_back() -> None:
    out = BuildOutput()
    out.feed("Step 1/2 : FROM sha256:abc\n")
    assert (
        out.failure("pull access denied for x")
        == "image build failed: FROM sha256:abc: pull access denied for x"
    )
    out = BuildOutput()
    out.feed('Step 5/9 : RUN ["uv", "sync", "--frozen"]\nsome output\nlast words\n')
    assert out.failure("The command returned a non-zero code: 2") == "image build failed: uv sync: last words"
    out = BuildOutput()
    out.feed('Step 5/9 : RUN ["uv", "sync"]\nerror: Failed to fetch\n  Caused by: dns error\n  hint: retry\n')
    assert out.failure("x") == "image build failed: uv sync: Failed to fetch: dns error"


def test_fake_builder_matches_the_interface() -> None:
    clock = Clock()
    fake = FakeImageBuilder(clock, auto_finish=False)
    lines: list[str] = []
    d = fake.build(Path("/p"), ["x"], ["six"], lines.append)
    results: list[BuildResult] = []
    d.addCallback(results.append)
    clock.advance(2)
    fake.builds[0].finish(from_cache=True)
    assert results == [BuildResult(fake.builds[0].tag, True, 0, 2000)] and lines
    release = fake.lease(results[0].tag)
    release()
    release()
    assert not fake.leases
    failures: list[Failure] = []
    fake.build(Path("/p"), ["-x"], [], lines.append).addErrback(failures.append)
    assert failures and failures[0].check(InvalidBuildInput)


def test_invalid_input_fails_the_build_deferred() -> None:
    builder = ImageBuilder(Clock(), None, lambda: None, "base", Path("/nonexistent"))  # type: ignore[arg-type]
    failures: list[Failure] = []
    builder.build(Path("/nonexistent"), ["a b"], [], lambda line: None).addErrback(failures.append)
    assert failures and failures[0].check(InvalidBuildInput)


# --- real engine -----------------------------------------------------------------


def write_project(root: Path, name: str, dependencies: list[str], optional: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    deps = ", ".join(json.dumps(d) for d in dependencies)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "0.1"\ndescription = "nonce {NONCE}"\n'
        f'requires-python = ">=3.11"\ndependencies = [{deps}]\n{optional}'
    )
    src = root / "src" / f"{name}_jobs"
    src.mkdir(parents=True, exist_ok=True)
    (src / "__init__.py").write_text(
        "def shout(word):\n    import six\n    return six.ensure_str(word).upper() * 2\n"
    )
    return root


@pytest.fixture(scope="module")
def made_tags(docker_client: Any) -> Iterator[set[str]]:
    """Tags built by this module: removed at its end."""
    tags: set[str] = set()
    yield tags
    for tag in tags:
        try:
            docker_client.images.remove(tag, noprune=False)
        except docker.errors.NotFound:
            pass


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_project(tmp_path_factory.mktemp("tiny") / "tiny", "tiny", ["six"])


class _CountingAPI:
    def __init__(self, api: Any) -> None:
        self._api = api
        self.build_calls = 0
        self.inspected: list[str] = []

    def build(self, *args: Any, **kwargs: Any) -> Any:
        self.build_calls += 1
        return self._api.build(*args, **kwargs)

    def inspect_image(self, image: str) -> Any:
        self.inspected.append(image)
        return self._api.inspect_image(image)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


class CountingClient:
    """A docker client whose low-level `build` calls are counted."""

    def __init__(self, client: Any) -> None:
        self.api = _CountingAPI(client.api)
        self.images = client.images


@pytest.fixture
def make_builder(
    blocking_pool: Any, docker_client: Any, base_image: str, tmp_path: Path, made_tags: set[str]
) -> Callable[..., ImageBuilder]:
    def make(client: Any = None, **kwargs: Any) -> ImageBuilder:
        builder = ImageBuilder(
            kwargs.pop("reactor", reactor),
            blocking_pool,
            lambda: client or docker_client,
            base_image,
            tmp_path / "work",
            ca_bundle=CA_BUNDLE,
            **kwargs,
        )
        original = builder.build

        def build(*args: Any, **kw: Any) -> Deferred[BuildResult]:
            def note(result: BuildResult) -> BuildResult:
                made_tags.add(result.tag)
                return result

            return original(*args, **kw).addCallback(note)

        builder.build = build  # type: ignore[method-assign]
        return builder

    return make


def build_log() -> tuple[list[str], Callable[[str], None]]:
    lines: list[str] = []
    return lines, lines.append


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_build_streams_then_hits_the_cache(
    make_builder: Callable[..., ImageBuilder], tiny_project: Path, docker_client: Any
) -> None:
    builder = make_builder()
    lines, log = build_log()
    started = time.monotonic()
    first = await builder.build(tiny_project, [], [], log)
    cold = time.monotonic() - started
    assert TAG_RE.fullmatch(first.tag) and not first.from_cache
    assert first.started_ms <= first.finished_ms
    assert lines[0] == f"building image {first.tag}"
    assert any(line.startswith("Step 1/") for line in lines)
    assert any("+ six==" in line for line in lines), lines
    assert not any("\x1b" in line or "\n" in line for line in lines)

    labels = docker_client.api.inspect_image(first.tag)["Config"]["Labels"]
    assert labels[IMAGE_LABEL] == "1"
    assert json.loads(labels[INPUTS_LABEL])["key"].startswith(first.tag.split(":")[1])

    lines2, log2 = build_log()
    started = time.monotonic()
    second = await builder.build(tiny_project, [], [], log2)
    cached = time.monotonic() - started
    assert second.tag == first.tag and second.from_cache
    assert lines2 == [f"using cached image {first.tag}"]
    print(f"\nbuild times: cold {cold:.2f} s, cached {cached * 1000:.0f} ms")


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_an_image_found_once_is_not_asked_for_again_until_forgotten(
    make_builder: Callable[..., ImageBuilder], tiny_project: Path, docker_client: Any
) -> None:
    client = CountingClient(docker_client)
    builder = make_builder(client)
    first = await builder.build(tiny_project, [], [], lambda line: None)
    assert client.api.inspected.count(first.tag) >= 1  # found (or built and checked)
    client.api.inspected.clear()
    second = await builder.build(tiny_project, [], [], lambda line: None)
    assert second.tag == first.tag and second.from_cache
    assert first.tag not in client.api.inspected  # known present: no engine call for it
    builder.forget(first.tag)  # e.g. a container create found it missing
    third = await builder.build(tiny_project, [], [], lambda line: None)
    assert third.from_cache and client.api.inspected.count(first.tag) == 1
    assert client.api.build_calls <= 1


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_identical_dependency_files_share_an_image(
    make_builder: Callable[..., ImageBuilder], tiny_project: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_project, other)
    (other / "src" / "tiny_jobs" / "__init__.py").write_text("def shout(word):\n    return 'different'\n")
    (other / "main.py").write_text("print('other sources')\n")
    builder = make_builder()
    a = await builder.build(tiny_project, [], [], lambda line: None)
    b = await builder.build(other, [], [], lambda line: None)
    assert b.tag == a.tag and b.from_cache
    c = await builder.build(other, [], ["cloudpickle>=3"], lambda line: None)
    assert c.tag != a.tag


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_concurrent_builds_run_once_and_cancel_detaches(
    make_builder: Callable[..., ImageBuilder], docker_client: Any, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "conc", "conc", [])
    client = CountingClient(docker_client)
    builder = make_builder(client)
    lines_a, log_a = build_log()
    lines_b, log_b = build_log()
    lines_c: list[str] = []
    holder: list[Deferred[BuildResult]] = []

    def log_c(line: str) -> None:
        lines_c.append(line)
        if line.startswith("Step ") and not holder[0].called:
            holder[0].cancel()

    da = builder.build(project, [], [], log_a)
    db = builder.build(project, [], [], log_b)
    dc = builder.build(project, [], [], log_c)
    holder.append(dc)
    cancelled: list[Any] = []
    dc.addErrback(lambda f: cancelled.append(f.trap(CancelledError)))
    a, b = await gatherResults([da, db])
    assert client.api.build_calls == 1
    assert a.tag == b.tag and not a.from_cache and not b.from_cache
    assert cancelled == [CancelledError]
    assert lines_c[-1].startswith("Step "), lines_c  # no line after the cancel
    assert any(line.startswith("Successfully tagged") for line in lines_a)
    assert any(line.startswith("Successfully tagged") for line in lines_b)
    d = await builder.build(project, [], [], lambda line: None)
    assert d.from_cache and client.api.build_calls == 1


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_missing_dependency_names_it(
    make_builder: Callable[..., ImageBuilder], tiny_project: Path
) -> None:
    missing = f"fluster-no-such-package-{NONCE}"
    lines, log = build_log()
    with pytest.raises(BuildError) as info:
        await make_builder().build(tiny_project, [], [missing], log)
    message = str(info.value)
    assert message.startswith("image build failed: uv pip install: No solution found"), message
    assert missing in message and "\n" not in message
    assert any(missing in line for line in lines)


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_bundle_problems_fail_in_one_line(
    make_builder: Callable[..., ImageBuilder], tmp_path: Path, base_image: str
) -> None:
    builder = make_builder()
    tool_only = tmp_path / "tool_only"
    tool_only.mkdir()
    (tool_only / "pyproject.toml").write_text("[tool.ruff]\nline-length = 100\n")
    with pytest.raises(BuildError, match=r"extras requested but .* no \[project\] table"):
        await builder.build(tool_only, ["dev"], [], lambda line: None)
    (tool_only / "pyproject.toml").write_text("[project\n")
    with pytest.raises(BuildError, match="invalid bundle: pyproject.toml: "):
        await builder.build(tool_only, [], [], lambda line: None)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "pyproject.toml").symlink_to("/etc/passwd")
    with pytest.raises(BuildError, match="invalid bundle: pyproject.toml is a symbolic link, not a regular file"):
        await builder.build(linked, [], [], lambda line: None)
    with pytest.raises(InvalidBuildInput):
        await builder.build(linked, ["$(id)"], [], lambda line: None)


def run_in_image(docker_client: Any, tag: str, command: list[str], **kwargs: Any) -> bytes:
    return docker_client.containers.run(  # type: ignore[no-any-return]
        tag, command, remove=True, stdout=True, stderr=True, network_disabled=True, **kwargs
    )


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_the_image_runs_a_job(
    make_builder: Callable[..., ImageBuilder],
    tiny_project: Path,
    docker_client: Any,
    blocking_pool: Any,
    tmp_path: Path,
) -> None:
    result = await make_builder().build(tiny_project, [], [], lambda line: None)
    sys.path.insert(0, str(tiny_project / "src"))
    try:
        import tiny_jobs  # type: ignore[import-not-found]

        # Any object with callable/args/kwargs; shout is pickled by reference
        # (it imports from /app/src in the container) and needs six.
        ep = _Entrypoint(tiny_jobs.shout, ("ab",), None)
        payload = cloudpickle.dumps(ep)
    finally:
        sys.path.remove(str(tiny_project / "src"))
        sys.modules.pop("tiny_jobs", None)
    io_dir = tmp_path / "io"
    (io_dir / "out").mkdir(parents=True)
    (io_dir / "entrypoint.pkl").write_bytes(payload)
    volumes = {
        str(tiny_project): {"bind": CONTAINER_APP_DIR, "mode": "ro"},
        str(io_dir / "entrypoint.pkl"): {"bind": CONTAINER_ENTRYPOINT_PATH, "mode": "ro"},
        str(io_dir / "out"): {"bind": CONTAINER_OUT_DIR, "mode": "rw"},
    }
    assert runner_command()[2:] == [CONTAINER_ENTRYPOINT_PATH, CONTAINER_RESULT_PATH]
    await blocking_pool.run(run_in_image, docker_client, result.tag, runner_command(), volumes=volumes)
    assert cloudpickle.loads((io_dir / "out" / "result.pkl").read_bytes()) == "ABAB"
    # The image's CMD is the same command.
    (io_dir / "out" / "result.pkl").unlink()
    await blocking_pool.run(run_in_image, docker_client, result.tag, None, volumes=volumes)
    assert (io_dir / "out" / "result.pkl").exists()


class _Entrypoint:
    def __init__(self, callable: Any, args: Any, kwargs: Any) -> None:
        self.callable, self.args, self.kwargs = callable, args, kwargs


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_locked_project_with_extras(
    make_builder: Callable[..., ImageBuilder],
    docker_client: Any,
    blocking_pool: Any,
    tmp_path: Path,
) -> None:
    project = write_project(
        tmp_path / "locked", "locked", [], optional='[project.optional-dependencies]\nsix = ["six"]\n'
    )
    uv_bin = Path(__import__("uv").find_uv_bin())
    env = {**os.environ, "SSL_CERT_FILE": str(CA_BUNDLE), "UV_NO_PROGRESS": "1"}
    proc = await blocking_pool.run(
        subprocess.run, [str(uv_bin), "lock"], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"host `uv lock` failed: {proc.stderr}"
    lines, log = build_log()
    builder = make_builder()
    result = await builder.build(project, ["six"], [], log)
    assert any('"uv", "sync"' in line for line in lines), lines
    out = await blocking_pool.run(
        run_in_image,
        docker_client,
        result.tag,
        ["python", "-c", "import six, cloudpickle; print(six.__name__)"],
    )
    assert out.strip() == b"six"
    without_extra = await builder.build(project, [], [], lambda line: None)
    assert without_extra.tag != result.tag


# --- gc ---------------------------------------------------------------------------


class ClockReactor(Clock):
    """A Clock for last-use times that hands thread results to the real reactor."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        reactor.callFromThread(f, *args, **kwargs)


@pytest.fixture
def gc_images(docker_client: Any, base_image: str) -> Iterator[tuple[str, list[str]]]:
    """Four cheap labelled images in a repository of this test's own (gc never
    sees other job images); the last adds 3 MB."""
    repository = f"fluster-gctest-{NONCE}"
    tags = []
    for i in range(4):
        dockerfile = f"FROM {base_image}\nLABEL fluster.test.nonce={NONCE}-{i}\n"
        if i == 3:
            dockerfile += 'RUN ["/bin/sh", "-c", "head -c 3000000 /dev/urandom > /blob"]\n'
        tag = f"{repository}:g{i}"
        docker_client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()), tag=tag, labels={IMAGE_LABEL: "1"}, rm=True
        )
        tags.append(tag)
    yield repository, tags
    for tag in tags:
        try:
            docker_client.images.remove(tag)
        except docker.errors.NotFound:
            pass


def image_exists(docker_client: Any, tag: str) -> bool:
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_gc_removes_oldest_unused_and_keeps_leased(
    make_builder: Callable[..., ImageBuilder], gc_images: tuple[str, list[str]], docker_client: Any
) -> None:
    repository, (g0, g1, g2, g3) = gc_images
    clock = ClockReactor()
    builder = make_builder(reactor=clock, repository=repository, max_images=2)
    held = builder.lease(g0)  # the oldest, but in use
    for tag in (g1, g2, g3):  # used at t=1, 2, 3
        clock.advance(1)
        builder.lease(tag)()
    builder._present.update((g0, g1, g2, g3))  # as if found by builds
    removed = await builder.gc()
    assert removed == [g1, g2]
    assert builder._present == {g0, g3}  # a removed image is asked for again
    assert [image_exists(docker_client, t) for t in (g0, g1, g2, g3)] == [True, False, False, True]
    assert await builder.gc() == []

    # By bytes: g3 adds 3 MB, over a 1 MB budget; g0 is still leased.
    by_bytes = make_builder(reactor=clock, repository=repository, max_image_bytes=1_000_000)
    by_bytes.lease(g0)
    assert await by_bytes.gc() == [g3]
    assert image_exists(docker_client, g0)
    held()
    assert await by_bytes.gc() == []  # g0 adds nothing: within both budgets


@pytest.mark.docker
@pytest_twisted.ensureDeferred
async def test_gc_prunes_old_dangling_layers_of_its_repository(
    make_builder: Callable[..., ImageBuilder], docker_client: Any, base_image: str
) -> None:
    repository = f"fluster-gctest-{NONCE}"
    tag = f"{repository}:dangling"
    ids = []
    for i in range(2):  # the second build takes the tag: the first is left dangling
        dockerfile = f"FROM {base_image}\nLABEL {LAYER_LABEL}={repository} fluster.test.nonce={NONCE}-d{i}\n"
        image, _ = docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        ids.append(image.id)
    try:
        assert not docker_client.images.get(ids[0]).tags
        young = make_builder(repository=repository)  # default: only layers older than an hour
        assert await young.gc() == []
        assert image_exists(docker_client, ids[0])
        old = make_builder(repository=repository, dangling_max_age=0)
        assert await old.gc() == []  # no tags removed...
        assert not image_exists(docker_client, ids[0])  # ...but the dangling layer is gone
        assert image_exists(docker_client, tag)
    finally:
        for ref in (tag, ids[0]):
            try:
                docker_client.images.remove(ref)
            except docker.errors.NotFound:
                pass


class StalledPool:
    """A pool whose calls never finish (an engine or a disk that is slow)."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


def test_a_build_cancelled_while_its_inputs_are_read_is_cancelled_not_failed(tmp_path: Path) -> None:
    """A job killed while its image inputs are still being read ends KILLED: the
    build raises CancelledError, never "image build failed: CancelledError"."""
    builder = ImageBuilder(Clock(), StalledPool(), lambda: None, "base:1", tmp_path)  # type: ignore[arg-type]
    d = builder.build(tmp_path, [], [], lambda line: None)
    d.cancel()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(CancelledError), failures

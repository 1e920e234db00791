"""What goes into a job image: input validation, the content-addressed tag, the
Dockerfile and its build context. (What comes out of a build: output.py.)

Everything here is pure or blocking (file I/O): `ImageBuilder` runs the blocking
parts in its BlockingPool.

An image holds the job's Python environment only (a venv at /opt/venv with the
project's locked dependencies, cloudpickle and the runner); the job's sources are
mounted at /app at run time. The tag is a hash of every input, so all jobs with
the same dependencies share one image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from fluster_worker.common.safe_files import FileTooLarge, UnsafeFile, read_regular

# --- in-container layout (the JobManager mounts and runs against these) -------

#: The job's unpacked bundle is mounted here; it is the working directory.
CONTAINER_APP_DIR = "/app"
#: Per-job I/O: the entrypoint pickle is mounted at CONTAINER_ENTRYPOINT_PATH
#: (read-only is fine); CONTAINER_OUT_DIR must be a writable mount: the runner
#: writes the result through a temporary file next to CONTAINER_RESULT_PATH.
CONTAINER_IO_DIR = "/fluster"
CONTAINER_ENTRYPOINT_PATH = CONTAINER_IO_DIR + "/entrypoint.pkl"
CONTAINER_OUT_DIR = CONTAINER_IO_DIR + "/out"
CONTAINER_RESULT_PATH = CONTAINER_OUT_DIR + "/result.pkl"
CONTAINER_VENV = "/opt/venv"
CONTAINER_PYTHON = CONTAINER_VENV + "/bin/python"
CONTAINER_RUNNER_PATH = "/opt/fluster/runner.py"
CONTAINER_CA_PATH = "/etc/fluster/ca.crt"
#: Where pyproject.toml and uv.lock are copied for the dependency layer.
CONTAINER_PROJECT_DIR = "/opt/fluster/project"

#: The runner's source on the host; its sha256 is part of every image tag.
RUNNER_PATH = Path(__file__).parent / "runner" / "fluster_runner.py"

TAG_REPOSITORY = "fluster-job"
IMAGE_LABEL = "fluster.worker.image"
#: Set right after FROM, so every intermediate image of a build carries it (with
#: the repository as value): gc finds the dangling leftovers of failed builds.
LAYER_LABEL = "fluster.worker.layer"
INPUTS_LABEL = "fluster.worker.inputs"

CLOUDPICKLE_REQUIREMENT = "cloudpickle>=3"
MAX_PROJECT_FILE_BYTES = 64 * 2**20
MAX_EXTRAS = 64
MAX_PIP_PACKAGES = 256
MAX_REQUIREMENT_CHARS = 1000

_EXTRA_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_URL_RE = re.compile(r"https?://[^\s\"'\\$`]+")
_REPOSITORY_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")


def runner_command(
    entrypoint_path: str = CONTAINER_ENTRYPOINT_PATH, result_path: str = CONTAINER_RESULT_PATH
) -> list[str]:
    """The container command that runs a job (working directory: /app)."""
    return [CONTAINER_PYTHON, CONTAINER_RUNNER_PATH, entrypoint_path, result_path]


@cache
def runner_version() -> str:
    """sha256 of the runner's source (a small blocking read, cached)."""
    return hashlib.sha256(RUNNER_PATH.read_bytes()).hexdigest()


class BuildError(Exception):
    """A job image could not be built; the message is one line naming the cause."""


class InvalidBundle(BuildError):
    """The bundle's pyproject.toml or uv.lock cannot be used."""


class InvalidBuildInput(BuildError, ValueError):
    """An extra, a pip requirement or an index URL that must not reach a
    Dockerfile. Raised synchronously by `validate`; also a BuildError."""


def validate(extras: Sequence[str], pip_packages: Sequence[str]) -> tuple[list[str], list[str]]:
    """Check hostile extras and pip requirement strings; return them normalized
    (extras sorted and deduplicated, requirements stripped, order kept).

    Raises InvalidBuildInput with a one-line message naming the bad value."""
    if isinstance(extras, str | bytes) or isinstance(pip_packages, str | bytes):
        raise InvalidBuildInput("extras and pip_packages must be lists of strings")
    if len(extras) > MAX_EXTRAS:
        raise InvalidBuildInput(f"too many extras: {len(extras)} > {MAX_EXTRAS}")
    if len(pip_packages) > MAX_PIP_PACKAGES:
        raise InvalidBuildInput(f"too many pip packages: {len(pip_packages)} > {MAX_PIP_PACKAGES}")
    for extra in extras:
        if not isinstance(extra, str) or not _EXTRA_RE.fullmatch(extra):
            raise InvalidBuildInput(f"invalid extra {_short(extra)}: expected [A-Za-z0-9._-]+")
    requirements = []
    for requirement in pip_packages:
        if not isinstance(requirement, str):
            raise InvalidBuildInput(f"invalid pip package {_short(requirement)}: not a string")
        stripped = requirement.strip()
        if not stripped:
            raise InvalidBuildInput("invalid pip package: empty")
        if len(stripped) > MAX_REQUIREMENT_CHARS:
            raise InvalidBuildInput(f"invalid pip package {_short(stripped)}: too long")
        if any(ord(c) < 32 or ord(c) == 127 for c in stripped):
            raise InvalidBuildInput(f"invalid pip package {_short(stripped)}: control character")
        if stripped.startswith("-"):
            raise InvalidBuildInput(f"invalid pip package {_short(stripped)}: options not allowed")
        requirements.append(stripped)
    return sorted(set(extras)), requirements


def validate_index_url(url: str) -> str:
    """Operator-given index URLs end up in an ENV line: keep them plain."""
    if not _URL_RE.fullmatch(url):
        raise InvalidBuildInput(f"invalid index URL {_short(url)}")
    return url


def validate_repository(repository: str) -> str:
    if not _REPOSITORY_RE.fullmatch(repository):
        raise InvalidBuildInput(f"invalid image repository {_short(repository)}")
    return repository


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- inputs and tag -----------------------------------------------------------


@dataclass(frozen=True)
class BuildInputs:
    """Every input of a job image; `key` hashes all of them."""

    base_image_id: str
    pyproject: bytes | None
    uv_lock: bytes | None
    extras: tuple[str, ...]
    pip_packages: tuple[str, ...]
    runner_sha256: str
    uv_version: str
    index_url: str | None
    extra_index_urls: tuple[str, ...]
    ca_sha256: str | None
    repository: str = TAG_REPOSITORY

    @cached_property
    def dependency_mode(self) -> str:
        """One of "sync" (uv.lock), "requirements" (pyproject.toml's [project] table only)
        or "none"."""
        if self.pyproject is None:
            return "none"
        if self.uv_lock is not None:
            return "sync"
        return "requirements" if _has_project_table(self.pyproject) else "none"

    @cached_property
    def dockerfile(self) -> str:
        return render_dockerfile(self)

    @cached_property
    def key(self) -> str:
        # A pyproject.toml without a [project] table (tool settings only) is not
        # an input: nothing of it goes into the image.
        used = self.dependency_mode != "none"
        parts = {
            "dockerfile": self.dockerfile,  # embeds base id, extras, packages, URLs
            "pyproject": _sha256_or_none(self.pyproject) if used else None,
            "uv_lock": _sha256_or_none(self.uv_lock) if used else None,
            "runner": self.runner_sha256,
            "uv": self.uv_version,
            "ca": self.ca_sha256,
        }
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def tag(self) -> str:
        return f"{self.repository}:{self.key[:16]}"

    def labels(self) -> dict[str, str]:
        summary = {
            "key": self.key,
            "pyproject": self.pyproject is not None,
            "uv_lock": self.uv_lock is not None,
            "extras": list(self.extras),
            "pip_packages": list(self.pip_packages),
            "runner": self.runner_sha256[:16],
            "uv": self.uv_version,
        }
        text = json.dumps(summary, separators=(",", ":"))
        if len(text) > 4000:
            summary["pip_packages"] = [f"{len(self.pip_packages)} packages"]
            text = json.dumps(summary, separators=(",", ":"))
        return {IMAGE_LABEL: "1", INPUTS_LABEL: text}


def _has_project_table(pyproject: bytes) -> bool:
    try:
        data = tomllib.loads(pyproject.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidBundle(f"invalid bundle: pyproject.toml: {e}") from e
    return isinstance(data.get("project"), dict)


def _sha256_or_none(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def render_dockerfile(inputs: BuildInputs) -> str:
    """The Dockerfile. Every command is an exec-form (JSON) RUN: no shell ever
    sees an extra or a requirement string. Layers go from the most shared (uv,
    the empty venv) to the most specific (the runner); metadata steps are few
    because each costs the classic builder a container."""

    def run(*argv: str) -> str:
        return "RUN " + json.dumps(list(argv))

    env = [
        # No uv cache baked into the image; never download a Python: the base's is the one.
        "UV_NO_CACHE=1",
        "UV_PYTHON_DOWNLOADS=never",
        "UV_LINK_MODE=copy",
        "UV_NO_PROGRESS=1",
        "UV_COMPILE_BYTECODE=1",
        f"UV_PROJECT_ENVIRONMENT={CONTAINER_VENV}",
        f"VIRTUAL_ENV={CONTAINER_VENV}",
        f"PATH={CONTAINER_VENV}/bin:$PATH",
        "PYTHONUNBUFFERED=1",
    ]
    if inputs.ca_sha256 is not None:
        env.append(f"SSL_CERT_FILE={CONTAINER_CA_PATH}")
    if inputs.index_url is not None:
        env.append(f"UV_INDEX_URL={validate_index_url(inputs.index_url)}")
    if inputs.extra_index_urls:
        urls = " ".join(validate_index_url(u) for u in inputs.extra_index_urls)
        env.append(f'UV_EXTRA_INDEX_URL="{urls}"')
    lines = [
        "# Generated by fluster-worker: a job's Python environment.",
        f"FROM {inputs.base_image_id}",
        f"LABEL {LAYER_LABEL}={validate_repository(inputs.repository)}",
        "COPY uv /usr/local/bin/uv",
    ]
    if inputs.ca_sha256 is not None:
        lines.append(f"COPY ca.crt {CONTAINER_CA_PATH}")
    lines += [
        "ENV " + " ".join(env),
        run("uv", "venv", CONTAINER_VENV, "--python", "python3"),
    ]
    extra_flags = [f"--extra={e}" for e in inputs.extras]
    project = CONTAINER_PROJECT_DIR
    mode = inputs.dependency_mode
    if mode == "sync":
        lines += [
            f"COPY pyproject.toml uv.lock {project}/",
            run("uv", "sync", f"--project={project}", "--frozen", "--no-install-project", *extra_flags),
        ]
    elif mode == "requirements":
        lines += [
            f"COPY pyproject.toml {project}/",
            run("uv", "pip", "install", "-r", f"{project}/pyproject.toml", *extra_flags),
        ]
    lines += [
        run("uv", "pip", "install", "--", CLOUDPICKLE_REQUIREMENT, *inputs.pip_packages),
        f"COPY runner.py {CONTAINER_RUNNER_PATH}",
        f"WORKDIR {CONTAINER_APP_DIR}",
        "CMD " + json.dumps(runner_command()),
    ]
    return "\n".join(lines) + "\n"


# --- blocking helpers (run them in the BlockingPool) ----------------------------


def read_project_file(path: Path, limit: int = MAX_PROJECT_FILE_BYTES) -> bytes | None:
    """A bundle's pyproject.toml or uv.lock: None when absent; a symlink, a
    non-regular file or an oversized file is refused (InvalidBundle)."""
    try:
        data = read_regular(path.parent, path.name, limit)
    except UnsafeFile as e:
        raise InvalidBundle(f"invalid bundle: {e}") from None
    except FileTooLarge:
        raise InvalidBundle(f"invalid bundle: {path.name} is larger than {limit} bytes") from None
    except OSError as e:
        raise InvalidBundle(f"invalid bundle: cannot read {path.name}: {e.strerror or e}") from e
    return data


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_context(work_dir: Path, inputs: BuildInputs, uv_bin: Path, ca_bundle: Path | None) -> Path:
    """Write the build context into a fresh temporary directory under work_dir.
    The caller removes it (shutil.rmtree) after the build."""
    work_dir.mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix="build-", dir=work_dir))
    try:
        (context / "Dockerfile").write_text(inputs.dockerfile)
        _link_or_copy(uv_bin, context / "uv")
        shutil.copyfile(RUNNER_PATH, context / "runner.py")
        if inputs.pyproject is not None:
            (context / "pyproject.toml").write_bytes(inputs.pyproject)
        if inputs.uv_lock is not None:
            (context / "uv.lock").write_bytes(inputs.uv_lock)
        if ca_bundle is not None:
            shutil.copyfile(ca_bundle, context / "ca.crt")
    except BaseException:
        shutil.rmtree(context, ignore_errors=True)
        raise
    return context


def _link_or_copy(src: Path, dst: Path) -> None:
    # uv is ~40 MB: a hard link when work_dir shares the filesystem.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

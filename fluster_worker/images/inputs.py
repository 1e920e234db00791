"""What an image build's tag is made of, read off the reactor (pool threads):
the project's pyproject.toml and uv.lock, the base image's id, the CA bundle's
hash, the uv binary and its version, the index options (dockerfile.py's
BuildInputs hashes them). Inputs that rarely change are kept briefly."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import docker
import docker.errors

from fluster_worker.images.dockerfile import (
    BuildError,
    BuildInputs,
    file_sha256,
    read_project_file,
    runner_version,
)
from fluster_worker.images.gc import one_line

__all__ = ["InputCollector"]

# How long a looked-up base image id is trusted before asking the engine again.
_BASE_ID_TTL_S = 10.0


class InputCollector:
    """The inputs of the builds of one ImageBuilder. Every method blocks (pool
    threads); ``client`` hands the builder's docker client."""

    def __init__(
        self,
        client: Callable[[], docker.DockerClient],
        base_image: str,
        *,
        ca_bundle: Path | None,
        index_url: str | None,
        extra_index_urls: tuple[str, ...],
        uv_bin: Path | None,
        repository: str,
    ) -> None:
        self._docker = client
        self._base_image = base_image
        self._ca_bundle = ca_bundle
        self._index_url = index_url
        self._extra_index_urls = extra_index_urls
        self._uv_bin = uv_bin
        self._uv_version: str | None = None
        self._uv_lock = threading.Lock()
        self._repository = repository
        self._memo_lock = threading.Lock()
        self._base_id_memo: tuple[float, str] | None = None
        self._ca_memo: tuple[tuple[int, int, int], str] | None = None

    def collect(self, project_dir: Path, extras: list[str], pip_packages: list[str]) -> BuildInputs:
        """Blocking: reads the project files and asks the engine for the base id."""
        pyproject = read_project_file(project_dir / "pyproject.toml")
        uv_lock = read_project_file(project_dir / "uv.lock") if pyproject is not None else None
        try:
            base_id = self._base_image_id()
        except docker.errors.ImageNotFound as e:
            raise BuildError(f"image build failed: base image {self._base_image} not found locally") from e
        except docker.errors.DockerException as e:
            raise BuildError(f"image build failed: docker engine: {one_line(e)}") from e
        try:
            ca_sha256 = None if self._ca_bundle is None else self._ca_sha256(self._ca_bundle)
        except OSError as e:
            raise BuildError(
                f"image build failed: cannot read the CA bundle {self._ca_bundle}: {e.strerror}"
            ) from e
        inputs = BuildInputs(
            base_image_id=base_id,
            pyproject=pyproject,
            uv_lock=uv_lock,
            extras=tuple(extras),
            pip_packages=tuple(pip_packages),
            runner_sha256=runner_version(),
            uv_version=self.uv()[1],
            index_url=self._index_url,
            extra_index_urls=self._extra_index_urls,
            ca_sha256=ca_sha256,
            repository=self._repository,
        )
        # Parses pyproject.toml (may raise InvalidBundle) here, off the reactor.
        if extras and inputs.dependency_mode == "none":
            raise BuildError("extras requested but the bundle's pyproject.toml has no [project] table")
        inputs.key  # noqa: B018 -- computed once, here
        return inputs

    def _base_image_id(self) -> str:
        """Blocking: the base image's id, asked of the engine at most every
        ``_BASE_ID_TTL_S`` (every job needs it; a re-tagged base is seen soon after)."""
        now = time.monotonic()
        with self._memo_lock:
            cached = self._base_id_memo
        if cached is not None and now - cached[0] < _BASE_ID_TTL_S:
            return cached[1]
        base_id = str(self._docker().api.inspect_image(self._base_image)["Id"])
        with self._memo_lock:
            self._base_id_memo = (now, base_id)
        return base_id

    def _ca_sha256(self, path: Path) -> str:
        """Blocking: the CA bundle's hash, computed again only when the file changes."""
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._memo_lock:
            cached = self._ca_memo
        if cached is not None and cached[0] == key:
            return cached[1]
        digest = file_sha256(path)
        with self._memo_lock:
            self._ca_memo = (key, digest)
        return digest

    def uv(self) -> tuple[Path, str]:
        """Blocking, cached: the uv binary copied into images and its version."""
        with self._uv_lock:
            if self._uv_bin is None:
                import uv

                self._uv_bin = Path(uv.find_uv_bin())
            if self._uv_version is None:
                out = subprocess.run(
                    [str(self._uv_bin), "--version"],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                    env={"PATH": "/usr/bin:/bin"},
                )
                self._uv_version = out.stdout.strip()
            return self._uv_bin, self._uv_version

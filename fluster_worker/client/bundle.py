"""A project directory as a bundle zip: paths relative to the project root, the
usual caches and virtualenvs left out, symlinks never followed."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

#: Directories never bundled: version control, virtualenvs, caches.
SKIPPED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".venv", "venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".tox", "node_modules", ".hypothesis",
})
SKIPPED_SUFFIXES = (".pyc", ".pyo")


def zip_project(project: Path, destination: Path) -> int:
    """Write ``project``'s files into the zip ``destination``; returns how many.
    Only regular files (a symlink could point anywhere on this machine)."""
    project = project.resolve()
    if not project.is_dir():
        raise ValueError(f"{project} is not a directory")
    count = 0
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for root, dirs, files in os.walk(project):
            dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not os.path.islink(os.path.join(root, d)))
            for name in sorted(files):
                path = Path(root, name)
                if name.endswith(SKIPPED_SUFFIXES) or not stat.S_ISREG(path.lstat().st_mode):
                    continue
                archive.write(path, path.relative_to(project).as_posix())
                count += 1
    return count

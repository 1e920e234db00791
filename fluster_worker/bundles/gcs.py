"""gs:// bundles through gcsfs (the optional ``gcs`` extra), blocking (pool
threads): the filesystem, an object's info (its generation keys the cache), a
copy of it to a temp file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fluster_worker.bundles import unzip
from fluster_worker.bundles.sources import BundleError, shown

__all__ = ["GCS_EXTRA", "gcs_copy", "gcs_filesystem", "gcs_info"]

GCS_EXTRA = "gs:// bundles need the gcs extra: pip install 'fluster-worker[gcs]'"


def gcs_filesystem() -> Any:
    try:
        import gcsfs  # the optional ``gcs`` extra
    except ImportError:
        raise BundleError(GCS_EXTRA) from None
    return gcsfs.GCSFileSystem()


def gcs_info(fs: Any, url: str) -> dict[str, Any]:
    try:
        return dict(fs.info(url))
    except FileNotFoundError:
        raise BundleError(f"bundle not found: {shown(url)}") from None
    except Exception as e:
        raise BundleError(f"cannot fetch bundle {shown(url)}: {unzip.oneline(str(e))}") from None


def gcs_copy(fs: Any, url: str, dest: Path, max_bytes: int, abort: threading.Event) -> str:
    try:
        with fs.open(url, "rb") as src:
            return unzip.copy_stream(src, dest, max_bytes, abort)
    except (unzip.UnzipError, unzip.Aborted):
        raise
    except FileNotFoundError:
        raise BundleError(f"bundle not found: {shown(url)}") from None
    except Exception as e:
        raise BundleError(f"cannot fetch bundle {shown(url)}: {unzip.oneline(str(e))}") from None

"""Job ids, and the one place where a job id becomes a name on disk.

Job ids are chosen by clients. A job that submits another job names it
``<parent>/<child>`` (``my-exp/worker-0``), and ids nest. An id is valid when
it is at most ``MAX_JOB_ID_BYTES`` bytes of UTF-8, has no control characters
(nor line separators or lone surrogates), and no empty, ``.`` or ``..``
segment between slashes.

File and directory names are derived from the id by ``job_key``:

- ids that were already valid under the worker's first rule (letters, digits,
  ``.``, ``_``, ``-``, at most 200, starting with a letter or digit) are their
  own key, so the state dirs of workers before hierarchical ids load unchanged;
- every other id gets ``<slug>~<hash>``: a readable slug of the id (``[A-Za-z0-9._-]``,
  cut to 64) and 20 hex digits of the SHA-256 of the whole id.

``~`` never occurs in a plain key, so the two forms never meet, and the hash
of the full id keeps ids whose slugs coincide apart: ``a/b`` is ``a_b~...``,
never the key of ``a__b`` (which is ``a__b``). A key is never ``.``, ``..``,
empty, longer than 200 bytes or anything but ``[A-Za-z0-9._~-]``, so it is a
plain child name in any directory.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_JOB_ID_BYTES = 1024
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", re.ASCII)
_NOT_SLUG = re.compile(r"[^A-Za-z0-9._-]+", re.ASCII)
_SLUG_CHARS = 64
_HASH_HEX = 20
# Control characters, lone surrogates, line and paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def job_id_problem(job_id: object) -> str | None:
    """Why ``job_id`` is not a valid job id (one line), or None when it is."""
    if not isinstance(job_id, str):
        return f"must be a string, not {type(job_id).__name__}"
    if not job_id:
        return "is empty"
    if _PLAIN.fullmatch(job_id):
        return None  # the common case, checked cheaply
    if len(job_id) > MAX_JOB_ID_BYTES:
        return f"is longer than {MAX_JOB_ID_BYTES} bytes"
    for char in job_id:
        if unicodedata.category(char) in _FORBIDDEN_CATEGORIES:
            return f"contains the control character U+{ord(char):04X}"
    if len(job_id.encode("utf-8")) > MAX_JOB_ID_BYTES:
        return f"is longer than {MAX_JOB_ID_BYTES} bytes of UTF-8"
    for segment in job_id.split("/"):
        if segment in ("", ".", ".."):
            shown = "an empty" if not segment else f"a {segment!r}"
            return f"has {shown} segment between slashes"
    return None


def valid_job_id(job_id: object) -> bool:
    return job_id_problem(job_id) is None


def shown_job_id(job_id: str, limit: int = 80) -> str:
    """The id for a one-line message: repr-quoted (control characters escaped), cut."""
    cut = job_id if len(job_id) <= limit else job_id[:limit] + "..."
    return repr(cut)


def job_key(job_id: str) -> str:
    """The file-system name of a valid job id (see the module doc): injective,
    stable across versions, and a plain child name. ValueError for an invalid id."""
    problem = job_id_problem(job_id)
    if problem is not None:
        raise ValueError(f"invalid job id {shown_job_id(str(job_id))}: {problem}")
    if _PLAIN.fullmatch(job_id):
        return job_id
    digest = hashlib.sha256(job_id.encode("utf-8")).hexdigest()[:_HASH_HEX]
    slug = _NOT_SLUG.sub("_", job_id.replace("/", "_"))[:_SLUG_CHARS].strip("._-")
    return f"{slug or 'job'}~{digest}"

"""A container's last log entries through the engine's API, per stream: the log
follower's end-of-job check, without a second docker CLI per job."""

from __future__ import annotations

from typing import Any

__all__ = ["demultiplex", "last_entries"]


def last_entries(api: Any, container_id: str, count: int) -> dict[int, bytes]:
    """The last ``count`` timestamped entries (pool thread), per stream, as
    ``docker logs --tail`` prints them. One request for both streams: docker-py's
    ``logs`` would take one per stream, each after an inspect to learn whether
    the container has a TTY; ours never do (``tty=False`` at create), so the
    answer is always multiplexed."""
    params = {"stdout": 1, "stderr": 1, "timestamps": 1, "follow": 0, "tail": count}
    response = api._get(api._url("/containers/{0}/logs", container_id), params=params)
    api._raise_for_status(response)
    data = response.content
    return {fd: demultiplex(data, fd) for fd in (1, 2)}


def demultiplex(data: bytes, fd: int) -> bytes:
    """The payload of stream ``fd`` in Docker's multiplexed log format: frames
    of an 8-byte header (stream, 0, 0, 0, big-endian length) and the data."""
    out = bytearray()
    offset = 0
    while offset + 8 <= len(data):
        stream = data[offset]
        size = int.from_bytes(data[offset + 4 : offset + 8], "big")
        payload = data[offset + 8 : offset + 8 + size]
        if stream == fd:
            out += payload
        offset += 8 + size
    return bytes(out)

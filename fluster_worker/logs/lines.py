"""Parsing ``docker logs --timestamps`` output into lines: timestamps, chunk
boundaries, Docker's 16 KiB partial messages, CRLF, bad UTF-8, over-long lines.

Each output line of ``docker logs --timestamps`` is ``<RFC3339Nano> <data>\\n``,
e.g. ``2026-11-28T11:37:13.304690917Z hello``. Two Docker details matter:

* The daemon's log copier cuts a container line longer than 16 KiB into partial
  messages of exactly 16384 bytes, and ``docker logs --timestamps`` prints each
  piece with its own prefix but without a newline, all pieces carrying the
  timestamp of the first: ``TS aaaa...(16384)TS aaaa...\\n``. A line longer than
  16 KiB is therefore reassembled by removing the embedded copies of its own
  prefix. (A piece is only treated as a continuation when the *identical*
  31-byte prefix, nanoseconds included, appears in the line.)
* A container's last line without a newline arrives as a final partial message:
  ``TS no newline`` then EOF. It is a line (flushed by ``finish``) if the tail
  ended cleanly; after a killed tail it is discarded, since the restarted tail
  prints it again in full.

Lines are split on ``\\n`` at the byte level, before decoding: 0x0A never occurs
inside a UTF-8 multi-byte sequence, so a character cut by a chunk boundary is
simply completed by the next chunk, and one decode of a run of complete lines
with ``errors="replace"`` gives exactly what one incremental decoder per stream
would. Stored lines are valid UTF-8 (bad bytes become U+FFFD) without their
newline; one trailing ``\\r`` (CRLF) is removed, other ``\\r`` are kept.

A line longer than ``max_line_bytes`` keeps its first ``max_line_bytes`` bytes
(cut at a character boundary) followed by
``" [fluster: line truncated, N bytes dropped]"``, as one stored line. Memory is
bounded by about ``max_line_bytes`` per stream however long the line is; the
rest of it is counted, not kept.

Lines without a timestamp prefix cannot be container output (every container
line has one with ``--timestamps``): they are the CLI's own messages (``Error
response from daemon: ...``). They are not stored; ``take_diagnostics`` hands them
to the follower, which logs them and names them in its error.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# "2026-11-28T11:37:13.304690917Z " : Docker's RFC3339NanoFixed in UTC, plus a space.
_FIXED_PREFIX = 31
# Docker's partial-message size; a line longer than this plus a prefix may hold pieces.
_DOCKER_PIECE = 16384
_TRUNCATED = b" [fluster: line truncated, %d bytes dropped]"
_MAX_DIAGNOSTICS = 20
_DIAGNOSTIC_CHARS = 300

_RFC3339 = re.compile(rb"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9})\d*)?(?:[Zz]|([+-])(\d\d):(\d\d))")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp(text: bytes | str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp (Docker's
    RFC3339Nano: ``2026-11-28T11:37:13.304690917Z``; offsets like ``+02:00`` and
    fewer fraction digits are accepted, digits past the ninth are ignored)."""
    raw = text.encode("ascii", "replace") if isinstance(text, str) else text
    m = _RFC3339.fullmatch(raw)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {raw[:40]!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as e:
        raise ValueError(f"not an RFC 3339 timestamp: {raw[:40]!r} ({e})") from None
    delta = moment - _EPOCH
    seconds = delta.days * 86400 + delta.seconds
    if m.group(8):
        offset = int(m.group(9)) * 3600 + int(m.group(10)) * 60
        seconds += -offset if m.group(8) == b"+" else offset
    fraction = m.group(7) or b""
    return seconds * 1_000_000_000 + int(fraction.ljust(9, b"0"))


def format_since(timestamp_ns: int) -> str:
    """The ``docker logs --since`` value for a nanosecond timestamp
    (``<seconds>.<9 digits>``, which the CLI passes to the daemon unchanged)."""
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}"


def cut_utf8(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data``, never ending inside a UTF-8 character."""
    if len(data) <= limit:
        return data
    end = limit
    while end > 0 and end > limit - 4 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[:end]


def sanitize_utf8(data: bytes) -> bytes:
    """``data`` if it is valid UTF-8, else with each bad sequence as U+FFFD."""
    if data.isascii():
        return data
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")


def truncate_line(data: bytes, max_line_bytes: int) -> bytes:
    """A line of at most ``max_line_bytes`` bytes of ``data`` plus the marker when
    ``data`` is longer."""
    if len(data) <= max_line_bytes:
        return data
    head = cut_utf8(data, max_line_bytes)
    return head + _TRUNCATED % (len(data) - len(head))


class _Overflow:
    """A line that passed ``max_line_bytes`` and has not ended yet."""

    __slots__ = ("timestamp_ns", "prefix", "head", "dropped", "carry")

    def __init__(self, timestamp_ns: int, prefix: bytes, head: bytes, dropped: int, carry: bytes):
        self.timestamp_ns = timestamp_ns
        self.prefix = prefix
        self.head = head
        self.dropped = dropped
        self.carry = carry


class StreamParser:
    """One stream (stdout or stderr) of ``docker logs --timestamps`` output, fed
    in chunks of any size and boundary. ``feed`` and ``finish`` return the
    completed lines as two parallel lists: timestamps (ns) and data (UTF-8 bytes)."""

    def __init__(self, max_line_bytes: int) -> None:
        if max_line_bytes < 64:
            raise ValueError("max_line_bytes must be at least 64")
        self.max_line_bytes = max_line_bytes
        # Bytes of an unfinished raw line that may be buffered before it is
        # handled as over-long: the data, its prefix and one prefix per 16 KiB piece.
        self._max_raw = max_line_bytes + 2 * _FIXED_PREFIX + _FIXED_PREFIX * (max_line_bytes // _DOCKER_PIECE + 2) + 64
        self._long_run = min(_DOCKER_PIECE, max_line_bytes) + _FIXED_PREFIX
        self._buf = b""
        self._overflow: _Overflow | None = None
        self._seconds: dict[bytes, int] = {}
        self._diagnostics: list[str] = []
        self.diagnostic_count = 0

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished line."""
        if self._overflow is not None:
            return len(self._overflow.head) + len(self._overflow.carry)
        return len(self._buf)

    def take_diagnostics(self) -> list[str]:
        """The non-log lines (docker CLI messages) seen since the last call."""
        out, self._diagnostics = self._diagnostics, []
        return out

    def feed(self, chunk: bytes) -> tuple[list[int], list[bytes]]:
        stamps: list[int] = []
        lines: list[bytes] = []
        if self._overflow is not None:
            rest = self._feed_overflow(chunk, stamps, lines)
            if rest is None:
                return stamps, lines
            chunk = rest
        buf = self._buf + chunk if self._buf else chunk
        end = buf.rfind(b"\n")
        if end < 0:
            self._buf = buf
        else:
            self._buf = buf[end + 1 :]
            self._parse(buf[:end], stamps, lines)
        if len(self._buf) > self._max_raw:
            self._start_overflow()
        return stamps, lines

    def finish(self) -> tuple[list[int], list[bytes]]:
        """The stream ended cleanly: the unfinished line (a last line without a
        newline) is a line."""
        stamps: list[int] = []
        lines: list[bytes] = []
        if self._overflow is not None:
            self._end_overflow(self._overflow.carry, stamps, lines)
        elif self._buf:
            self._parse(self._buf, stamps, lines)
        self._buf = b""
        return stamps, lines

    def discard(self) -> int:
        """The stream was cut (the tail died): drop the unfinished line, which the
        restarted tail prints again. Returns the bytes dropped."""
        dropped = self.buffered
        self._buf = b""
        self._overflow = None
        return dropped

    # -- complete lines ---------------------------------------------------------

    def _parse(self, complete: bytes, stamps: list[int], lines: list[bytes]) -> None:
        """Parse ``complete`` (raw lines joined by newlines, no final newline)."""
        if b"\r" in complete:
            complete = complete.replace(b"\r\n", b"\n")
            if complete.endswith(b"\r"):
                complete = complete[:-1]
        # A run that may hold a line of several 16 KiB pieces (or an over-long one)
        # is decoded line by line after reassembly: Docker cuts pieces without
        # regard to characters.
        long_lines = len(complete) > self._long_run
        if not long_lines:
            complete = sanitize_utf8(complete)
        seconds = self._seconds
        add_stamp = stamps.append
        add_line = lines.append
        for raw in complete.split(b"\n"):
            if raw[29:31] == b"Z ":
                base = seconds.get(raw[:19])
                if base is None:
                    base = self._second_of(raw[:19])
                if base is not None and raw[20:29].isdigit():
                    data = raw[31:]
                    if long_lines:
                        data = self._long(raw[:31], data)
                    add_stamp(base + int(raw[20:29]))
                    add_line(data)
                    continue
            self._parse_other(raw, stamps, lines)

    def _second_of(self, key: bytes) -> int | None:
        try:
            value = parse_timestamp(key + b"Z")
        except ValueError:
            return None
        if len(self._seconds) > 4096:
            self._seconds.clear()
        self._seconds[key] = value
        return value

    def _parse_other(self, raw: bytes, stamps: list[int], lines: list[bytes]) -> None:
        """A line not in Docker's fixed UTC format: another offset, or no timestamp."""
        space = raw.find(b" ", 0, 64)
        if space > 0:
            try:
                stamp = parse_timestamp(raw[:space])
            except ValueError:
                pass
            else:
                data = self._long(raw[: space + 1], raw[space + 1 :])
                stamps.append(stamp)
                lines.append(data)
                return
        if not raw:
            return
        self.diagnostic_count += 1
        if len(self._diagnostics) < _MAX_DIAGNOSTICS:
            text = raw[:_DIAGNOSTIC_CHARS].decode("utf-8", "replace")
            self._diagnostics.append(text)

    def _long(self, prefix: bytes, data: bytes) -> bytes:
        """Reassemble, truncate and decode a line that may be long."""
        if len(data) > _DOCKER_PIECE and prefix in data:
            data = data.replace(prefix, b"")  # Docker's 16 KiB pieces
        return sanitize_utf8(truncate_line(data, self.max_line_bytes))

    # -- over-long unfinished lines -----------------------------------------------

    def _start_overflow(self) -> None:
        buf, self._buf = self._buf, b""
        if buf[29:31] == b"Z ":
            space = 30
        else:
            space = buf.find(b" ", 0, 64)
        try:
            stamp = parse_timestamp(buf[:space]) if space > 0 else None
        except ValueError:
            stamp = None
        if stamp is None:
            # No timestamp: a runaway CLI message. Keep its start as a diagnostic
            # and drop the rest of it like the rest of an over-long line.
            self._parse_other(buf[:_DIAGNOSTIC_CHARS], [], [])
            self._overflow = _Overflow(-1, b"\n", b"", 0, b"")
            return
        prefix = buf[: space + 1]
        body, carry, count = _split_pieces(buf[space + 1 :], prefix)
        data = body.replace(prefix, b"") if count else body
        head = cut_utf8(data, self.max_line_bytes)
        self._overflow = _Overflow(stamp, prefix, head, len(data) - len(head), carry)

    def _feed_overflow(self, chunk: bytes, stamps: list[int], lines: list[bytes]) -> bytes | None:
        """Count the dropped bytes of the over-long line; at its newline, emit it
        and return what follows (to be parsed normally), else return None."""
        state = self._overflow
        assert state is not None
        text = state.carry + chunk
        end = text.find(b"\n")
        if end >= 0:
            self._end_overflow(text[:end], stamps, lines)
            return text[end + 1 :]
        body, state.carry, count = _split_pieces(text, state.prefix)
        state.dropped += len(body) - count * len(state.prefix)
        return None

    def _end_overflow(self, tail: bytes, stamps: list[int], lines: list[bytes]) -> None:
        state = self._overflow
        assert state is not None
        self._overflow = None
        if state.timestamp_ns < 0:
            return  # the rest of a runaway CLI message
        if tail.endswith(b"\r"):
            tail = tail[:-1]
        dropped = state.dropped + len(tail) - tail.count(state.prefix) * len(state.prefix)
        stamps.append(state.timestamp_ns)
        lines.append(sanitize_utf8(state.head) + _TRUNCATED % dropped)


def _split_pieces(text: bytes, prefix: bytes) -> tuple[bytes, bytes, int]:
    """Split ``text`` into a body holding every complete copy of ``prefix`` and a
    carry (shorter than the prefix) that may start a copy completed by the next
    chunk; also return how many copies the body holds."""
    count = text.count(prefix)
    cut = len(text) - (len(prefix) - 1)
    if count:
        cut = max(cut, text.rfind(prefix) + len(prefix))
    cut = max(cut, 0)
    return text[:cut], text[cut:], count

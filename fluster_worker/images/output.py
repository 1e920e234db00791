"""What comes out of an image build: the engine's build stream as clean lines
for the job's build log, and the one-line cause of a failed build (the failing
step, and uv's error with its causes rather than the engine's generic message).
Pure: no Docker calls here."""

from __future__ import annotations

import json
import re
from collections import deque

from fluster_worker.common.text import one_line

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class BuildOutput:
    """Splits the engine's build stream into lines and remembers the output of
    the current step, to name the cause when the build fails."""

    def __init__(self, keep: int = 200) -> None:
        self._partial = ""
        self._step = ""
        self._step_output: deque[str] = deque(maxlen=keep)

    def feed(self, chunk: str) -> list[str]:
        """Complete, cleaned lines of a "stream" chunk (keeps a partial line)."""
        text = self._partial + _ANSI_RE.sub("", chunk)
        *lines, self._partial = text.split("\n")
        out = [line.rstrip("\r") for line in lines]
        for line in out:
            self._note(line)
        return out

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, ""
        if rest:
            self._note(rest)
            return [rest]
        return []

    def _note(self, line: str) -> None:
        if line.startswith("Step ") and " : " in line:
            self._step = line.split(" : ", 1)[1].strip()
            self._step_output.clear()
        elif line.startswith((" ---> ", "Removing intermediate container")):
            pass
        elif line.strip():
            self._step_output.append(line)

    def failure(self, engine_message: str) -> str:
        """One line: 'image build failed: <step>: <cause>'."""
        cause = _cause(list(self._step_output)) or engine_message.strip() or "unknown error"
        step = _step_name(self._step)
        message = f"image build failed: {step}: {cause}" if step else f"image build failed: {cause}"
        return one_line(message, 500)


def _step_name(instruction: str) -> str:
    if not instruction:
        return ""
    if instruction.startswith("RUN ["):
        try:
            argv = json.loads(instruction[4:])
        except ValueError:
            argv = None
        if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
            words = [a for a in argv[:3] if not a.startswith("-")]
            if words[:2] == ["uv", "pip"]:
                return " ".join(words[:3])
            return " ".join(words[:2])
    return instruction if len(instruction) <= 60 else instruction[:57] + "..."


def _cause(output: list[str]) -> str:
    """uv's last 'error:' line with its 'cause:'/'Caused by:' lines, else the
    last output line."""
    for i in range(len(output) - 1, -1, -1):
        line = output[i].strip()
        if not line.startswith(("error:", "×")):
            continue
        parts = [line.removeprefix("error:").removeprefix("×").strip()]
        skipping = False  # inside a hint
        for follow in output[i + 1 :]:
            f = follow.strip()
            if not follow[:1].isspace() and not f.startswith(_CAUSE_PREFIXES):
                break
            prefix = next((p for p in _CAUSE_PREFIXES if f.startswith(p)), None)
            if prefix is not None:
                parts.append(f.removeprefix(prefix).strip())
                skipping = False
            elif f.startswith("hint:"):
                skipping = True
            elif not skipping:
                parts[-1] += " " + f
        return ": ".join(p for p in parts if p)
    return output[-1].strip() if output else ""


_CAUSE_PREFIXES = ("cause:", "Caused by:", "╰─▶", "├─▶")

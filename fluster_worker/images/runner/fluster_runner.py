"""The in-container job runner: ``python runner.py <entrypoint.pkl> <result.pkl>``.

Baked into every job image at /opt/fluster/runner.py and run with the image's
Python, where only the standard library and cloudpickle are guaranteed. The
working directory is the job's project (/app). It loads the cloudpickled
Entrypoint, calls ``callable(*args, **kwargs)`` and, when the value is not None,
writes ``cloudpickle.dumps(value)`` to the result path atomically.

Exit status: 0 on success; 1 when the entrypoint cannot be loaded, the call
raises, or the result cannot be pickled (traceback on stderr); a SystemExit
raised by the job keeps its code; SIGTERM exits 143 after unwinding the job.
On exit status 1 the runner also writes why, one line of at most
``_MAX_ERROR_CHARS`` characters (e.g. ``ValueError: boom``), to ``error.txt``
beside the result: the worker adds it to the job's error.

This file must stay importable by Python 3.8+ with no third-party imports at
module level other than cloudpickle (imported lazily). Its sha256 is part of
every image tag: any edit rebuilds the images.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import types
from typing import Any, NoReturn

_ENTRYPOINT_MODULES = ("fluster", "fluster.cluster", "fluster.cluster.types")
_MAX_ENTRYPOINT_BYTES = 1 << 30
_ERROR_FILE = "error.txt"
_MAX_ERROR_CHARS = 500


def _die(message: str) -> NoReturn:
    sys.stderr.write("fluster-runner: " + message + "\n")
    sys.stderr.flush()
    sys.exit(1)


class Entrypoint:
    """Stand-in for ``fluster.cluster.types.Entrypoint`` when the real class is
    not importable in the image. Accepts the state a dataclass pickles: a
    ``__dict__`` dict, a ``(dict | None, slots dict)`` pair, or the field list of
    a frozen ``slots=True`` dataclass."""

    _FIELDS = ("callable", "args", "kwargs")

    def __init__(self, callable: Any = None, args: Any = None, kwargs: Any = None) -> None:
        self.callable = callable
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        values: dict[str, Any] = {}
        if isinstance(state, dict):
            values.update(state)
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and (state[0] is None or isinstance(state[0], dict))
            and (state[1] is None or isinstance(state[1], dict))
        ):
            values.update(state[0] or {})
            values.update(state[1] or {})
        elif isinstance(state, (list, tuple)):
            values.update((self._FIELDS[i], v) for i, v in enumerate(state[: len(self._FIELDS)]))
        else:
            raise TypeError("unsupported Entrypoint state: " + type(state).__name__)
        for name in self._FIELDS:
            values.setdefault(name, None)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"Entrypoint(callable={self.callable!r}, args={self.args!r}, kwargs={self.kwargs!r})"


def install_entrypoint_stub() -> bool:
    """Make ``fluster.cluster.types.Entrypoint`` resolvable for unpickling.

    Returns False when the real module imports (nothing is installed), True
    when stub modules were put in ``sys.modules``."""
    try:
        __import__("fluster.cluster.types")
        return False
    except Exception:  # absent (ImportError) or broken: stub what is missing
        pass
    parent: types.ModuleType | None = None
    for name in _ENTRYPOINT_MODULES:
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name, fromlist=["_"])
            except Exception:
                module = types.ModuleType(name, "fluster-runner stub")
                if name != _ENTRYPOINT_MODULES[-1]:
                    module.__path__ = []
                sys.modules[name] = module
        if parent is not None:
            setattr(parent, name.rpartition(".")[2], module)
        parent = module
    assert parent is not None
    if not hasattr(parent, "Entrypoint"):
        Entrypoint.__module__ = _ENTRYPOINT_MODULES[-1]
        parent.Entrypoint = Entrypoint  # type: ignore[attr-defined]
    return True


def _setup_sys_path(cwd: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # Drop the runner's own directory (sys.path[0]) so it never shadows job modules.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    src = os.path.join(cwd, "src")
    front = [cwd] + ([src] if os.path.isdir(src) else [])
    sys.path[:0] = front


def _on_sigterm(signum: int, frame: Any) -> None:
    # As PID 1 in a container, SIGTERM has no default action: unwind the job.
    raise SystemExit(128 + signum)


def _load(path: str) -> Any:
    import cloudpickle

    with open(path, "rb") as f:
        data = f.read(_MAX_ENTRYPOINT_BYTES + 1)
    if len(data) > _MAX_ENTRYPOINT_BYTES:
        raise ValueError(f"entrypoint pickle larger than {_MAX_ENTRYPOINT_BYTES} bytes")
    install_entrypoint_stub()
    entrypoint = cloudpickle.loads(data)
    if not callable(getattr(entrypoint, "callable", None)):
        raise TypeError(f"{type(entrypoint).__name__} has no callable 'callable' attribute")
    return entrypoint


def describe(error: BaseException) -> str:
    """``Type: message`` on one line, bounded, as the last line of a traceback
    names it (``pkg.mod.Type`` for types outside builtins). Never raises: the
    message of a hostile exception may itself fail to render."""
    kind = type(error)
    name = kind.__qualname__
    module = getattr(kind, "__module__", "builtins")
    if module not in ("builtins", "__main__", None):
        name = f"{module}.{name}"
    try:
        message = str(error)
    except Exception:
        message = "<unprintable message>"
    text = " ".join((f"{name}: {message}" if message else name).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _write_error(result_path: str, text: str) -> None:
    """Best effort: the exit status is what counts; this only says why."""
    _write_file(os.path.join(os.path.dirname(result_path), _ERROR_FILE), text.encode("utf-8", "replace"))


def _write_result(path: str, value: Any) -> None:
    import cloudpickle

    _write_file(path, cloudpickle.dumps(value))


def _write_file(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: runner.py <entrypoint.pkl> <result.pkl>\n")
        return 2
    entrypoint_path, result_path = argv[1], argv[2]
    signal.signal(signal.SIGTERM, _on_sigterm)
    _setup_sys_path(os.getcwd())
    for stale in (result_path, os.path.join(os.path.dirname(result_path), _ERROR_FILE)):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass

    try:
        entrypoint = _load(entrypoint_path)
    except Exception as e:
        traceback.print_exc()
        _fail(result_path, "could not load the entrypoint: " + describe(e))

    args = entrypoint.args if entrypoint.args is not None else ()
    kwargs = entrypoint.kwargs if entrypoint.kwargs is not None else {}
    try:
        value = entrypoint.callable(*args, **kwargs)
    except Exception as e:
        traceback.print_exc()
        sys.stderr.flush()
        _record_error(result_path, describe(e))
        return 1
    finally:
        sys.stdout.flush()

    if value is not None:
        try:
            _write_result(result_path, value)
        except Exception as e:
            traceback.print_exc()
            _fail(result_path, "could not write the result: " + describe(e))
    return 0


def _record_error(result_path: str, text: str) -> None:
    try:
        _write_error(result_path, text)
    except Exception as e:  # a full disk, a read-only mount: the exit status still says it failed
        sys.stderr.write("fluster-runner: could not record the error: " + describe(e) + "\n")


def _fail(result_path: str, message: str) -> NoReturn:
    _record_error(result_path, message)
    _die(message)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

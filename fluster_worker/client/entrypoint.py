"""Entry points as the Fluster clients send them:
``cloudpickle.dumps(Entrypoint(callable, args, kwargs))`` with the clients'
``fluster.cluster.types.Entrypoint``, pickled by reference.

The callable is a *reference* to ``module:function``, resolved when the runner
unpickles it inside the job's container, from the job's bundle (the runner puts
the project on ``sys.path`` first): ``getattr(importlib.import_module(module),
name)``, pickled as calls of those two standard functions. So nothing of the
project is imported (or even installed) where the job is submitted, and no code
object travels: any Python of the image can load it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
from typing import Any

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ENTRYPOINT_MODULE = "fluster.cluster.types"


class _Imported:
    """Pickles as ``importlib.import_module(module)``."""

    def __init__(self, module: str) -> None:
        self.module = module

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return importlib.import_module, (self.module,)


class _Attribute:
    """Pickles as ``getattr(owner, name)``."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner = owner
        self.name = name

    def __reduce__(self) -> tuple[Any, tuple[object, str]]:
        return getattr, (self.owner, self.name)


def parse_target(target: str) -> tuple[str, str]:
    """``"pkg.module:function"`` (or ``"module:Class.method"``) as (module, qualname);
    ValueError (one line) otherwise."""
    module, sep, qualname = target.partition(":")
    if not sep or not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(qualname):
        raise ValueError(f"{target[:100]!r} is not MODULE:FUNCTION (e.g. mypkg.train:main)")
    return module, qualname


def function_reference(module: str, qualname: str) -> object:
    """What unpickles, in the container, to ``module``'s ``qualname``."""
    reference: object = _Imported(module)
    for name in qualname.split("."):
        reference = _Attribute(reference, name)
    return reference


def entrypoint_class() -> type:
    """The clients' ``fluster.cluster.types.Entrypoint``: the real one when the
    Fluster client is installed here, else a stand-in registered under that name
    (this process only), so that the pickle names it exactly as the clients'
    pickles do. The runner resolves the name inside the container either way."""
    try:
        return importlib.import_module(_ENTRYPOINT_MODULE).Entrypoint  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        pass

    @dataclasses.dataclass
    class Entrypoint:
        callable: Any
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    Entrypoint.__module__ = _ENTRYPOINT_MODULE
    Entrypoint.__qualname__ = "Entrypoint"
    parent: types.ModuleType | None = None
    names = _ENTRYPOINT_MODULE.split(".")
    for i in range(len(names)):
        name = ".".join(names[: i + 1])
        module = sys.modules.get(name)
        if module is None:
            module = sys.modules[name] = types.ModuleType(name, "stand-in for the Fluster client's module")
        if parent is not None:
            setattr(parent, names[i], module)
        parent = module
    assert parent is not None
    parent.Entrypoint = Entrypoint  # type: ignore[attr-defined]
    return Entrypoint


def serialized_entrypoint(target: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> bytes:
    """RunJobRequest.serialized_entrypoint for ``target`` ("module:function")."""
    import cloudpickle

    module, qualname = parse_target(target)
    entrypoint = entrypoint_class()(function_reference(module, qualname), tuple(args), dict(kwargs or {}))
    return cloudpickle.dumps(entrypoint)  # type: ignore[no-any-return]

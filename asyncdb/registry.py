"""Actor types by name, so that other processes create actors from a name and a
plain-data config, never from code or pickle sent over the wire."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from .actor import Actor

A = TypeVar("A", bound="type[Actor]")

_TYPES: dict[str, type[Actor]] = {}
MAIN_ALIAS = "__asyncdb_main__"
_main_path: list[str] = []  # the driver's main script, set in node processes


def register_actor(name: str | None = None) -> Callable[[A], A]:
    """Class decorator: make an actor type creatable by `name` on any node that has
    imported the defining module (default name: the class's own)."""

    def add(cls: A) -> A:
        _TYPES[name or cls.__name__] = cls
        return cls

    return add


def registered_types() -> list[str]:
    return sorted(_TYPES)


def type_name(cls: type[Actor]) -> str:
    """The name another process resolves back to `cls`: `module:qualname`. A network
    peer resolves it only to a class registered there; processes this host spawned may
    also import it."""
    module = MAIN_ALIAS if cls.__module__ == "__main__" else cls.__module__
    return f"{module}:{cls.__qualname__}"


def resolve(name: str, allow_import: bool) -> type[Actor]:
    """The actor class for `name`. `module:qualname` names are imported only when
    `allow_import` is true (processes this host spawned itself, never network peers)."""
    from .actor import Actor

    cls = _TYPES.get(name)
    if cls is not None:
        return cls
    for known in _TYPES.values():
        if type_name(known) == name:
            return known
    if ":" not in name or not allow_import:
        raise ConfigError(f"unknown actor type {name!r}; registered: {registered_types()}")
    module_name, _, qualname = name.partition(":")
    if module_name == MAIN_ALIAS and _main_path:
        load_main_module(_main_path[0])
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        obj: object = module
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import actor type {name!r}: {exc}") from exc
    if not (isinstance(obj, type) and issubclass(obj, Actor)):
        raise ConfigError(f"{name!r} is not an Actor subclass")
    return obj


def set_main_path(path: str | None) -> None:
    """Where `__asyncdb_main__:...` types come from in this (child) process."""
    _main_path[:] = [path] if path else []


def load_main_module(path: str) -> None:
    """Import the driver's main script as `__asyncdb_main__`, so classes defined in it
    resolve in a child process (the script's `if __name__ == "__main__"` block does
    not run)."""
    if MAIN_ALIAS in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(MAIN_ALIAS, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load the main module from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[MAIN_ALIAS] = module
    spec.loader.exec_module(module)


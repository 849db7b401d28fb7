"""A tiny name -> component registry, so a new network, loss term, optimiser, schedule, layer or normalisation
scheme is one decorated function.

Each registry is the one list of valid names of its kind: config validation, the CLI's choices (through the
config field's `choices` metadata), help texts (`describe()`) and "did you mean" messages all read it.
Names keep their registration order, so the first registered is the first listed (usually the default).
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

from voxseg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to components (factories, functions or specs), each with a one-line description.

    Example:
        >>> NETWORKS = Registry("network")
        >>> @NETWORKS.register("unet", "U-Net with plain or residual encoder")
        ... def build_unet(**kw): ...
        >>> NETWORKS.build("unet", features=32)

    Keyword metadata given at registration (e.g. `requires=("mean", "std")`) is read back with `metadata`.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}
        self._metadata: dict[str, dict[str, Any]] = {}

    def register(self, name: str, description: str | None = None, **metadata: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (description: its docstring's first line)."""

        def decorator(item: T) -> T:
            self.add(name, item, description, **metadata)
            return item

        return decorator

    def add(self, name: str, item: T, description: str | None = None, **metadata: Any) -> None:
        """Register `item` under `name`; a name is registered once."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        if description is None:
            description = ((getattr(item, "__doc__", None) or "").strip().splitlines() or [""])[0]
        self._items[name] = item
        self._descriptions[name] = description
        self._metadata[name] = dict(metadata)

    def unregister(self, name: str) -> T:
        """Remove `name` and return what was registered under it."""
        self.get(name)
        del self._descriptions[name], self._metadata[name]
        return self._items.pop(name)

    @contextlib.contextmanager
    def registered(self, name: str, item: T, description: str | None = None, **metadata: Any) -> Iterator[T]:
        """Register `item` for the duration of a `with` block (tests, experiments), then remove it."""
        self.add(name, item, description, **metadata)
        try:
            yield item
        finally:
            self.unregister(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ConfigError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered under `name` with the given arguments."""
        return self.get(name)(*args, **kwargs)  # type: ignore[operator]

    def metadata(self, name: str) -> dict[str, Any]:
        self.get(name)
        return dict(self._metadata[name])

    def description(self, name: str) -> str:
        self.get(name)
        return self._descriptions[name]

    def describe(self) -> str:
        """One line per name, for help texts: 'sgd: SGD with Nesterov momentum (nnU-Net's default)'."""
        return "\n".join(f"{name}: {text}" if text else name for name, text in self._descriptions.items())

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


def closest_name(name: str, valid: list[str]) -> str | None:
    """The valid name nearest to `name` when one is close enough to be a likely typo, else None."""
    close = difflib.get_close_matches(name, valid, n=1)
    return close[0] if close else None


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """'unknown loss 'dice_c'; did you mean 'dice_ce'? Valid choices: ...'"""
    close = closest_name(name, valid)
    hint = f"; did you mean '{close}'?" if close else "."
    return f"unknown {kind} '{name}'{hint} Valid choices: {', '.join(valid)}"

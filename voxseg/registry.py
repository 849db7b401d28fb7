"""A tiny name -> factory registry, so a new network, loss or normalisation is one decorated function."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

from voxseg.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories.

    Example:
        >>> NETWORKS = Registry("network")
        >>> @NETWORKS.register("unet")
        ... def build_unet(**kw): ...
        >>> NETWORKS.build("unet", features=32)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            raise ConfigError(unknown_name_message(self.kind, name, self.names()))
        return self._items[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    """'unknown loss 'dice_c'; did you mean 'dice_ce'? Valid: ...'"""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'{hint} Valid choices: {', '.join(valid)}"

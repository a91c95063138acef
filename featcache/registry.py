"""One small registry used by methods, stores, view ops and target encodings.

The registry key is the plain name used everywhere: file name, CLI value, recipe folder. Registration sets the
plugin's ``name`` attribute, so the name is written once (timm's ``register_model`` takes it from the function).
An unknown name raises an error that lists what exists (timm's ``create_model`` does the same).
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping filled by a decorator.

    Example:
        >>> METHODS = Registry("method")
        >>> @METHODS.register("kd")
        ... class KD: ...
        >>> METHODS.get("kd") is KD, KD.name
        (True, 'kd')
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if isinstance(obj, type):
                obj.name = name  # the one place a plugin's name is written
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or '(none)'}"
                                   ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

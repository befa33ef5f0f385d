"""A small name -> factory registry with did-you-mean errors.

Models, strategies and (later) tasks and datasets register themselves with a
decorator, the way timm's ``@register_model`` works::

    MODELS = Registry[ModelFactory]("model")

    @MODELS.register("small-cnn")
    def small_cnn(...): ...

    MODELS.get("smal-cnn")  # UnknownNameError: ... did you mean 'small-cnn'?
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from shared.errors import UserError

T = TypeVar("T")


class UnknownNameError(KeyError, UserError):
    """Raised when a registry lookup fails; the message lists valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; undo that.
        return str(self.args[0]) if self.args else ""


def did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """Map names to objects (usually factories) of one kind.

    Parameters
    ----------
    kind:
        What the registry holds, used in error messages (``"model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a name may be registered once."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises
        ------
        UnknownNameError
            With the valid names and the closest match.
        """
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'. Valid {self.kind}s: "
                f"{', '.join(self.names())}.{did_you_mean(name, self.names())}"
            ) from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

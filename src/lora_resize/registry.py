"""The registries of plug-ins (rank policies, budgets, key families): a name -> plug-in mapping, in registration
order, that refuses a second plug-in under a taken name."""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


class Registry(dict[str, T]):
    """Plug-ins by name, in registration order. `what` names the kind in errors."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def add(self, name: str, item: T) -> T:
        """Register `item` as `name`. Raises ValueError when the name is taken."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = item
        return item

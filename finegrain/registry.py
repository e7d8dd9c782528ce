"""Name -> object registries with helpful errors.

Methods, recipes, towers, datasets and evaluation tasks register themselves by name; the CLI
and configs refer to them by that name. Looking up an unknown name raises a ``ValueError``
that lists the valid choices and suggests the closest one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' or '' when nothing is close."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """A named collection; ``lazy_modules`` are imported on first lookup so that
    registering happens without importing every heavy module at package import."""

    def __init__(self, kind: str, lazy_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._lazy_modules = list(lazy_modules)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def _load(self) -> None:
        while self._lazy_modules:  # a module that fails to import fails the lookup loudly
            importlib.import_module(self._lazy_modules.pop(0))

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            choices = sorted(self._items)
            raise ValueError(
                f"unknown {self.kind} '{name}'{suggest(name, choices)}; "
                f"valid choices: {', '.join(choices)}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, Any]]:
        self._load()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


METHODS: Registry = Registry(
    "method",
    (
        "finegrain.methods.clip",
        "finegrain.methods.clippy",
        "finegrain.methods.flair",
        "finegrain.methods.grain",
        "finegrain.methods.detailclip",
        "finegrain.methods.composed",
    ),
)
IMAGE_TOWERS: Registry = Registry("image tower", ("finegrain.encoders",))
TEXT_TOWERS: Registry = Registry("text tower", ("finegrain.encoders",))
RECIPES: Registry = Registry("recipe", ("finegrain.recipes",))
EVAL_TASKS: Registry = Registry("evaluation task", ("finegrain.eval",))
# task kind -> its EvalTaskConfig subclass (finegrain.eval.config; no torch needed to load one)
EVAL_TASK_CONFIGS: Registry = Registry("evaluation task", ("finegrain.eval.config",))

"""A run = one ``RunConfig``; recipes are Python functions returning one, registered by name.

Every recipe ``foo`` has a ``foo_smoke`` twin (tiny model, built-in data, CPU, a few steps)
that the test suite runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from finegrain.data.config import DataConfig
from finegrain.eval.config import EvalConfig
from finegrain.methods.base import MethodConfig
from finegrain.registry import RECIPES
from finegrain.train.config import TrainConfig


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""  # '' = $FINEGRAIN_HOME/runs/<name>
    seed: int = 0
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def recipe(name: str) -> Callable[[Callable[[], RunConfig]], Callable[[], RunConfig]]:
    """Register a recipe function; its docstring's first line is its one-line summary."""

    def deco(fn: Callable[[], RunConfig]) -> Callable[[], RunConfig]:
        RECIPES.add(name, fn)
        return fn

    return deco


def get_recipe(name: str) -> RunConfig:
    cfg = RECIPES.get(name)()
    cfg.name = cfg.name if cfg.name != "run" else name
    return cfg

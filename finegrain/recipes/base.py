"""A run = one ``RunConfig``; recipes are Python functions returning one, registered by name.

Every recipe ``foo`` has a ``foo_smoke`` twin (tiny model, built-in data, CPU, a few steps)
that the test suite runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
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


def vitb16_towers() -> dict[str, ImageTowerConfig | TextTowerConfig]:
    """open_clip ``ViT-B-16`` sizes: ViT-B/16 at 224 px + 12-layer, 512-wide text transformer
    (77 tokens), as ``MethodConfig`` keyword arguments ``image=`` / ``text=``."""
    return {
        "image": ImageTowerConfig(name="vit", image_size=224, patch_size=16, width=768,
                                  depth=12, heads=12),
        "text": TextTowerConfig(name="transformer", context_length=77, width=512, depth=12,
                                heads=8),
    }  # fmt: skip


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


def validate_run(cfg: RunConfig) -> None:
    """Check what can be checked without building anything: registered names, trainer fields.

    Raises a one-line ``ValueError`` naming the valid choices.
    """
    from finegrain.registry import IMAGE_TOWERS, METHODS, TEXT_TOWERS
    from finegrain.train.trainer import validate

    METHODS.get(cfg.method.name)
    IMAGE_TOWERS.get(cfg.method.image.name)
    TEXT_TOWERS.get(cfg.method.text.name)
    validate(cfg)


def data_path(relative: str) -> str:
    """Where a file of the shared data folder lives, without absolute paths in code.

    Tried in order: ``$FINEGRAIN_DATA/<relative>``, ``../shared/data/<relative>`` from the
    current directory, then from the repository root. Returns the first that exists, else the
    first candidate (the run then fails with a clear 'not found' naming it).
    """
    import os
    from pathlib import Path

    cands = []
    if os.environ.get("FINEGRAIN_DATA"):
        cands.append(Path(os.environ["FINEGRAIN_DATA"]).expanduser() / relative)
    cands.append(Path("..") / "shared" / "data" / relative)
    repo = Path(__file__).resolve().parents[2]
    cands.append(repo.parent / "shared" / "data" / relative)
    for c in cands:
        if c.exists():
            return str(c)
    return str(cands[0])

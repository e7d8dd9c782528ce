"""A run = one ``RunConfig`` (``finegrain.run_config``); recipes are Python functions returning
one, registered by name, built from the shared pieces below (tower sizes, smoke-run settings,
dataset sizes, epochs -> steps).

Every recipe ``foo`` has a ``foo_smoke`` twin (tiny model, built-in data, CPU, a few steps)
that the test suite runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finegrain.data.config import DataConfig
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.methods.base import MethodConfig
from finegrain.registry import METHODS, RECIPES
from finegrain.run_config import RunConfig, TrainConfig

__all__ = [
    "CC3M_RECAP_SAMPLES",
    "CC3M_SAMPLES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RunConfig",
    "data_path",
    "get_recipe",
    "method_config",
    "recipe",
    "smoke_data",
    "smoke_train",
    "steps_for_epochs",
    "tiny_towers",
    "vitb16_towers",
]

# ---- dataset sizes (training pairs), to turn epochs into optimizer steps ------------------
CC3M_SAMPLES = 2_818_000  # CC3M train pairs available as shards (Sharma et al. 2018)
CC3M_RECAP_SAMPLES = 2_823_019  # CC3M as counted by FLAIR's CC3M-recap; GRAIN's default scale

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # normalisation of ImageNet-pretrained towers
IMAGENET_STD = (0.229, 0.224, 0.225)


def steps_for_epochs(
    num_samples: int, epochs: float, global_batch: int, drop_last: bool = True
) -> int:
    """Optimizer steps for ``epochs`` passes over ``num_samples`` at ``global_batch`` per step
    (the trainer counts steps; set ``train.steps`` from this for another dataset / GPU count).

    ``drop_last``: every epoch drops its last partial batch (``epochs * (n // batch)``);
    otherwise the partial batches of all epochs are pooled (``epochs * n // batch``)."""
    if num_samples < 1 or epochs <= 0 or global_batch < 1:
        raise ValueError(
            f"num_samples, epochs and global_batch must be >= 1 (epochs > 0), got "
            f"{num_samples}, {epochs} and {global_batch}"
        )
    if drop_last:
        return max(1, int(epochs * (num_samples // global_batch)))
    return max(1, int(epochs * num_samples) // global_batch)


# ---- towers ---------------------------------------------------------------------------------
def vitb16_towers() -> dict[str, ImageTowerConfig | TextTowerConfig]:
    """open_clip ``ViT-B-16`` sizes: ViT-B/16 at 224 px + 12-layer, 512-wide text transformer
    (77 tokens), as ``MethodConfig`` keyword arguments ``image=`` / ``text=``."""
    return {
        "image": ImageTowerConfig(
            name="vit",
            image_size=224,
            patch_size=16,
            width=768,
            depth=12,
            heads=12,
        ),
        "text": TextTowerConfig(
            name="transformer",
            context_length=77,
            width=512,
            depth=12,
            heads=8,
        ),
    }


def tiny_towers(
    width: int = 64, depth: int = 2, heads: int = 2, context_length: int = 32
) -> dict[str, ImageTowerConfig | TextTowerConfig]:
    """The smoke runs' towers: a native ViT at 64 px (8 px patches) and a text transformer of
    the same width, as ``MethodConfig`` keyword arguments ``image=`` / ``text=``."""
    return {
        "image": ImageTowerConfig(
            name="vit",
            image_size=64,
            patch_size=8,
            width=width,
            depth=depth,
            heads=heads,
        ),
        "text": TextTowerConfig(
            name="transformer",
            context_length=context_length,
            width=width,
            depth=depth,
            heads=heads,
        ),
    }


def method_config(name: str, **fields: Any) -> MethodConfig:
    """The registered method's own config class with ``fields`` set (e.g. ``CLIPConfig``)."""
    cls = getattr(METHODS.get(name), "Config", MethodConfig)
    known = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(fields) - known)
    if extra:
        raise ValueError(f"{cls.__name__} has no fields {extra}")
    return cls(name=name, **fields)


# ---- smoke runs -------------------------------------------------------------------------------
def smoke_data(batch_size: int = 16, **fields: Any) -> DataConfig:
    """Built-in synthetic scenes at 64 px without augmentation (the smoke twins' data)."""
    return DataConfig(
        source="synthetic",
        batch_size=batch_size,
        image_size=64,
        augment="none",
        **fields,
    )


def smoke_train(steps: int = 4, **fields: Any) -> TrainConfig:
    """A few CPU steps without progress bar (the smoke twins' trainer settings); ``fields``
    override the defaults (lr 1e-3, 1 warmup step, wd 0.1, checkpoint only at the end)."""
    defaults: dict[str, Any] = {
        "lr": 1e-3,
        "warmup_steps": 1,
        "weight_decay": 0.1,
        "device": "cpu",
        "checkpoint_every": 0,
        "log_every": 1,
        "progress": False,
    }
    return TrainConfig(steps=steps, **{**defaults, **fields})


# ---- registry ---------------------------------------------------------------------------------
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


def data_path(relative: str) -> str:
    """Where a file of the shared data folder lives, without absolute paths in code.

    Tried in order: ``$FINEGRAIN_DATA/<relative>``, ``../shared/data/<relative>`` from the
    current directory, then from the repository root. Returns the first that exists, else the
    first candidate (the run then fails with a clear 'not found' naming it).
    """
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

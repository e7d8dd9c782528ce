"""The run config: one ``RunConfig`` per training run, and the checks that need no building.

A leaf module: it imports only the config dataclasses of the layers (data, towers, method,
train, eval), so ``train/``, ``eval/``, ``recipes/`` and the CLI can all import it without
importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finegrain.config import Checked, validate_config
from finegrain.data.config import DataConfig
from finegrain.eval.config import EvalConfig
from finegrain.methods.base import MethodConfig
from finegrain.registry import IMAGE_TOWERS, METHODS, TEXT_TOWERS
from finegrain.train.config import TrainConfig


@dataclass
class RunConfig(Checked):
    name: str = "run"
    output_dir: str = ""  # '' = $FINEGRAIN_HOME/runs/<name>
    seed: int = 0
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate_trainer(cfg: RunConfig) -> None:
    """Trainer-level checks with one-line messages: every choice field of the whole tree
    (also for configs built or changed in Python) and the counts that must be positive."""
    validate_config(cfg)
    t = cfg.train
    for key in ("steps", "accum_steps"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if cfg.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")


def validate_run(cfg: RunConfig) -> None:
    """Check what can be checked without building anything: registered names, choice fields,
    trainer fields. Raises a one-line ``ValueError`` naming the valid choices."""
    METHODS.get(cfg.method.name)
    IMAGE_TOWERS.get(cfg.method.image.name)
    TEXT_TOWERS.get(cfg.method.text.name)
    validate_trainer(cfg)

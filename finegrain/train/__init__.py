"""Training: the one trainer loop, optimizer + schedule, checkpoints, distributed, logging.

Importing ``finegrain.train`` is cheap; the heavy pieces load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Trainer": "finegrain.train.trainer",
    "train": "finegrain.train.trainer",
    "NonFiniteLossError": "finegrain.train.trainer",
    "cosine_lr": "finegrain.train.optim",
    "build_optimizer": "finegrain.train.optim",
    "exact_accumulation": "finegrain.train.step",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finegrain.train' has no attribute {name!r}")

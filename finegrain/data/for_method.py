"""``method_loader``: the training loader of a method, the one place that pairs a data config
with a method's collate and transform (the trainer, ``finegrain demo``'s benchmark and the
``benchmarks/`` scripts all build their training batches here).

The method is duck-typed (``finegrain.methods.base.Method`` sits above ``data``): it gives
``make_collate(train=True)`` and ``make_transform(data_cfg, train=True)``; with
``data.feature_cache`` set it must also support the locked-tower cache
(``finegrain.data.feature_cache.check_cacheable`` says what is missing, in one line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from finegrain.data.config import DataConfig
from finegrain.data.feature_cache import build_cached_loader
from finegrain.data.loader import TrainLoader, build_train_loader


def method_loader(
    method: Any,
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] | None = None,
) -> TrainLoader:
    """Endless, resumable, rank-sharded training batches of ``cfg`` for ``method``: the
    method's train collate and transform over ``build_train_loader``, or, with
    ``data.feature_cache`` set, the loader over the cached frozen bottoms (built on rank 0 on
    ``device`` when missing or stale; other ranks wait on ``barrier``)."""
    if cfg.feature_cache:
        return build_cached_loader(cfg, method, rank=rank, world_size=world_size, seed=seed,
                                   device=device, barrier=barrier)  # fmt: skip
    return build_train_loader(
        cfg,
        method.make_collate(train=True),
        rank=rank,
        world_size=world_size,
        seed=seed,
        transform=method.make_transform(cfg, train=True),
    )

"""Data: sample schema, sources (synthetic scenes, JSONL/CSV manifests, webdataset shards),
box-aware transforms and the resumable training loader.

Heavy modules (torch, PIL, numpy) load on first use of a name, so ``import finegrain.data``
stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "finegrain.data.config",
    "SyntheticConfig": "finegrain.data.config",
    "BrokenSample": "finegrain.data.schema",
    "mix_seed": "finegrain.data.schema",
    "sample_rng": "finegrain.data.schema",
    "parse_record": "finegrain.data.schema",
    "validate_box": "finegrain.data.schema",
    "BoxTransform": "finegrain.data.transforms",
    "train_transform": "finegrain.data.transforms",
    "eval_transform": "finegrain.data.transforms",
    "MultiViewTransform": "finegrain.data.transforms",
    "ViewAugment": "finegrain.data.transforms",
    "multi_view_transform": "finegrain.data.transforms",
    "stack_views": "finegrain.data.collate",
    "ManifestSource": "finegrain.data.sources",
    "make_sample": "finegrain.data.sources",
    "iter_tar": "finegrain.data.sources",
    "parse_shard_spec": "finegrain.data.sources",
    "build_train_loader": "finegrain.data.loader",
    "TrainLoader": "finegrain.data.loader",
    "TooManyBrokenSamples": "finegrain.data.loader",
    "method_loader": "finegrain.data.for_method",
    "generate_scene": "finegrain.data.synthetic",
    "SyntheticScenes": "finegrain.data.synthetic_sets",
    "eval_split": "finegrain.data.synthetic_sets",
    "write_shards": "finegrain.data.shards",
    "inspect_shards": "finegrain.data.shards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'finegrain.data' has no attribute '{name}'")

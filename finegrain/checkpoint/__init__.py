"""Reading finegrain checkpoints, below ``train`` so that evaluation, interop, the API and the
exports load models without importing the trainer.

- ``files``: the run directory layout; finding, verifying and reading checkpoints;
- ``integrity``: safetensors structure checks and ``weights_only`` loading (a leaf);
- ``load``: ``load_run``, the one implementation of loading a finegrain run's model.

Writing (atomic saves, pruning) and resuming live in ``finegrain.train.checkpoint``.
"""

from __future__ import annotations

from finegrain.checkpoint.files import (
    CKPT_DIR,
    CONFIG_FILE,
    MODEL_FILE,
    STATE_FILE,
    STEP_PREFIX,
    check_compatible,
    find_config,
    latest_checkpoint,
    latest_valid_checkpoint,
    list_checkpoints,
    load_weights,
    verify_checkpoint,
    weights_path,
)
from finegrain.checkpoint.integrity import CheckpointError, load_trusted, verify_safetensors
from finegrain.checkpoint.load import LoadedRun, load_run

__all__ = [
    "CKPT_DIR",
    "CONFIG_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "STEP_PREFIX",
    "CheckpointError",
    "LoadedRun",
    "check_compatible",
    "find_config",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_run",
    "load_trusted",
    "load_weights",
    "verify_checkpoint",
    "verify_safetensors",
    "weights_path",
]

"""``load_run``: the one implementation of loading a finegrain run's model.

Every caller that needs a trained model goes through it: ``finegrain.interop.load_spec`` (which
``finegrain.load``, ``finegrain eval --checkpoint``, ``finegrain predict``, ``finegrain export``
and the timm backbone export use) calls it for anything that is not another library's weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from finegrain.checkpoint.files import find_config, load_weights, weights_path
from finegrain.checkpoint.integrity import CheckpointError, verify_safetensors
from finegrain.config import load_yaml
from finegrain.encoders.weights import load_into
from finegrain.methods.base import build_method
from finegrain.run_config import RunConfig


class LoadedRun(NamedTuple):
    """What a load resolved to: the method (eval mode, on the device), its ``RunConfig`` and the
    ``model.safetensors`` actually read (a run dir resolves to its newest valid checkpoint;
    ``None`` for other libraries' weights, see ``finegrain.interop``)."""

    method: Any
    cfg: RunConfig
    weights: Path | None


def load_run(
    path_or_file: str | Path, *, strict: bool = True, device: str = "cpu", other_formats: str = ""
) -> LoadedRun:
    """A finegrain run dir, checkpoint dir or ``model.safetensors`` file -> ``LoadedRun``.

    The config is the nearest ``config.yaml`` at or above the weights; the weights are verified
    before anything is built (``CheckpointError`` naming the file) and must fit the method
    (``strict``; ``strict=False`` loads what fits and warns with what it skipped).
    ``other_formats`` is added to the errors for files that are not finegrain runs (e.g. the
    spec prefixes that load other libraries' weights)."""
    note = f"; {other_formats}" if other_formats else ""
    try:  # newest *valid* checkpoint of a run dir; other file kinds refused
        path = weights_path(path_or_file)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{note}") from None
    verify_safetensors(path)  # a truncated file is named before anything is built
    try:
        config_file = find_config(path.parent)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is not part of a finegrain run (no config.yaml above it){note}"
        ) from None
    cfg = load_yaml(RunConfig, config_file)
    method = build_method(cfg.method)
    weights = method.migrate_state_dict(load_weights(path))  # keys renamed since it was written
    load_into(method, weights, str(path), strict=strict)
    return LoadedRun(method.to(device).eval(), cfg, path)

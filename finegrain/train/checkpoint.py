"""Writing checkpoints (atomic, pruned) and finding the one to resume from.

The run directory layout, finding the newest (valid) checkpoint, verifying and reading weights
live below ``train`` in ``finegrain.checkpoint`` (evaluation, interop and the API read runs
without importing the trainer); loading a model for use is ``finegrain.checkpoint.load_run``.

A checkpoint is written into a temporary sibling directory, every file fsynced, then moved in
place with ``os.replace``; ``latest`` is rewritten the same way afterwards. A crash at any
moment leaves either the previous or the new checkpoint complete, never a half-written one.
``--resume latest`` takes the newest checkpoint that verifies and says which newer ones it
skipped and why. Every failure is a ``CheckpointError`` (a ``ValueError``: one line naming the
file, exit code 2 on the CLI).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from finegrain.checkpoint.files import (
    MODEL_FILE,
    STATE_FILE,
    STEP_PREFIX,
    latest_valid_checkpoint,
    list_checkpoints,
    load_weights,
    verify_checkpoint,
)
from finegrain.checkpoint.integrity import CheckpointError, load_trusted
from finegrain.config import to_dict
from finegrain.run_config import RunConfig


# ---- RNG -----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/primitives (safe for weights_only)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- writing -------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync directories
        pass


def model_state(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of the method's state dict (shared tensors cloned)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in method.state_dict().items():
        if hasattr(v, "full_tensor"):  # FSDP2 DTensor
            v = v.full_tensor()
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``ckpt_root/step_XXXXXXX`` atomically, point ``latest`` at it, prune old ones."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:07d}"
    tmp = root / f".tmp_{final.name}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / MODEL_FILE), metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        for f in (MODEL_FILE, STATE_FILE):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
    except BaseException:  # disk full, quota, read-only: leave no half-written directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_atomic_text(root / "latest", final.name + "\n")
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` step dirs (0 or less keeps all); drop stale temp dirs."""
    for stale in root.glob(".tmp_*"):
        if stale.is_dir() and not stale.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    steps = list_checkpoints(root)
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---- resuming ------------------------------------------------------------------------
def find_resume(resume: str, run_dir: str | Path) -> tuple[Path, list[str]]:
    """(checkpoint dir, notes) for ``--resume``: ``latest`` (or a run dir) -> its newest
    *valid* checkpoint, the notes naming newer ones skipped; a checkpoint dir is verified."""
    path = Path(run_dir) if resume == "latest" else Path(resume).expanduser()
    if resume != "latest" and (path / MODEL_FILE).is_file():
        verify_checkpoint(path)
        return path, []
    found, notes = latest_valid_checkpoint(path)
    if found is None:
        if notes:
            raise CheckpointError(
                f"--resume {resume}: no valid checkpoint under {path / 'ckpt'} ({notes[0]})"
            )
        what = "no checkpoint under" if resume == "latest" else "not a checkpoint or run dir:"
        raise FileNotFoundError(
            f"--resume {resume}: {what} {path / 'ckpt' if resume == 'latest' else path}"
        )
    return found, notes


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """``find_resume`` printing its notes on stderr (kept for callers without a logger)."""
    found, notes = find_resume(resume, run_dir)
    for note in notes:
        print(f"finegrain: {note}", file=sys.stderr)
    return found


def load_state(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, trainer state) of a checkpoint directory, verified (``CheckpointError``)."""
    ckpt_dir = Path(ckpt_dir)
    weights = load_weights(ckpt_dir / MODEL_FILE)
    state = load_trusted(ckpt_dir / STATE_FILE)
    return weights, state


def check_same_method(saved_cfg: RunConfig, cfg: RunConfig, where: str) -> None:
    """Refuse resuming a run whose method config differs (names the first differing key)."""
    a, b = to_dict(saved_cfg.method), to_dict(cfg.method)
    if a != b:
        diff = _first_diff(a, b, "method")
        raise ValueError(f"incompatible checkpoint {where}: {diff} differs from the current config")


def _first_diff(a: Any, b: Any, where: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{where}.{k}")
    return f"{where} ({a!r} vs {b!r})"


__all__ = [
    "check_same_method",
    "find_resume",
    "load_state",
    "model_state",
    "prune",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomic_text",
]

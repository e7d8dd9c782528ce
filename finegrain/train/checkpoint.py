"""Checkpoints: atomic, resumable, loadable for evaluation.

Layout of a run directory::

    <run>/config.yaml                 resolved RunConfig
    <run>/ckpt/step_0000050/model.safetensors
    <run>/ckpt/step_0000050/state.pt  optimizer, scaler, RNG, data position, step (weights_only)
    <run>/ckpt/latest                 text file naming the newest complete step directory

A checkpoint is written into a temporary sibling directory, every file fsynced, then moved in
place with ``os.replace``; ``latest`` is rewritten the same way afterwards. A crash at any
moment leaves either the previous or the new checkpoint complete, never a half-written one.

Reading verifies before trusting (``verify_checkpoint``): the safetensors header parses and its
tensors end exactly at the end of the file (a truncated or padded file is refused), and
``state.pt`` is a complete zip archive that loads with ``weights_only=True`` (a pickle that
would build arbitrary objects is refused, never executed). ``--resume latest`` takes the newest
checkpoint that verifies and says which newer ones it skipped and why. Every failure is a
``CheckpointError`` (a ``ValueError``: one line naming the file, exit code 2 on the CLI).
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finegrain.config import ConfigError, load_yaml, to_dict
from finegrain.methods.base import Method, build_method
from finegrain.run_config import RunConfig
from finegrain.train.integrity import CheckpointError, load_trusted, verify_safetensors
from finegrain.train.run_dirs import CONFIG_FILE, MODEL_FILE, resolve_run

STEP_PREFIX = "step_"
STATE_FILE = "state.pt"


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


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [
        d
        for d in root.iterdir()
        if d.is_dir()
        and d.name.startswith(STEP_PREFIX)
        and (d / MODEL_FILE).is_file()
        and (d / STATE_FILE).is_file()
    ]
    return sorted(dirs, key=lambda d: d.name)


# ---- verifying -----------------------------------------------------------------------
def verify_checkpoint(ckpt_dir: str | Path, *, state: bool = True) -> None:
    """Raise ``CheckpointError`` unless ``ckpt_dir`` holds a sound ``model.safetensors`` (and,
    with ``state``, a ``state.pt`` that loads weights-only)."""
    ckpt_dir = Path(ckpt_dir)
    verify_safetensors(ckpt_dir / MODEL_FILE)
    if state:
        st = load_trusted(ckpt_dir / STATE_FILE)
        if not isinstance(st, dict) or "step" not in st:
            raise CheckpointError(f"corrupt checkpoint {ckpt_dir / STATE_FILE}: no trainer state")


def latest_valid_checkpoint(
    run_dir: str | Path, *, state: bool = True
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run that verifies, and one note per newer one skipped."""
    notes: list[str] = []
    for cand in reversed(list_checkpoints(Path(run_dir) / "ckpt")):
        try:
            verify_checkpoint(cand, state=state)
        except CheckpointError as e:
            notes.append(f"skipping {cand.name}: {e}")
            continue
        if notes:
            notes.append(f"falling back to {cand.name}, the newest valid checkpoint")
        return cand, notes
    return None, notes


# ---- reading -------------------------------------------------------------------------
def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``latest`` pointer, else the highest step)."""
    root = Path(run_dir) / "ckpt"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / MODEL_FILE).is_file() and (cand / STATE_FILE).is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


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


def load_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file after ``verify_safetensors`` (one-line errors)."""
    verify_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {e}") from None


def check_compatible(method: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """One-line ``ValueError`` when ``weights`` do not fit ``method`` (names or shapes)."""
    own = method.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(
            f"incompatible checkpoint {where}: {len(missing)} missing keys (e.g. "
            f"{missing[:2]}), {len(extra)} unexpected keys (e.g. {extra[:2]}); "
            "was it trained with a different method or tower config?"
        )
    for k, v in own.items():
        if tuple(v.shape) != tuple(weights[k].shape):
            raise ValueError(
                f"incompatible checkpoint {where}: '{k}' has shape {tuple(weights[k].shape)}, "
                f"the model expects {tuple(v.shape)}; was it trained with a different config?"
            )


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


def find_config(path: Path) -> Path:
    for cand in (path, *path.parents[:3]):
        if (cand / CONFIG_FILE).is_file():
            return cand / CONFIG_FILE
    raise FileNotFoundError(f"no {CONFIG_FILE} found next to or above {path}")


def weights_path(run_or_file: str | Path) -> Path:
    """The ``model.safetensors`` of a run dir (newest valid checkpoint, notes on stderr), of the
    one run under a folder of runs (``run_dirs.resolve_run``: a demo output folder), a
    checkpoint dir or the file itself; ``CheckpointError`` for other file kinds."""
    path = resolve_run(run_or_file)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"{path}: expected a .safetensors weights file, a checkpoint dir or a run dir, "
                f"not a '{path.suffix or path.name}' file (pickles are never loaded for eval)"
            )
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    ckpt, notes = latest_valid_checkpoint(path, state=False)
    for note in notes:
        print(f"finegrain: {note}", file=sys.stderr)
    if ckpt is None:
        if notes:
            raise CheckpointError(f"no valid checkpoint under {path / 'ckpt'} ({notes[0]})")
        raise FileNotFoundError(f"no checkpoint under {path / 'ckpt'}")
    return ckpt / MODEL_FILE


def load_method(run_or_file: str, map_location: str = "cpu") -> tuple[Method, RunConfig]:
    """Build the trained method of a run dir, checkpoint dir, or ``.safetensors`` file.

    The config is read from the nearest ``config.yaml`` at or above the path. Returns
    ``(method in eval mode, RunConfig)``.
    """
    weights_file = weights_path(run_or_file)
    verify_safetensors(weights_file)  # a truncated file is named before anything is built
    cfg = load_yaml(RunConfig, find_config(weights_file.parent))
    method = build_method(cfg.method)
    weights = load_weights(weights_file, device=map_location)
    check_compatible(method, weights, str(weights_file))
    method.load_state_dict(weights)
    if map_location != "cpu":
        method.to(map_location)
    return method.eval(), cfg


__all__ = [
    "CheckpointError",
    "ConfigError",
    "check_compatible",
    "check_same_method",
    "latest_checkpoint",
    "list_checkpoints",
    "load_method",
    "latest_valid_checkpoint",
    "load_state",
    "load_trusted",
    "load_weights",
    "model_state",
    "find_resume",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
    "verify_safetensors",
    "weights_path",
]

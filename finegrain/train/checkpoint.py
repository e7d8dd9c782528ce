"""Checkpoints: atomic, resumable, loadable for evaluation.

Layout of a run directory::

    <run>/config.yaml                 resolved RunConfig
    <run>/ckpt/step_0000050/model.safetensors
    <run>/ckpt/step_0000050/state.pt  optimizer, scaler, RNG, data position, step (weights_only)
    <run>/ckpt/latest                 text file naming the newest complete step directory

A checkpoint is written into a temporary sibling directory, every file fsynced, then moved in
place with ``os.replace``; ``latest`` is rewritten the same way afterwards. A crash at any
moment leaves either the previous or the new checkpoint complete, never a half-written one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from finegrain.config import ConfigError, load_yaml, to_dict
from finegrain.methods.base import Method, build_method
from finegrain.run_config import RunConfig

STEP_PREFIX = "step_"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


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
    save_file(weights, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    for f in (MODEL_FILE, STATE_FILE):
        _fsync_file(tmp / f)
    _fsync_dir(tmp)
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


def resolve_resume(resume: str, run_dir: str | Path) -> Path:
    """``latest`` -> newest checkpoint of ``run_dir``; otherwise a checkpoint or run dir path."""
    if resume == "latest":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(
                f"--resume latest: no checkpoint under {Path(run_dir) / 'ckpt'}"
            )
        return found
    path = Path(resume).expanduser()
    if (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint or run directory")
    return found


def load_state(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, trainer state) of a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    weights = load_file(str(ckpt_dir / MODEL_FILE))
    state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=True)
    return weights, state


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


def load_method(run_or_file: str, map_location: str = "cpu") -> tuple[Method, RunConfig]:
    """Build the trained method of a run dir, checkpoint dir, or ``.safetensors`` file.

    The config is read from the nearest ``config.yaml`` at or above the path. Returns
    ``(method in eval mode, RunConfig)``.
    """
    path = Path(run_or_file).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        weights_file, start = path, path.parent
    else:
        ckpt = path if (path / MODEL_FILE).is_file() else latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint under {path / 'ckpt'}")
        weights_file, start = ckpt / MODEL_FILE, ckpt
    cfg = load_yaml(RunConfig, find_config(start))
    method = build_method(cfg.method)
    weights = load_file(str(weights_file), device=map_location)
    check_compatible(method, weights, str(weights_file))
    method.load_state_dict(weights)
    if map_location != "cpu":
        method.to(map_location)
    return method.eval(), cfg


__all__ = [
    "ConfigError",
    "check_compatible",
    "check_same_method",
    "latest_checkpoint",
    "list_checkpoints",
    "load_method",
    "load_state",
    "model_state",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

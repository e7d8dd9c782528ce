"""Where a run's checkpoints are and whether they can be trusted: the run directory layout,
finding (newest, newest *valid*), verifying and reading weights.

Layout of a run directory (written by ``finegrain.train.checkpoint``)::

    <run>/config.yaml                 resolved RunConfig
    <run>/ckpt/step_0000050/model.safetensors
    <run>/ckpt/step_0000050/state.pt  optimizer, scaler, RNG, data position, step (weights_only)
    <run>/ckpt/latest                 text file naming the newest complete step directory

Reading verifies before trusting (``verify_checkpoint``): the safetensors header parses and its
tensors end exactly at the end of the file, and ``state.pt`` loads with ``weights_only=True``.
Every failure is a ``CheckpointError`` (a ``ValueError``: one line naming the file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from finegrain.checkpoint.integrity import CheckpointError, load_trusted, verify_safetensors
from finegrain.checkpoint.run_dirs import CKPT_DIR, CONFIG_FILE, MODEL_FILE, resolve_run

STEP_PREFIX = "step_"
STATE_FILE = "state.pt"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete step directories under ``root`` (a run's ``ckpt/``), oldest first."""
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
    for cand in reversed(list_checkpoints(Path(run_dir) / CKPT_DIR)):
        try:
            verify_checkpoint(cand, state=state)
        except CheckpointError as e:
            notes.append(f"skipping {cand.name}: {e}")
            continue
        if notes:
            notes.append(f"falling back to {cand.name}, the newest valid checkpoint")
        return cand, notes
    return None, notes


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (``latest`` pointer, else the highest step)."""
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / MODEL_FILE).is_file() and (cand / STATE_FILE).is_file():
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


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


def find_config(path: Path) -> Path:
    """The ``config.yaml`` at or up to three folders above ``path`` (a run's, for a checkpoint
    dir or weights file inside it)."""
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
            raise CheckpointError(f"no valid checkpoint under {path / CKPT_DIR} ({notes[0]})")
        raise FileNotFoundError(f"no checkpoint under {path / CKPT_DIR}")
    return ckpt / MODEL_FILE

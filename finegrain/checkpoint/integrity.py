"""File-level integrity checks for checkpoints (a leaf: torch and the standard library only).

``verify_safetensors`` is cheap: it reads the header and checks that the tensors end exactly at
the end of the file, which catches truncated and padded writes without reading any tensor.
``load_trusted`` is ``torch.load(weights_only=True)`` with one-line errors; a pickle that would
construct arbitrary objects (``__reduce__`` payloads) is refused before anything executes.
"""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from finegrain.errors import one_line


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or refused (one line, names it)."""


MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is corruption, not a model


def verify_safetensors(path: str | Path) -> None:
    """Cheap structural check of a ``.safetensors`` file (header + sizes, no tensor reads):
    ``CheckpointError`` naming the file when it is truncated, padded or not safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (-1,)
            if not 0 < n <= min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: not a safetensors file ({e})") from None
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        what = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(
            f"corrupt checkpoint {path}: {what} ({size} bytes, the header promises {expected})"
        )


def load_trusted(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors: a pickle that would construct
    anything but tensors and plain containers is refused (never executed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        with warnings.catch_warnings():  # protocol notes are noise next to a one-line error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        if "weights only" in first.lower() or "unsupported" in str(e).lower():
            raise CheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain "
                "containers (weights_only=True; finegrain never executes pickled code)"
            ) from None
        raise CheckpointError(f"corrupt checkpoint {path}: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = _first_sentence(e)
        raise CheckpointError(f"corrupt checkpoint {path}: {first}") from None


def _first_sentence(e: BaseException) -> str:
    text = one_line(e)
    return text.split(". ")[0][:200]

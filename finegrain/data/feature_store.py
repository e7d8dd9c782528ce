"""Memory-mapped feature stores on disk: one ``.npy`` array of rows + a CRC32 per row + meta.

The locked-tower feature cache (``finegrain.data.feature_cache``) keeps the frozen bottoms'
outputs here. A store is a folder ``<root>/<kind>-<key>/`` holding

- ``data.npy``: (N, *row_shape) float32 (or any dtype), opened with ``np.load(mmap_mode="r")``;
- ``crc.npy``: (N,) uint32, ``zlib.crc32`` of each row's bytes, checked on every read;
- ``meta.json``: the format version, the key (a hash of everything the rows depend on), the
  shape and dtype, and the caller's extra fields; written last.

Writes go to a temporary sibling folder renamed into place when complete, so a killed build
leaves no half-written store under the final name. ``open_store`` returns None with a reason for
anything that does not match (missing, other key, wrong shape or size, unreadable): the caller
rebuilds. A row whose bytes no longer match its CRC (a file changed after it was written) raises
``FeatureStoreError`` naming the file and row, never returns wrong features.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1


class FeatureStoreError(ValueError):
    """A feature store file is corrupt (checksum mismatch); the message says how to rebuild."""


def row_crcs(rows: np.ndarray) -> np.ndarray:
    """(n,) uint32: ``zlib.crc32`` of each row's bytes (C order)."""
    rows = np.ascontiguousarray(rows)
    return np.array([zlib.crc32(r.tobytes()) for r in rows], dtype=np.uint32)


class StoreWriter:
    """Fill a new store row range by row range, then ``commit`` (atomic rename into place)."""

    def __init__(self, path: Path, num_rows: int, row_shape: tuple[int, ...],
                 dtype: Any = np.float32) -> None:  # fmt: skip
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        shape = (num_rows, *row_shape)
        self.data = np.lib.format.open_memmap(self.tmp / "data.npy", "w+", np.dtype(dtype), shape)
        self.crc = np.zeros(num_rows, dtype=np.uint32)

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.data.dtype)
        self.data[start : start + len(rows)] = rows
        self.crc[start : start + len(rows)] = row_crcs(rows)

    def commit(self, key: str, extra: dict[str, Any]) -> FeatureStore:
        self.data.flush()
        del self.data  # close the memmap before the rename
        np.save(self.tmp / "crc.npy", self.crc)
        meta = {"format": FORMAT, "key": key, "rows": int(len(self.crc)), **extra}
        arr = np.load(self.tmp / "data.npy", mmap_mode="r")
        meta.update(shape=list(arr.shape), dtype=str(arr.dtype))
        del arr
        (self.tmp / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(self.path, ignore_errors=True)  # an invalid old store of the same name
        os.replace(self.tmp, self.path)
        return FeatureStore(self.path, meta)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def open_store(path: Path, key: str) -> tuple[FeatureStore | None, str]:
    """``(store, "")`` when ``path`` holds a complete store for ``key``, else ``(None, reason)``."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return None, "not built yet"
    except (OSError, ValueError) as e:
        return None, f"unreadable meta.json ({e})"
    if meta.get("format") != FORMAT or meta.get("key") != key:
        return None, "built for other weights, transform or data"
    try:
        data = np.load(path / "data.npy", mmap_mode="r")
        crc = np.load(path / "crc.npy")
    except (OSError, ValueError) as e:  # missing, truncated (mmap longer than the file), bad header
        return None, f"unreadable data ({e})"
    if list(data.shape) != meta.get("shape") or str(data.dtype) != meta.get("dtype"):
        return None, f"data.npy is {tuple(data.shape)} {data.dtype}, meta says {meta.get('shape')}"
    if crc.shape != (data.shape[0],):
        return None, f"crc.npy has {crc.shape} entries for {data.shape[0]} rows"
    return FeatureStore(path, meta), ""


class FeatureStore:
    """Read-only rows of a committed store; picklable (the memmap reopens in each process)."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = Path(path), meta
        self._data: np.ndarray | None = None
        self._crc: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "meta": self.meta, "_data": None, "_crc": None}

    def __len__(self) -> int:
        return int(self.meta["rows"])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"][1:])

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None or self._crc is None:
            self._data = np.load(self.path / "data.npy", mmap_mode="r")
            self._crc = np.load(self.path / "crc.npy")
        return self._data, self._crc

    def rows(self, index: np.ndarray | list[int]) -> np.ndarray:
        """(n, *row_shape) copy of the rows ``index``, each checked against its CRC32."""
        data, crc = self._open()
        index = np.asarray(index, dtype=np.int64)
        out = np.asarray(data[index])
        bad = np.nonzero(row_crcs(out) != crc[index])[0]
        if len(bad):
            raise FeatureStoreError(
                f"feature cache {self.path / 'data.npy'}: row {int(index[bad[0]])} fails its "
                f"checksum (file corrupt or changed after it was written); delete {self.path} "
                "to rebuild it"
            )
        return out

"""Reading webdataset tar shards without ever crashing a run on a bad shard.

``iter_tar`` streams a shard (local file, ``pipe:`` command or URL) as samples grouped by key.
Shards that are missing, unreadable or cut short yield *marker* samples (``__broken__`` names the
reason) that the loader counts like any other broken sample, so a run never loses count of what
it skipped. Truncation is detected three ways: a read error, a member shorter than its header
says, and (local files) missing end-of-archive blocks after the last member.
"""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _open_stream(path: str) -> Any:
    if path.startswith("pipe:") or "://" in path:
        from webdataset import gopen

        return gopen(path, "rb")
    return open(Path(path).expanduser(), "rb")  # noqa: SIM115 (closed by the caller)


def _marker(path: str, key: str, reason: str, detail: str) -> dict[str, Any]:
    """A stand-in sample for what could not be read: counted as broken by ``reason``."""
    return {"__key__": key, "__shard__": path, "__broken__": reason, "__detail__": detail}


def _tar_end_missing(path: str, end: int) -> bool:
    """A local tar whose last member ends at ``end`` lacks its two zero end-of-archive blocks
    (the file was cut at a member boundary: the last sample may have lost members)."""
    if path.startswith("pipe:") or "://" in path:
        return False
    p = Path(path).expanduser()
    size = p.stat().st_size
    if size < end + 1024:
        return True
    with p.open("rb") as f:
        f.seek(end)
        return f.read(1024) != bytes(1024)


def expand_glob(path: str) -> list[str]:
    """Local paths with glob characters (``*``, ``?``, ``[``) expand sorted; others stay."""
    if "://" in path or path.startswith("pipe:") or not any(c in path for c in "*?["):
        return [path]
    found = sorted(glob.glob(str(Path(path).expanduser())))
    return found or [path]  # no match: reported as not found


def iter_tar(path: str) -> Iterator[dict[str, Any]]:
    """Samples of one tar shard: ``{"__key__", "__shard__", ext: bytes}`` grouped by key.

    Never raises on bad shards: a missing or unreadable shard yields one marker sample
    (``__broken__`` = ``missing_shard`` / ``bad_shard``) and a truncated one yields its complete
    samples and then a ``truncated`` marker for the cut sample, so each is skipped and counted."""
    try:
        stream = _open_stream(path)
    except FileNotFoundError:
        yield _marker(path, f"{path}#missing", "missing_shard", f"shard not found: {path}")
        return
    except OSError as e:
        yield _marker(path, f"{path}#unreadable", "bad_shard", f"cannot open {path}: {e}")
        return
    current: dict[str, Any] | None = None
    cut, end, members = "", 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                end = member.offset_data + -(-member.size // 512) * 512
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("."):
                    continue
                prefix = member.name[: len(member.name) - len(base)]
                stem, ext = base.split(".", 1)
                key = prefix + stem
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key, "__shard__": path}
                f = tar.extractfile(member)
                data = f.read() if f else b""
                members += 1
                if len(data) != member.size:
                    cut = f"member {member.name} has {len(data)} of {member.size} bytes"
                    break
                current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        cut = f"unreadable after {members} members ({e})"
        if members == 0 and current is None:
            stream.close()
            yield _marker(path, f"{path}#unreadable", "bad_shard", f"not a tar file: {path}: {e}")
            return
    finally:
        stream.close()
    if not cut and members and _tar_end_missing(path, end):
        cut = "the end-of-archive blocks are missing"
    if cut:
        key = current["__key__"] if current is not None else f"{path}#end"
        yield _marker(path, key, "truncated", f"truncated shard {path}: {cut}")
    elif current is not None:
        yield current

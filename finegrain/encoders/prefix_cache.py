"""Shared cache of a locked text tower's frozen prefix, keyed by the token ids of each caption.

The text counterpart of the hybrid image tower's shared bottom cache (``finegrain.encoders.
hybrid``): when a text tower's bottom is frozen and locked (``trainable_blocks >= 0``,
``lock_frozen=True``: eval mode, no dropout), its output for a caption is a fixed function of
the caption's token ids. Inside ``with shared_text_cache():`` every such tower keeps the
prefix's output of each caption it sees, keyed by the prefix's weights and the ids, and reuses
it whenever the same caption comes again, for any model built from the same weights (the
Flickr8k suite, ``finegrain.bench.flickr``, trains five methods on the same 30,000 captions and
evaluates them on the same 5,000: the frozen prefix runs once per caption for all of them).

A row is stored up to its last real token: padded positions are masked out of every later
attention and of the pooling, so the real tokens' outputs do not depend on the values there
(they are zero-filled when a row is read back). Values are those of the caption's first
computation (a row of a BERT-like encoder does not depend on the other rows of its batch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class PrefixCache:
    """Prefix rows by (prefix identity, ids bytes); stops storing past ``max_bytes``."""

    max_bytes: int = 2 << 30
    rows: dict[tuple[str, bytes], torch.Tensor] = field(default_factory=dict)
    bytes: int = 0
    hits: int = 0
    misses: int = 0

    def stats(self) -> dict[str, float]:
        return {"captions": len(self.rows), "mib": self.bytes / 2**20, "hits": self.hits,
                "misses": self.misses}  # fmt: skip


_ACTIVE: list[PrefixCache] = []


@contextmanager
def shared_text_cache(max_gib: float = 2.0) -> Iterator[PrefixCache]:
    """Share the frozen text prefixes' outputs of every locked text tower run inside."""
    cache = PrefixCache(int(max_gib * 2**30))
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)


def active() -> bool:
    return bool(_ACTIVE)


def modules_identity(modules: list[nn.Module]) -> str:
    """A hash of the modules' parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            h.update(f"{i}.{name}{tuple(t.shape)}".encode())
            h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_prefix(
    identity: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    compute: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``compute(ids)`` (B, L, D) through the active cache: rows seen before are read back,
    the others computed in one call and stored up to their last real token (``mask``)."""
    cache = _ACTIVE[-1]
    ids_cpu = ids.detach().to("cpu")
    keys = [(identity, row.numpy().tobytes() + repr(tuple(row.shape)).encode()) for row in ids_cpu]
    miss = [i for i, k in enumerate(keys) if k not in cache.rows]
    missed = set(miss)
    fresh = None
    if miss:  # computed up to the longest real caption among them (the rest is padding)
        width = int(mask[miss].nonzero()[:, 1].max()) + 1 if bool(mask[miss].any()) else 1
        fresh = compute(ids[miss][:, :width])
    out: torch.Tensor | None = None
    for j, i in enumerate(miss):
        if out is None:
            out = fresh.new_zeros(len(keys), ids.shape[1], *fresh.shape[2:])
        out[i, : fresh.shape[1]] = fresh[j]
        if cache.bytes < cache.max_bytes:
            n = min(int(mask[i].nonzero().max()) + 1 if bool(mask[i].any()) else 1, width)
            cache.rows[keys[i]] = fresh[j, :n].detach().to("cpu").clone()
            cache.bytes += cache.rows[keys[i]].numel() * cache.rows[keys[i]].element_size()
    for i, k in enumerate(keys):
        if i in missed:
            continue
        row = cache.rows[k]
        if out is None:
            out = row.new_zeros(len(keys), ids.shape[1], *row.shape[1:]).to(ids.device)
        out[i, : row.shape[0]] = row.to(out.device, out.dtype)
    cache.hits, cache.misses = cache.hits + len(keys) - len(miss), cache.misses + len(miss)
    assert out is not None, "empty batch of captions"
    return out

"""The raw-sample stream of one (rank, dataloader worker) over webdataset shards.

Deterministic in (seed, epoch, rank, world_size, worker, num_workers): shard order, source
mixing and the shuffle buffer all draw from ``random.Random(mix_seed(...))``, and nothing here
decodes images, so a resumed run can replay the stream up to a cursor cheaply (bytes are read,
pixels are not decoded) and continue bit-identically.

Splitting: with at least ``world_size * num_workers`` shards in a source, shards are dealt out
(shard ``i`` goes to slot ``i % (world_size * num_workers)``, slot = rank * workers + worker);
with fewer, every slot reads every shard and keeps every ``n``-th sample, so small datasets are
still split disjointly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from finegrain.data.schema import mix_seed
from finegrain.data.tars import iter_tar


@dataclass(frozen=True)
class Slot:
    """Where a stream sits: this rank's worker among all ranks and workers."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def _one_source(shards: list[str], slot: Slot, seed: int, epoch: int, src: int,
                resampled: bool, repeat: bool) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Samples of one source for this slot (infinite when resampled or repeat)."""
    if resampled:  # shards drawn with replacement, per slot
        rng = random.Random(mix_seed(seed, "resample", src, slot.index, slot.count, epoch))
        while True:
            yield from iter_tar(rng.choice(shards))
    by_shard = len(shards) >= slot.count
    npass = 0
    while True:
        order = list(shards)
        random.Random(mix_seed(seed, "shards", src, epoch, npass)).shuffle(order)
        mine = order[slot.index :: slot.count] if by_shard else order
        produced = 0
        for i, s in enumerate(x for shard in mine for x in iter_tar(shard)):
            if by_shard or i % slot.count == slot.index:
                produced += 1
                yield s
        npass += 1
        if not repeat:
            return
        if produced == 0:
            raise ValueError(f"worker slot {slot.index} got no samples from shards {shards[:3]}...")


def mixed_stream(sources: list[tuple[list[str], float]], slot: Slot, seed: int, epoch: int,
                 resampled: bool, repeat: bool) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Mix sources by weight; in epoch mode an exhausted source drops out (the epoch ends when
    all are exhausted), so every sample of a pass is seen once."""
    its = [
        _one_source(sh, slot, seed, epoch, i, resampled, repeat)
        for i, (sh, _) in enumerate(sources)
    ]
    weights = [w for _, w in sources]
    if len(its) == 1:
        yield from its[0]
        return
    rng = random.Random(mix_seed(seed, "mix", slot.index, slot.count, epoch))
    live = list(range(len(its)))
    while live:
        i = rng.choices(live, weights=[weights[j] for j in live])[0]
        try:
            yield next(its[i])
        except StopIteration:
            live.remove(i)


def shuffled(stream: Iterator[Any], buffer: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle (as ``webdataset.shuffle``): fill ``buffer`` items, then emit a random
    one per incoming item; drain in random order at the end."""
    if buffer <= 1:
        yield from stream
        return
    buf: list[Any] = []
    for item in stream:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.randrange(len(buf))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def raw_stream(sources: list[tuple[list[str], float]], slot: Slot, *, seed: int, epoch: int,
               resampled: bool, repeat: bool, shuffle_buffer: int) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The undecoded samples this slot emits in ``epoch``, in order."""
    rng = random.Random(mix_seed(seed, "shuffle", slot.index, slot.count, epoch))
    return shuffled(
        mixed_stream(sources, slot, seed, epoch, resampled, repeat), shuffle_buffer, rng
    )

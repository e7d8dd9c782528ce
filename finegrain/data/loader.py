"""``build_train_loader``: endless, resumable, rank-sharded batches with broken-sample counting.

Determinism. Every sample gets ``seed = mix_seed(run seed, epoch, position, attempt)`` and all
augmentation randomness (and, by contract, the collate's caption sampling) derives from it, one
stream per stage (``finegrain.data.schema.sample_rng``). The per-sample transform is the
method's (``Method.make_transform``; default ``train_transform(cfg)``).

Map-style sources (synthetic scenes, JSONL/CSV manifests). Epoch ``e`` visits
``randperm(n, seed=(seed, e))``; rank ``r`` takes positions ``r, r + W, r + 2W, ...`` (W ranks,
drop_last so all ranks get ``n // W`` positions and the same ``epoch_length``). One endless
DataLoader indexes *global batch numbers* ``epoch * epoch_length + b`` (workers live for the
whole run), so batch ``b`` is the same whatever ``num_workers`` is, and resuming at batch ``b``
starts there without touching earlier samples. A broken sample is replaced by a
deterministic substitute drawn from (seed, epoch, position, attempt): batches always hold
``batch_size`` samples. Resume is bit-exact with any number of workers.

Webdataset. Each (rank, worker) slot reads its own raw stream (``finegrain.data.stream``) and
cuts ``batch_size`` good samples per batch; the DataLoader interleaves workers round-robin. Each
batch reports its worker and raw-stream cursor; ``state_dict`` keeps them, and a resumed run
replays each worker's stream up to its cursor *without decoding* and rotates worker roles so
the round-robin continues where it stopped; each worker ends with a marker item, so workers
that ran out before the checkpoint stay out after it. Bit-exact for the same ``num_workers``
and world size, in epoch and resampled mode (tested); the replay costs re-reading the
consumed shard bytes. ``epoch_samples`` fixes the number of batches per worker (streams repeat
when short), as ``with_epoch`` does in OpenCLIP; without it the epoch ends when the shards do
and ``epoch_length`` is None.

Counting. Workers cannot share counters, so every batch carries ``batch["_data_stats"]``
(samples used/broken in that batch, by reason); the loader pops it in the main process and sums
it: ``stats() -> {"seen", "broken", "broken_by_reason"}`` ("seen" = good samples delivered).
More than ``max_broken_fraction`` broken (after ``min_broken_check`` samples) stops the run with
``TooManyBrokenSamples``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from finegrain.data.config import DataConfig
from finegrain.data.schema import BrokenSample, mix_seed
from finegrain.data.sources import (
    IMAGE_EXTS,
    KEY_CHECK_SAMPLES,
    ManifestSource,
    load_sidecar,
    make_sample,
    parse_shard_spec,
    wds_key_check,
    wds_raw,
)
from finegrain.data.stream import Slot, raw_stream
from finegrain.data.transforms import SampleTransform, train_transform

log = logging.getLogger(__name__)
SOURCES = ("synthetic", "jsonl", "csv", "wds")
MAX_ATTEMPTS = 20  # substitutes tried for one broken slot of a map-style batch


class TooManyBrokenSamples(RuntimeError):
    """More than ``max_broken_fraction`` of the samples were broken."""


def _identity(x: Any) -> Any:
    return x


def _with_stats(collate: Callable, samples: list[dict], broken: Counter) -> dict[str, Any]:
    batch = collate(samples)
    assert isinstance(batch, dict), f"collate must return a dict, got {type(batch)}"
    batch["_data_stats"] = {"seen": len(samples), "broken": dict(broken)}
    return batch


class MapBatches(Dataset):
    """All batches of a map-style source for one rank, indexed by the *global* batch number
    ``g = epoch * num_batches + b``, so one DataLoader (and its workers) serves every epoch."""

    def __init__(self, source: Any, transform: SampleTransform, collate: Callable, *, seed: int,
                 rank: int, world_size: int, batch_size: int, caption_key: str) -> None:  # fmt: skip
        self.source, self.transform, self.collate = source, transform, collate
        self.seed, self.rank, self.world = seed, rank, world_size
        self.batch_size, self.caption_key = batch_size, caption_key
        self.n = len(source)
        self.num_batches = (self.n // world_size) // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def perm(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:  # once per worker process and epoch
            g = torch.Generator().manual_seed(mix_seed(self.seed, "perm", epoch) % 2**63)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def __getitem__(self, g: int) -> dict[str, Any]:
        epoch, b = divmod(g, self.num_batches)
        perm, samples, broken = self.perm(epoch), [], Counter()
        for j in range(b * self.batch_size, (b + 1) * self.batch_size):
            pos = self.rank + self.world * j  # epoch-global position, disjoint across ranks
            for attempt in range(MAX_ATTEMPTS):
                index = int(perm[pos]) if attempt == 0 else random.Random(
                    mix_seed(self.seed, epoch, pos, "substitute", attempt)).randrange(self.n)  # fmt: skip
                seed = mix_seed(self.seed, epoch, pos, attempt)
                try:
                    samples.append(self.load(index, seed))
                    break
                except BrokenSample as e:
                    broken[e.reason] += 1
            else:
                raise TooManyBrokenSamples(
                    f"{MAX_ATTEMPTS} samples in a row were broken ({dict(broken)}); "
                    "check the data with `finegrain data inspect`"
                )
        return _with_stats(self.collate, samples, broken)

    def load(self, index: int, seed: int) -> dict[str, Any]:
        """One schema sample (``BrokenSample`` to substitute); the feature cache overrides it."""
        return make_sample(self.source.raw(index), self.transform, seed, self.caption_key)


class WdsBatches(IterableDataset):
    """Batches of one epoch from webdataset shards; see the module docstring for resume."""

    def __init__(self, cfg: DataConfig, sources: list, sidecar: dict | None, transform,
                 collate: Callable, *, seed: int, epoch: int, rank: int, world_size: int,
                 cursors: dict[int, int], done: dict[int, int], ended: set[int],
                 rotate: int, per_worker: int | None) -> None:  # fmt: skip
        self.cfg, self.sources, self.sidecar = cfg, sources, sidecar
        self.transform, self.collate = transform, collate
        self.seed, self.epoch, self.rank, self.world = seed, epoch, rank, world_size
        self.cursors, self.done, self.rotate, self.per_worker = cursors, done, rotate, per_worker
        self.ended = ended
        self.image_exts = (
            tuple(e.strip() for e in cfg.image_key.split(";") if e.strip()) or IMAGE_EXTS
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        nw, phys = (info.num_workers, info.id) if info else (1, 0)
        worker = (phys + self.rotate) % nw
        if worker in self.ended:  # finished before the checkpoint: contributes nothing
            return
        slot = Slot(self.rank, self.world, worker, nw)
        stream = raw_stream(self.sources, slot, seed=self.seed, epoch=self.epoch,
                            resampled=self.cfg.resampled, repeat=self.per_worker is not None,
                            shuffle_buffer=self.cfg.shuffle_buffer)  # fmt: skip
        cursor, made = 0, self.done.get(worker, 0)
        skip = self.cursors.get(worker, 0)
        if skip == 0:  # fail fast on keys no sample has, before decoding anything
            head = list(itertools.islice(stream, KEY_CHECK_SAMPLES))
            wds_key_check(head, self.cfg.caption_key, self.image_exts, "webdataset shards")
            stream = itertools.chain(head, stream)
        samples, broken = [], Counter()
        for raw in stream:
            if self.per_worker is not None and made >= self.per_worker:
                break
            cursor += 1
            if cursor <= skip:  # replaying a resumed stream: no decoding
                continue
            try:
                r = wds_raw(raw, self.cfg.caption_key, self.image_exts, self.sidecar)
                if not self.cfg.load_masks:
                    r["mask"] = None
                s = make_sample(r, self.transform, mix_seed(self.seed, self.epoch, slot.index, cursor),
                                self.cfg.caption_key)  # fmt: skip
                samples.append(s)
            except BrokenSample as e:
                broken[e.reason] += 1
            if len(samples) == self.cfg.batch_size:
                made += 1
                batch = _with_stats(self.collate, samples, broken)
                batch["_stream"] = {"worker": worker, "cursor": cursor, "made": made}
                samples, broken = [], Counter()
                yield batch
        # End marker: carries the counts of a trailing partial batch and tells the main process
        # this worker is done, so a resume can keep the round-robin order of the survivors.
        yield {"_data_stats": {"seen": 0, "broken": dict(broken)}, "_end": True,
               "_stream": {"worker": worker, "cursor": cursor, "made": made}}  # fmt: skip


class TrainLoader:
    """Endless iterable of batches over epochs; see the module docstring."""

    def __init__(self, cfg: DataConfig, collate: Callable, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, transform: SampleTransform | None = None) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if cfg.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
        self.cfg, self.collate = cfg, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.transform = transform if transform is not None else train_transform(cfg)
        self.epoch, self.batches_in_epoch, self.items_in_epoch = 0, 0, 0
        self.cursors: dict[int, int] = {}
        self.done: dict[int, int] = {}
        self.ended: set[int] = set()  # webdataset workers that finished this epoch
        self.last_worker = -1
        self._stats = {"seen": 0, "broken": 0, "broken_by_reason": Counter()}
        self.source: Any = None
        self.wds_sources: list | None = None
        self.sidecar = load_sidecar(cfg.sidecar) if cfg.sidecar else None
        self._open_source()

    def _open_source(self) -> None:
        cfg = self.cfg
        if cfg.source == "synthetic":
            from finegrain.data.synthetic_sets import SyntheticScenes

            self.source = SyntheticScenes(
                cfg.synthetic, cfg.image_size, self.transform, with_mask=cfg.load_masks
            )
        elif cfg.source in ("jsonl", "csv"):
            if not cfg.train:
                raise ValueError(f"data.train must name the {cfg.source} manifest")
            self.source = ManifestSource(cfg.train, cfg.image_root, cfg.split, cfg.caption_key)
        else:
            self.wds_sources = parse_shard_spec(cfg.train)
            if self.world_size > 1 and not cfg.epoch_samples:
                log.warning(
                    "webdataset over %d ranks without data.epoch_samples: ranks can get "
                    "different numbers of batches per epoch (a distributed step would hang at "
                    "the end); set data.epoch_samples (fixed batches per worker)",
                    self.world_size,
                )
        if self.source is not None and self.epoch_length == 0:
            raise ValueError(
                f"{len(self.source)} samples cannot fill one batch of {cfg.batch_size} on each of "
                f"{self.world_size} ranks; lower data.batch_size"
            )

    @property
    def num_workers(self) -> int:
        return max(0, self.cfg.num_workers)

    @property
    def epoch_length(self) -> int | None:
        """Batches per epoch on this rank (None when unknown: webdataset without epoch_samples)."""
        if self.source is not None:
            return (len(self.source) // self.world_size) // self.cfg.batch_size
        per_worker = self._per_worker()
        return None if per_worker is None else per_worker * max(1, self.num_workers)

    def _per_worker(self) -> int | None:
        if not self.cfg.epoch_samples:
            return None
        slots = self.world_size * max(1, self.num_workers)
        n = self.cfg.epoch_samples // (slots * self.cfg.batch_size)
        if n < 1:
            raise ValueError("data.epoch_samples is too small for one batch per worker and rank")
        return n

    def _iter_map(self) -> Iterator[dict[str, Any]]:
        """Map-style: one endless DataLoader over global batch numbers."""
        ds = self._map_batches()
        start = self.epoch * ds.num_batches + self.batches_in_epoch
        loader = DataLoader(ds, batch_size=None, sampler=itertools.count(start),
                            num_workers=self.num_workers, collate_fn=_identity,
                            generator=self._generator())  # fmt: skip
        for batch in loader:
            self._count(batch.pop("_data_stats"))
            self.batches_in_epoch += 1
            if self.batches_in_epoch == ds.num_batches:
                self._end_epoch()
            yield batch

    def _generator(self) -> torch.Generator:
        """The DataLoader's own generator: without one, creating its iterator draws a base seed
        from the *global* RNG, so a resumed run (iterator created after the RNG state is
        restored) would shift dropout / drop-connect draws against an uninterrupted run."""
        return torch.Generator().manual_seed(mix_seed(self.seed, "dataloader", self.epoch) % 2**63)

    def _map_batches(self) -> MapBatches:
        return MapBatches(self.source, self.transform, self.collate, seed=self.seed,
                          rank=self.rank, world_size=self.world_size,
                          batch_size=self.cfg.batch_size, caption_key=self.cfg.caption_key)  # fmt: skip

    def _wds_epoch(self) -> Iterator[dict[str, Any]]:
        """Webdataset: one DataLoader per epoch (workers restart their streams)."""
        nw = max(1, self.num_workers)
        ds = WdsBatches(self.cfg, self.wds_sources, self.sidecar, self.transform, self.collate,
                        seed=self.seed, epoch=self.epoch, rank=self.rank,
                        world_size=self.world_size, cursors=dict(self.cursors),
                        done=dict(self.done), ended=set(self.ended), per_worker=self._per_worker(),
                        rotate=(self.last_worker + 1) % nw if self.items_in_epoch else 0)  # fmt: skip
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            generator=self._generator())  # fmt: skip
        for batch in loader:
            self.items_in_epoch += 1
            stream = batch.pop("_stream")
            self._count(batch.pop("_data_stats"), f"rank {self.rank} worker {stream['worker']}")
            self.last_worker = stream["worker"]
            self.cursors[stream["worker"]] = stream["cursor"]
            self.done[stream["worker"]] = stream["made"]
            if batch.pop("_end", False):
                self.ended.add(stream["worker"])
                continue
            self.batches_in_epoch += 1
            yield batch

    def _end_epoch(self) -> None:
        log.info("data epoch %d done: %d batches, %s", self.epoch, self.batches_in_epoch,
                 self.stats())  # fmt: skip
        self.epoch += 1
        self.batches_in_epoch = self.items_in_epoch = 0
        self.cursors, self.done, self.ended, self.last_worker = {}, {}, set(), -1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.source is not None:
            yield from self._iter_map()
            return
        while True:
            produced = 0
            for batch in self._wds_epoch():
                produced += 1
                yield batch
            if produced == 0 and self.batches_in_epoch == 0:
                raise RuntimeError(
                    f"webdataset shards yielded no batch in epoch {self.epoch}: {self.stats()}"
                )
            self._end_epoch()

    def _count(self, stats: dict[str, Any], where: str = "") -> None:
        self._stats["seen"] += stats["seen"]
        for reason, n in stats["broken"].items():
            self._stats["broken"] += n
            self._stats["broken_by_reason"][reason] += n
        total = self._stats["seen"] + self._stats["broken"]
        if stats["broken"]:
            log.warning("skipped broken samples%s: %s (total %s)", f" ({where})" if where else "",
                        stats["broken"], self.stats())  # fmt: skip
        if total >= self.cfg.min_broken_check and (
            self._stats["broken"] > self.cfg.max_broken_fraction * total
        ):
            raise TooManyBrokenSamples(
                f"{self._stats['broken']} of {total} samples are broken "
                f"({dict(self._stats['broken_by_reason'])}), more than "
                f"data.max_broken_fraction={self.cfg.max_broken_fraction}; "
                "check the data with `finegrain data inspect`"
            )

    def stats(self) -> dict[str, Any]:
        return {"seen": self._stats["seen"], "broken": self._stats["broken"],
                "broken_by_reason": dict(self._stats["broken_by_reason"])}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "items_in_epoch": self.items_in_epoch, "cursors": dict(self.cursors),
            "done": dict(self.done), "ended": sorted(self.ended), "last_worker": self.last_worker,
            "num_workers": self.num_workers, "batch_size": self.cfg.batch_size,
            "source": self.cfg.source,
            "world_size": self.world_size, "stats": self.stats(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next batch is the one an uninterrupted run yields next."""
        for name in ("batch_size", "source"):
            saved, now = state.get(name, getattr(self.cfg, name)), getattr(self.cfg, name)
            if saved != now:
                raise ValueError(
                    f"the data position was saved with data.{name}={saved!r}, this run has "
                    f"{now!r}; resume with the same value (or start a new run)"
                )
        if self.wds_sources is not None and (
            state.get("num_workers", self.num_workers) != self.num_workers
            or state.get("world_size", self.world_size) != self.world_size
        ):
            log.warning("webdataset resume with a different num_workers/world size is not exact")
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.items_in_epoch = int(state.get("items_in_epoch", self.batches_in_epoch))
        self.cursors = {int(k): int(v) for k, v in state.get("cursors", {}).items()}
        self.done = {int(k): int(v) for k, v in state.get("done", {}).items()}
        self.ended = {int(w) for w in state.get("ended", [])}
        self.last_worker = int(state.get("last_worker", -1))
        st = state.get("stats", {})
        self._stats = {"seen": int(st.get("seen", 0)), "broken": int(st.get("broken", 0)),
                       "broken_by_reason": Counter(st.get("broken_by_reason", {}))}  # fmt: skip


def build_train_loader(cfg: DataConfig, collate: Callable, *, rank: int = 0, world_size: int = 1,
                       seed: int = 0, transform: SampleTransform | None = None) -> TrainLoader:  # fmt: skip
    """The training loader of ``cfg`` (see ``TrainLoader``); ``collate`` maps a list of schema
    samples to a batch dict and must be picklable when ``num_workers > 0``, as must
    ``transform`` (the per-sample transform, ``Method.make_transform``; default
    ``train_transform(cfg)``)."""
    return TrainLoader(cfg, collate, rank=rank, world_size=world_size, seed=seed,
                       transform=transform)  # fmt: skip

"""Locked-tower feature caching: run the frozen bottoms of the towers once, train the tops.

When the bottom of a tower is frozen and locked (``trainable_blocks >= 0`` with
``lock_frozen=True``: eval mode, a fixed function of the input; LiT, Zhai et al. 2022, locks a
whole tower), its output for an image crop or a caption never changes during training. With
``data.feature_cache`` set, the trainer computes, before the first step:

- the image tower's ``frozen_prefix`` for every image of the training source and each of
  ``data.cache_crops = K`` fixed crops. K = 1: the method's *eval* transform (resize + centre
  crop, no randomness). K > 1: the method's train transform, crop k of image ``key`` seeded
  with ``mix_seed("feature-cache-crop", key, k)``; a training sample then uses crop
  ``sample_rng(seed, "crop").randrange(K)``, so augmentation is K fixed crops per image;
- the text tower's ``frozen_prefix`` for every distinct caption any sample can draw (with the
  token ids); a text tower with nothing frozen gets the ids only.

They are stored as memory-mapped ``.npy`` stores (``finegrain.data.feature_store``: a CRC32 per
row, checked on every read; a bad row raises naming the file) under ``<root>/image-<key>`` and
``<root>/text-<key>``, root = ``data.feature_cache`` (a folder) or ``$FINEGRAIN_HOME/cache/
features`` for ``"auto"``. The key hashes the frozen modules' parameters and buffers, the
transform and K, and the data listing (sample keys, image file sizes and mtimes, captions, token
ids): change any of them and the store is rebuilt; unreadable or truncated stores are rebuilt.

Training then reads batches from the stores instead of decoding images: the same sample order,
seeds, broken-sample substitutes and caption draws as ``finegrain.data.loader`` (same data
position in checkpoints, so kill-and-resume stays exact), giving ``image_prefix`` (B, C, h, w),
``text`` ids and ``text_prefix`` (B[, K], L, D) to the method, whose ``features`` runs only the
towers' ``trainable_suffix`` (the code the uncached forward runs after ``frozen_prefix``). With
K = 1 the loss equals the uncached loss on eval-transform images (tests/test_feature_cache.py).
Evaluation is unchanged (full towers on images).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from finegrain.config import finegrain_home
from finegrain.data.collate import add_stats, caption_candidates, pick_captions
from finegrain.data.config import DataConfig
from finegrain.data.feature_store import FeatureStore, StoreWriter, open_store
from finegrain.data.loader import MapBatches, TrainLoader
from finegrain.data.schema import BrokenSample, mix_seed, parse_record, sample_rng
from finegrain.data.sources import decode_record, make_sample

log = logging.getLogger(__name__)
VERSION = "feature-cache-1"
SOURCES = ("jsonl", "csv", "synthetic")
CHUNK = 64  # images (crops) / captions per frozen-prefix call while building


def cache_root(cfg: DataConfig) -> Path:
    """``data.feature_cache``: "auto" -> $FINEGRAIN_HOME/cache/features, else that folder."""
    if cfg.feature_cache == "auto":
        return finegrain_home() / "cache" / "features"
    return Path(cfg.feature_cache).expanduser()


def _cached_tower(tower: torch.nn.Module) -> bool:
    return hasattr(tower, "frozen_prefix") and bool(tower.prefix_modules())


def check_cacheable(cfg: DataConfig, method: torch.nn.Module) -> bool:
    """One-line ValueErrors for what the cache cannot do; returns whether text is cached."""
    name = method.cfg.name
    if cfg.source not in SOURCES:
        raise ValueError(f"data.feature_cache needs a map-style source ({', '.join(SOURCES)}), "
                         f"got data.source='{cfg.source}'")  # fmt: skip
    if cfg.cache_crops < 1:
        raise ValueError(f"data.cache_crops must be >= 1, got {cfg.cache_crops}")
    if cfg.hflip:
        raise ValueError("data.feature_cache with data.hflip is not supported (a flip changes "
                         "the caption's left/right); set data.hflip=false")  # fmt: skip
    if "feature_cache" not in method.capabilities():
        raise ValueError(f"method '{name}' does not read cached tower features "
                         "(data.feature_cache); methods that do: clip, siglip")  # fmt: skip
    if not _cached_tower(method.image):
        raise ValueError("data.feature_cache: the image tower has no frozen bottom to cache; set "
                         "method.image.trainable_blocks >= 0 on a tower with a split point "
                         "(efficientnet_lite0)")  # fmt: skip
    text = _cached_tower(method.text) and getattr(method.text, "splittable", True)
    for where, tower, used in (("image", method.image, True), ("text", method.text, text)):
        if used and not tower.lock_frozen:
            raise ValueError(f"data.feature_cache needs method.{where}.lock_frozen=true (the "
                             "frozen blocks in eval mode: a fixed function of the input)")  # fmt: skip
    return text


def modules_hash(modules: list[torch.nn.Module]) -> str:
    """sha256 of the parameters and buffers (names, dtypes, shapes, bytes) of ``modules``."""
    h = hashlib.sha256()
    for i, m in enumerate(modules):
        for name, t in m.state_dict().items():
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _sha(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _image_identity(image: Any) -> Any:
    """What identifies an image cheaply: path + size + mtime, else a hash of its bytes."""
    if isinstance(image, (str, Path)):
        p = Path(image)
        st = p.stat() if p.is_file() else None
        return (str(p.name), st.st_size, st.st_mtime_ns) if st else (str(p.name), None)
    if isinstance(image, bytes):
        return hashlib.sha1(image).hexdigest()
    if image is None:
        return None
    return hashlib.sha1(image.tobytes()).hexdigest()  # a PIL image (synthetic scenes)


def make_listing(source: Any, caption_key: str) -> dict[str, Any]:
    """Per source row: key, image identity, candidate caption indices, label, broken reason;
    plus the distinct caption texts (first-seen order)."""
    keys, ids, cands, labels, broken = [], [], [], [], {}
    texts: dict[str, int] = {}
    for i in range(len(source)):
        raw = source.raw(i)
        keys.append(str(raw.get("key", i)))
        ids.append(_image_identity(raw.get("image")))
        rows, label = [], -1
        try:
            if raw.get("broken"):
                raise BrokenSample(*raw["broken"])
            fields = parse_record(decode_record(raw["record"]), raw["key"], caption_key)
            label = int(fields["label"])
            rows = [texts.setdefault(c, len(texts)) for c in caption_candidates(fields)]
        except BrokenSample as e:
            broken[i] = e.reason
        cands.append(rows)
        labels.append(label)
    return {"keys": keys, "ids": ids, "candidates": cands, "labels": labels,
            "broken": broken, "texts": list(texts)}  # fmt: skip


class _Crops(Dataset):
    """(flat row = source row * K + k) -> (row, image tensor or None, broken reason)."""

    def __init__(self, source: Any, transforms: list[Any], keys: list[str], caption_key: str,
                 skip: dict[int, str]) -> None:  # fmt: skip
        self.source, self.transforms, self.keys = source, transforms, keys
        self.caption_key, self.skip = caption_key, skip

    def __len__(self) -> int:
        return len(self.source) * len(self.transforms)

    def __getitem__(self, flat: int) -> tuple[int, torch.Tensor | None, str]:
        row, k = divmod(flat, len(self.transforms))
        if row in self.skip:
            return flat, None, self.skip[row]
        seed = mix_seed("feature-cache-crop", self.keys[row], k)
        try:
            s = make_sample(self.source.raw(row), self.transforms[k], seed, self.caption_key)
        except BrokenSample as e:
            return flat, None, e.reason
        return flat, s["image"], ""


def _as_list(items: list) -> list:
    return items


@torch.no_grad()
def _build_image(path: Path, key: str, loader: TrainLoader, method: Any, listing: dict,
                 device: torch.device) -> FeatureStore:  # fmt: skip
    cfg, k = loader.cfg, loader.cfg.cache_crops
    transforms = [method.make_transform(cfg, train=k > 1) for _ in range(k)]
    ds = _Crops(loader.source, transforms, listing["keys"], cfg.caption_key, listing["broken"])
    batches = DataLoader(ds, batch_size=CHUNK, num_workers=max(0, cfg.num_workers),
                         collate_fn=_as_list)  # fmt: skip
    writer, broken, t0 = None, dict(listing["broken"]), time.perf_counter()
    try:
        for items in batches:
            good = [(f, im) for f, im, _ in items if im is not None]
            broken.update({f // k: r for f, im, r in items if im is None})
            if not good:
                continue
            h = method.image.frozen_prefix(torch.stack([im for _, im in good]).to(device))
            h = h.float().cpu().numpy()  # (n, C, h, w)
            if writer is None:
                writer = StoreWriter(path, len(ds), h.shape[1:])
            for (f, _), row in zip(good, h, strict=True):
                writer.write(f, row[None])
            if items[-1][0] // (CHUNK * 20) != items[0][0] // (CHUNK * 20):
                log.info("feature cache: %d/%d image crops (%.0f/s)", items[-1][0] + 1, len(ds),
                         (items[-1][0] + 1) / (time.perf_counter() - t0))  # fmt: skip
        if writer is None:
            raise ValueError(f"feature cache: no image of the {len(ds)} could be decoded")
        return writer.commit(key, {"crops": k, "broken": {str(r): v for r, v in broken.items()}})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


@torch.no_grad()
def _build_text(path: Path, key: str, tokens: torch.Tensor, method: Any,
                device: torch.device) -> FeatureStore:  # fmt: skip
    writer = None
    try:
        for start in range(0, len(tokens), CHUNK):
            h = method.text.frozen_prefix(tokens[start : start + CHUNK].to(device))
            h = h.float().cpu().numpy()  # (n, L, D)
            if writer is None:
                writer = StoreWriter(path, len(tokens), h.shape[1:])
            writer.write(start, h)
        assert writer is not None, "no caption to cache"
        return writer.commit(key, {})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _store(path: Path, key: str, build: Callable[[], FeatureStore], may_build: bool,
           what: str) -> FeatureStore:  # fmt: skip
    store, reason = open_store(path, key)
    if store is not None:
        log.info("feature cache: %s features from %s", what, path)
        return store
    if not may_build:
        raise ValueError(f"feature cache {path}: {reason}, and only rank 0 builds it")
    log.info("feature cache: building %s features in %s (%s)", what, path, reason)
    t0 = time.perf_counter()
    store = build()
    log.info("feature cache: %s features built in %.1f s", what, time.perf_counter() - t0)
    return store


class CachedCollate:
    """Picklable: ``{"seed", "row"}`` samples -> ``image_prefix``, ``text``/``texts`` ids,
    ``text_prefix`` (when the text tower is cached), ``labels``, as ``ContrastiveCollate``
    draws them (same caption stream ``"caption"``; crop from stream ``"crop"``)."""

    def __init__(self, image: FeatureStore, text: FeatureStore | None, tokens: torch.Tensor,
                 candidates: list[list[int]], labels: list[int], crops: int,
                 num_captions: int) -> None:  # fmt: skip
        self.image, self.text, self.tokens = image, text, tokens
        self.candidates, self.labels = candidates, labels
        self.crops, self.num_captions = crops, num_captions

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, captions, labels = [], [], []
        for s in samples:
            cands = self.candidates[s["row"]]
            if not cands:
                continue
            captions += pick_captions(cands, self.num_captions, sample_rng(s["seed"], "caption"))
            k = sample_rng(s["seed"], "crop").randrange(self.crops) if self.crops > 1 else 0
            rows.append(s["row"] * self.crops + k)
            labels.append(self.labels[s["row"]])
        if not rows:
            raise ValueError(f"none of the {len(samples)} samples has a non-empty caption")
        ids = self.tokens[captions]  # (B*K, L)
        batch: dict[str, Any] = {"image_prefix": torch.from_numpy(self.image.rows(rows))}
        lead = (len(rows),) if self.num_captions == 1 else (len(rows), self.num_captions)
        batch["text" if self.num_captions == 1 else "texts"] = ids.view(*lead, -1)
        if self.text is not None:
            h = torch.from_numpy(self.text.rows(captions))  # (B*K, L, D)
            batch["text_prefix"] = h.view(*lead, *h.shape[1:])
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return add_stats(batch, skipped_samples=len(samples) - len(rows))


class CachedBatches(MapBatches):
    """``MapBatches`` (same order, seeds, substitutes) whose samples are cache rows."""

    broken: dict[int, str] = {}

    def load(self, index: int, seed: int) -> dict[str, Any]:
        if index in self.broken:
            raise BrokenSample(self.broken[index], f"row {index} (feature cache)")
        return {"seed": seed, "row": index}


class CachedTrainLoader(TrainLoader):
    """``TrainLoader`` over cached features; ``state_dict`` is the same data position."""

    broken: dict[int, str] = {}

    def _map_batches(self) -> MapBatches:
        ds = CachedBatches(self.source, None, self.collate, seed=self.seed, rank=self.rank,
                           world_size=self.world_size, batch_size=self.cfg.batch_size,
                           caption_key=self.cfg.caption_key)  # fmt: skip
        ds.broken = self.broken
        return ds


def build_cached_loader(cfg: DataConfig, method: Any, *, rank: int = 0, world_size: int = 1,
                        seed: int = 0, device: torch.device | str = "cpu",
                        barrier: Callable[[], None] | None = None) -> CachedTrainLoader:  # fmt: skip
    """Open (building on rank 0 when missing or stale) the feature stores of ``cfg`` for
    ``method`` and return the loader over them. Other ranks wait on ``barrier`` then open."""
    text_cached = check_cacheable(cfg, method)
    device = torch.device(device)
    loader = CachedTrainLoader(cfg, None, rank=rank, world_size=world_size, seed=seed)  # type: ignore[arg-type]
    listing = make_listing(loader.source, cfg.caption_key)
    tokens = method.text.tokenizer(listing["texts"]) if listing["texts"] else None
    if tokens is None:
        raise ValueError("data.feature_cache: no sample of the source has a caption")
    root, main = cache_root(cfg), rank == 0
    image_spec = (repr(method.make_transform(cfg, train=cfg.cache_crops > 1)), cfg.cache_crops)
    image_key = _sha(VERSION, "image", type(method.image).__name__, method.image.split,
                     modules_hash(method.image.prefix_modules()), image_spec,
                     listing["keys"], listing["ids"], sorted(listing["broken"].items()))  # fmt: skip
    tokens_bytes = tokens.numpy().tobytes()
    text_key = _sha(VERSION, "text", type(method.text).__name__, getattr(method.text, "split", -1),
                    modules_hash(method.text.prefix_modules()) if text_cached else "", tokens_bytes)  # fmt: skip
    if barrier is not None and not main:
        barrier()  # rank 0 builds first
    image_path = root / f"image-{image_key[:24]}"
    image = _store(image_path, image_key, lambda: _build_image(
        image_path, image_key, loader, method, listing, device), main, "image")  # fmt: skip
    text = None
    if text_cached:
        text_path = root / f"text-{text_key[:24]}"
        text = _store(text_path, text_key, lambda: _build_text(
            text_path, text_key, tokens, method, device), main, "text")  # fmt: skip
    if barrier is not None and main:
        barrier()
    loader.broken = {int(r): v for r, v in image.meta["broken"].items()}
    loader.collate = CachedCollate(image, text, tokens, listing["candidates"], listing["labels"],
                                   cfg.cache_crops, method.num_captions)  # fmt: skip
    return loader

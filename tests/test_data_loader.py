"""Training loader: exact resume, rank sharding, broken samples, fail-fast key checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.data.loader import TooManyBrokenSamples, build_train_loader
from finegrain.data.shards import synthesize

from helpers.shards import bad_shard


def collate(samples: list[dict]) -> dict:
    """Picklable test collate: images, per-sample seeds, keys and region boxes."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "seed": torch.tensor([s["seed"] for s in samples]),
        "key": [s["key"] for s in samples],
        "boxes": [[r["box"] for r in s["regions"]] for s in samples],
    }


def _take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        torch.equal(x["image"], y["image"]) and torch.equal(x["seed"], y["seed"])
        and x["key"] == y["key"] and x["boxes"] == y["boxes"]
        for x, y in zip(a, b)
    ) and len(a) == len(b)  # fmt: skip


def _synthetic_cfg(**kw) -> DataConfig:
    kw = {"batch_size": 4, **kw}
    cfg = DataConfig(image_size=32, augment="rrc", hflip=True, **kw)
    cfg.synthetic = SyntheticConfig(num_samples=24)
    return cfg


def _resume_matches(cfg: DataConfig, cut: int, more: int, seed: int = 3) -> None:
    full = build_train_loader(cfg, collate, seed=seed)
    it = iter(full)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(full.state_dict()))  # checkpoints store it as JSON-like data
    expected = [next(it) for _ in range(more)]
    resumed = build_train_loader(cfg, collate, seed=seed)
    resumed.load_state_dict(state)
    got = _take(resumed, more)
    assert _same(expected, got), "resumed batches differ from the uninterrupted run"
    assert resumed.stats()["seen"] == full.stats()["seen"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_map_style_exact_resume_across_epochs(num_workers: int) -> None:
    cfg = _synthetic_cfg(num_workers=num_workers)
    loader = build_train_loader(cfg, collate, seed=3)
    assert loader.epoch_length == 6
    _resume_matches(cfg, cut=4, more=5)  # crosses the epoch boundary
    if num_workers:  # batches do not depend on the number of workers
        assert _same(
            _take(loader, 7), _take(build_train_loader(_synthetic_cfg(), collate, seed=3), 7)
        )


def test_resume_with_other_batch_size_is_refused() -> None:
    loader = build_train_loader(_synthetic_cfg(), collate)
    _take(loader, 2)
    other = build_train_loader(_synthetic_cfg(batch_size=6), collate)
    with pytest.raises(ValueError, match="data.batch_size=4"):
        other.load_state_dict(loader.state_dict())


def test_epochs_reshuffle_and_seeds_differ() -> None:
    batches = _take(build_train_loader(_synthetic_cfg(), collate, seed=0), 12)
    ep0 = [k for b in batches[:6] for k in b["key"]]
    ep1 = [k for b in batches[6:] for k in b["key"]]
    assert sorted(ep0) == sorted(ep1) and ep0 != ep1 and len(set(ep0)) == 24
    seeds = torch.cat([b["seed"] for b in batches])
    assert len(set(seeds.tolist())) == len(seeds)


def test_rank_sharding_is_disjoint() -> None:
    cfg = _synthetic_cfg()
    cfg.synthetic.num_samples = 26  # not divisible: drop_last gives both ranks 13 -> 3 batches
    ranks = [build_train_loader(cfg, collate, rank=r, world_size=2, seed=1) for r in (0, 1)]
    assert [r.epoch_length for r in ranks] == [3, 3]
    keys = [{k for b in _take(r, 3) for k in b["key"]} for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 12 and not keys[0] & keys[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("syn")
    synthesize(str(out), 30, image_size=32, seed=0, shard_size=8)  # 4 shards: 8, 8, 8, 6
    return str(out / "{00000..00003}.tar")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_wds_exact_resume(shards: str, num_workers: int) -> None:
    cfg = DataConfig(source="wds", train=shards, batch_size=3, image_size=32, num_workers=num_workers,
                     shuffle_buffer=6, augment="rrc")  # fmt: skip
    _resume_matches(cfg, cut=3, more=9)  # uneven workers; crosses the epoch end
    _resume_matches(cfg, cut=8, more=4)


def test_wds_resampled_and_epoch_samples(shards: str) -> None:
    cfg = DataConfig(source="wds", train=shards, batch_size=4, image_size=32, resampled=True,
                     epoch_samples=16, shuffle_buffer=4)  # fmt: skip
    loader = build_train_loader(cfg, collate, seed=5)
    assert loader.epoch_length == 4
    _take(loader, 6)
    assert loader.state_dict()["epoch"] == 1
    _resume_matches(cfg, cut=5, more=4, seed=5)


def test_wds_ranks_disjoint_and_mixing(shards: str, tmp_path: Path) -> None:
    cfg = DataConfig(source="wds", train=shards, batch_size=2, image_size=32, shuffle_buffer=1)
    got = []
    for rank in (0, 1):
        loader = build_train_loader(cfg, collate, rank=rank, world_size=2)
        it = iter(loader)
        got.append({k for _ in range(7) for k in next(it)["key"]})
    assert not got[0] & got[1]
    single = str(Path(shards).parent / "00003.tar")  # one shard: split by sample over ranks
    cfg1 = DataConfig(source="wds", train=single, batch_size=3, image_size=32, shuffle_buffer=1)
    k = [{k for b in _take(build_train_loader(cfg1, collate, rank=r, world_size=2), 1)
          for k in b["key"]} for r in (0, 1)]  # fmt: skip
    assert not k[0] & k[1]
    mixed = DataConfig(source="wds", train=f"{shards}::0.5,{single}::0.5", batch_size=2,
                       image_size=32)  # fmt: skip
    loader = build_train_loader(mixed, collate)
    keys = [k for b in _take(loader, 18) for k in b["key"]]
    assert loader.state_dict()["epoch"] == 0 and len(keys) == 36  # 30 + 6 samples per epoch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_broken_samples_skipped_and_counted(tmp_path: Path, num_workers: int) -> None:
    cfg = DataConfig(source="wds", train=bad_shard(tmp_path), batch_size=3, image_size=32,
                     num_workers=num_workers, max_broken_fraction=0.5, shuffle_buffer=1)  # fmt: skip
    loader = build_train_loader(cfg, collate)
    batches = _take(loader, 4)  # one epoch: 12 good samples (2 workers: 6 each)
    assert all(len(b["key"]) == 3 and not any(k.startswith("b") for k in b["key"]) for b in batches)
    assert loader.state_dict()["epoch"] == 0
    stats = loader.stats()
    assert stats["seen"] == 12 and stats["broken"] == 5
    assert stats["broken_by_reason"] == {"decode": 1, "json": 1, "box": 2, "caption": 1}


def test_too_many_broken_stops_with_clear_error(tmp_path: Path) -> None:
    cfg = DataConfig(source="wds", train=bad_shard(tmp_path), batch_size=4, image_size=32,
                     max_broken_fraction=0.05, min_broken_check=5)  # fmt: skip
    with pytest.raises(TooManyBrokenSamples, match="max_broken_fraction"):
        _take(build_train_loader(cfg, collate), 6)


def test_map_style_broken_rows_replaced(tmp_path: Path) -> None:
    img = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    rows = [{"image": "a.png", "caption": f"red {i}"} for i in range(6)]
    rows += [{"image": "bad.jpg", "caption": "x"}, {"image": "gone.jpg", "caption": "x"},
             {"image": "a.png"}]  # fmt: skip
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    cfg = DataConfig(source="jsonl", train=str(tmp_path / "m.jsonl"), batch_size=5, image_size=16,
                     max_broken_fraction=0.9)  # fmt: skip
    loader = build_train_loader(cfg, collate)
    batches = _take(loader, 8)
    assert all(len(b["key"]) == 5 for b in batches)
    reasons = loader.stats()["broken_by_reason"]
    assert set(reasons) == {"decode", "missing_image", "caption", "json"}


def test_missing_keys_fail_fast(shards: str) -> None:
    cfg = DataConfig(source="wds", train=shards, batch_size=2, image_size=32, caption_key="alt")
    with pytest.raises(ValueError, match="keys present: .*long_caption"):
        _take(build_train_loader(cfg, collate), 1)
    cfg = DataConfig(source="wds", train=shards, batch_size=2, image_size=32, image_key="webp",
                     num_workers=2)  # fmt: skip
    with pytest.raises(ValueError, match="extensions present: .*jpg"):
        _take(build_train_loader(cfg, collate), 1)


def test_missing_paths_and_bad_config(tmp_path: Path) -> None:
    cfg = DataConfig(source="wds", train=str(tmp_path / "s-{0..2}.tar"))
    with pytest.raises(FileNotFoundError, match=r"s-0\.tar, .*s-1\.tar, .*s-2\.tar"):
        build_train_loader(cfg, collate)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        build_train_loader(DataConfig(source="jsonl", train=str(tmp_path / "m.jsonl")), collate)
    good = str(tmp_path / "a.tar")
    Path(good).write_bytes(b"")
    with pytest.raises(ValueError, match="positive number"):
        build_train_loader(DataConfig(source="wds", train=f"{good}::-1"), collate)
    with pytest.raises(ValueError, match="valid choices: synthetic, jsonl, csv, wds"):
        build_train_loader(DataConfig(source="parquet"), collate)


def test_flickr8k_manifest(flickr8k_dir: Path) -> None:
    cfg = DataConfig(source="jsonl", train=str(flickr8k_dir / "captions.jsonl"), split="test",
                     batch_size=4, image_size=32)  # fmt: skip
    seen: list[dict] = []
    loader = build_train_loader(cfg, lambda s: (seen.extend(s), collate(s))[1])
    assert loader.epoch_length == 250  # the official 1000 test images
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32)
    assert all(len(s["captions"]) == 5 and s["caption"] == "" for s in seen)
    with pytest.raises(ValueError, match="splits: test, train, val"):
        build_train_loader(DataConfig(source="jsonl", train=cfg.train, split="dev"), collate)

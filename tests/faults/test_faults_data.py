"""Corrupt data of every kind is skipped and counted exactly by reason; nothing good is lost;
too much of it stops the run with a clear message. Convert and inspect validate on the way in."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.data.loader import TooManyBrokenSamples, build_train_loader
from finegrain.data.shards import convert_manifest, encode_image, inspect_shards

OK = {"caption": "a red square"}


def collate(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples]}


def _jpg(i: int) -> bytes:
    return encode_image(Image.new("RGB", (24, 24), (10 * i % 255, 40, 90)))


def _tar(path: Path, samples: list[tuple[str, bytes, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, img, meta in samples:
            for ext, data in (("jpg", img), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _good(i: int) -> tuple[str, bytes, bytes]:
    return (f"g{i:02d}", _jpg(i), json.dumps({"caption": f"good {i}"}).encode())


def _corrupt_shards(tmp: Path) -> tuple[str, set[str], dict[str, int]]:
    """Four shards (one deleted after start-up) with one fault of each kind; returns the shard
    pattern, the good keys and the expected broken counts by reason."""
    box = {"caption": "x", "regions": [{"text": "t", "box": [0.2, 0.1, 1.8, 0.5]}]}
    s0 = [*map(_good, range(4)), ("d", b"\xff\xd8 not a jpeg", json.dumps(OK).encode()),
          ("j", _jpg(0), b"{broken json"), _good(4)]  # fmt: skip
    s1 = [*map(_good, range(5, 8)), ("w", _jpg(1), json.dumps({"caption": 7}).encode()),
          ("b", _jpg(2), json.dumps(box).encode()), ("c", _jpg(3), b'{"caption": "  "}'),
          _good(8), ("t", _jpg(4) * 4, json.dumps(OK).encode())]  # fmt: skip
    paths = [_tar(tmp / "00000.tar", s0), _tar(tmp / "00001.tar", s1),
             _tar(tmp / "00002.tar", [_good(20)]), _tar(tmp / "00003.tar", [_good(9), _good(10)])]  # fmt: skip
    with tarfile.open(paths[1]) as tar:  # cut shard 1 inside the image of its last sample
        cut = tar.getmember("t.jpg").offset_data + 100
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:cut])
    good = {k for k, *_ in [*s0, *s1, _good(9), _good(10)] if k.startswith("g")}
    expected = {"decode": 1, "json": 2, "box": 1, "caption": 1, "truncated": 1,
                "missing_shard": 1}  # fmt: skip
    return str(tmp / "{00000..00003}.tar"), good, expected


def _one_epoch(loader) -> tuple[list[str], dict]:
    """Keys delivered in epoch 0 and the loader's counts at the end of that epoch."""
    snap: dict = {}
    end = loader._end_epoch

    def record_then_end() -> None:
        snap.update(loader.stats())
        end()

    loader._end_epoch = record_then_end
    it, keys = iter(loader), []
    while not snap:
        batch = next(it)
        if not snap:
            keys += batch["key"]
    return keys, snap


def test_corrupt_shards_skipped_and_counted_by_reason(tmp_path: Path, faults) -> None:
    pattern, good, expected = _corrupt_shards(tmp_path)
    cfg = DataConfig(source="wds", train=pattern, batch_size=1, image_size=16, augment="squash",
                     shuffle_buffer=1, max_broken_fraction=0.5, min_broken_check=100)  # fmt: skip
    loader = build_train_loader(cfg, collate)
    Path(tmp_path / "00002.tar").unlink()  # a shard vanishing mid-run (not at start-up)
    keys, stats = _one_epoch(loader)
    assert stats["broken_by_reason"] == expected
    assert stats["broken"] == sum(expected.values())
    lost = len(good - set(keys))
    assert sorted(keys) == sorted(good) and lost == 0, "every good sample is delivered once"
    assert stats["seen"] == len(good)
    faults.record("corrupt shards (loader)", injected=sum(expected.values()),
                  survived=sum(expected.values()), lost=lost)  # fmt: skip


def test_error_budget_stops_with_clear_message(tmp_path: Path, faults) -> None:
    pattern, _, _ = _corrupt_shards(tmp_path)
    cfg = DataConfig(source="wds", train=pattern, batch_size=1, image_size=16, augment="squash",
                     shuffle_buffer=1, max_broken_fraction=0.2, min_broken_check=8)  # fmt: skip
    with pytest.raises(TooManyBrokenSamples) as e:
        _one_epoch(build_train_loader(cfg, collate))
    msg = str(e.value)
    assert "data.max_broken_fraction=0.2" in msg and "finegrain data inspect" in msg
    assert "\n" not in msg
    faults.record("error budget", injected=1, survived=1)


def test_inspect_reports_truncated_and_missing_and_takes_globs(tmp_path: Path, faults) -> None:
    pattern, good, expected = _corrupt_shards(tmp_path)
    info = inspect_shards(str(tmp_path / "*.tar"))  # a glob, not only brace patterns
    assert info["shards"] == 4 and not info["clean"]
    assert list(info["bad_shards"]) == [str(tmp_path / "00001.tar")]
    assert "truncated" in info["bad_shards"][str(tmp_path / "00001.tar")]
    want = {k: v for k, v in expected.items() if k != "missing_shard"}
    assert info["broken_by_reason"] == want
    assert inspect_shards(str(tmp_path / "0000[03].tar"))["shards"] == 2
    clean = inspect_shards(str(tmp_path / "00003.tar"))
    assert clean["clean"] and clean["samples"] == 2
    faults.record("inspect", injected=sum(want.values()), survived=sum(want.values()))


def _manifest(tmp: Path) -> tuple[Path, dict[str, list[int]]]:
    img = tmp / "img"
    img.mkdir()
    for i in range(3):
        (img / f"{i}.jpg").write_bytes(_jpg(i))
    (img / "cut.jpg").write_bytes(_jpg(5)[:200])  # truncated JPEG
    (img / "empty.jpg").write_bytes(b"")  # 0-byte
    (tmp / "secret.jpg").write_bytes(_jpg(6))  # outside the dataset root
    rows = [json.dumps({"image": f"{i}.jpg", "caption": f"c {i}"}) for i in range(3)]
    rows += [json.dumps({"image": "cut.jpg", "caption": "x"}),  # line 4
             json.dumps({"image": "empty.jpg", "caption": "x"}),  # line 5
             '{"image": "0.jpg", "caption": ',  # line 6: malformed JSON
             json.dumps({"image": "1.jpg", "caption": ["not", 3]}),  # line 7: wrong type
             json.dumps({"image": "2.jpg", "caption": "x",
                         "regions": [{"text": "t", "box": [0, 0, 2, 2]}]}),  # line 8
             json.dumps({"image": "0.jpg", "caption": ""}),  # line 9: empty caption
             json.dumps({"image": "../secret.jpg", "caption": "x"}),  # line 10: escapes root
             json.dumps({"image": "gone.jpg", "caption": "x"})]  # line 11  # fmt: skip
    m = tmp / "m.jsonl"
    m.write_text("\n".join(rows) + "\n")
    return m, {"decode": [4, 5], "json": [6, 7], "box": [8], "caption": [9], "path": [10],
               "missing_image": [11]}  # fmt: skip


def test_convert_decodes_every_image_and_reports_lines(tmp_path: Path, faults) -> None:
    manifest, want = _manifest(tmp_path)
    out = convert_manifest(str(manifest), str(tmp_path / "img"), str(tmp_path / "o"))
    assert out["written"] == 3
    got: dict[str, list[int]] = {}
    for s in out["skipped"]:
        got.setdefault(s["reason"], []).append(s["line"])
    assert got == want, out["skipped"]
    assert out["skipped_by_reason"] == {k: len(v) for k, v in want.items()}
    info = inspect_shards(out["shards"][0])
    assert info["clean"] and info["samples"] == 3
    n = sum(map(len, want.values()))
    faults.record("convert (manifest rows)", injected=n, survived=n)


def test_convert_refuses_non_empty_output_unless_overwrite(tmp_path: Path, faults) -> None:
    manifest, _ = _manifest(tmp_path)
    out = tmp_path / "o"
    first = convert_manifest(str(manifest), str(tmp_path / "img"), str(out), shard_size=1)
    assert len(first["shards"]) == 3
    with pytest.raises(ValueError, match="not empty .*--overwrite"):
        convert_manifest(str(manifest), str(tmp_path / "img"), str(out), shard_size=2)
    again = convert_manifest(str(manifest), str(tmp_path / "img"), str(out), shard_size=2,
                             overwrite=True)  # fmt: skip
    assert again["removed_old_shards"] == 3 and sorted(p.name for p in out.glob("*.tar")) == [
        "00000.tar", "00001.tar"], "no shard of the old conversion is left to mix in"  # fmt: skip
    faults.record("convert into a used folder", injected=1, survived=1)


def test_manifest_paths_cannot_escape_the_dataset_root(tmp_path: Path, faults) -> None:
    from finegrain.data.schema import BrokenSample
    from finegrain.data.sources import ManifestSource, make_sample
    from finegrain.data.transforms import train_transform

    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.jpg").write_bytes(_jpg(1))
    (tmp_path / "secret.jpg").write_bytes(_jpg(2))
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    rows = [{"image": p, "caption": "x"} for p in
            ("ok.jpg", "../secret.jpg", str(tmp_path / "secret.jpg"), "link.jpg")]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = ManifestSource(str(tmp_path / "m.jsonl"), image_root=str(root))
    transform = train_transform(DataConfig(image_size=16, augment="squash"))
    assert make_sample(src.raw(0), transform, 0)["caption"] == "x"
    for i in (1, 2, 3):  # relative '..', absolute path, symlink out of the root
        with pytest.raises(BrokenSample) as e:
            make_sample(src.raw(i), transform, 0)
        assert e.value.reason == "path"
    faults.record("manifest path escapes", injected=3, survived=3)

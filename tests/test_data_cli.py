"""`finegrain data convert | inspect | synthesize` round trips, CSV manifests, sidecar joins."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.data.cli import main
from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.data.loader import build_train_loader
from finegrain.data.sources import iter_tar
from finegrain.data.synthetic_sets import SyntheticScenes

from helpers.shards import bad_shard


def collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "samples": samples}


def _run(argv: list[str], capsys) -> tuple[int, dict | str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def _images(folder: Path, n: int) -> None:
    (folder / "img").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (24 + i, 20), (10 * i, 100, 50)).save(folder / "img" / f"{i}.jpg")


def test_synthesize_inspect_and_train_from_shards(tmp_path: Path, capsys) -> None:
    code, out = _run(["synthesize", "--out", str(tmp_path / "s"), "--num", "10", "--image-size",
                      "32", "--shard-size", "4", "--format", "png"], capsys)  # fmt: skip
    code, noisy = _run(["synthesize", "--out", str(tmp_path / "n"), "--num", "6", "--image-size",
                        "32", "--drop-region-prob", "1.0"], capsys)  # fmt: skip
    assert all(json.loads(s["json"])["regions"] == [] for s in iter_tar(noisy["shards"][0]))
    assert code == 0 and len(out["shards"]) == 3 and out["written"] == 10
    code, info = _run(["inspect", out["pattern"]], capsys)
    assert code == 0 and info["samples"] == 10 and info["broken"] == 0
    assert info["extensions"] == {"png": 10, "txt": 10, "json": 10, "mask.png": 10}
    for key in ("caption", "captions", "long_caption", "sentences", "regions", "label"):
        assert info["json_keys"][key] == 10
    # the shards hold exactly the in-memory training scenes (png: lossless)
    first = next(iter_tar(out["shards"][0]))
    scene = SyntheticScenes(SyntheticConfig(num_samples=10), image_size=32).scene(0)
    assert json.loads(first["json"])["long_caption"] == scene["long_caption"]
    decoded = Image.open(io.BytesIO(first["png"]))
    assert np.array_equal(np.asarray(decoded), np.asarray(scene["image"]))
    cfg = DataConfig(source="wds", train=out["pattern"], batch_size=5, image_size=32,
                     augment="squash", load_masks=True)  # fmt: skip
    batch = next(iter(build_train_loader(cfg, collate)))
    s = batch["samples"][0]
    assert s["mask"].shape == (32, 32) and s["sentences"] and s["regions"]


def test_convert_jsonl_manifest_round_trip(tmp_path: Path, capsys) -> None:
    _images(tmp_path, 5)
    rows = [{"image": f"img/{i}.jpg", "captions": [f"a {i}", f"b {i}"], "split": "train"}
            for i in range(4)]  # fmt: skip
    rows.append({"image": "img/missing.jpg", "caption": "x", "split": "train"})
    rows.append({"image": "img/4.jpg", "caption": "test row", "split": "test"})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code, out = _run(["convert", "--manifest", str(tmp_path / "m.jsonl"), "--images",
                      str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "2",
                      "--split", "train"], capsys)  # fmt: skip
    assert code == 0 and out["written"] == 4 and out["missing_image"] == 1
    assert len(out["shards"]) == 2
    code, info = _run(["inspect", out["pattern"]], capsys)
    assert info["samples"] == 4 and info["broken"] == 0 and info["extensions"]["jpg"] == 4
    samples = [s for sh in out["shards"] for s in iter_tar(sh)]
    assert samples[0]["txt"] == b"a 0"  # img2dataset layout: the caption in .txt
    assert samples[0]["jpg"] == (tmp_path / "img/0.jpg").read_bytes()  # bytes kept as is
    assert json.loads(samples[3]["json"])["captions"] == ["a 3", "b 3"]


def test_inspect_reports_broken_and_missing(tmp_path: Path, capsys) -> None:
    path = bad_shard(tmp_path)
    code, info = _run(["inspect", path], capsys)
    assert code == 0 and info["samples"] == 17 and info["broken"] == 5
    assert info["broken_by_reason"] == {"decode": 1, "json": 1, "box": 2, "caption": 1}
    assert tarfile.is_tarfile(path)
    code, err = _run(["inspect", str(tmp_path / "nope-{0..1}.tar")], capsys)
    assert code == 2 and "nope-0.tar" in err and "nope-1.tar" in err
    code, err = _run(["convert", "--manifest", str(tmp_path / "x.jsonl"), "--out",
                      str(tmp_path / "o")], capsys)  # fmt: skip
    assert code == 2 and "manifest not found" in err


def test_csv_manifest_and_sidecar_join(tmp_path: Path, capsys) -> None:
    _images(tmp_path, 4)
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption", "captions"])
        w.writeheader()
        for i in range(4):
            w.writerow({"image": f"img/{i}.jpg", "caption": f"cap {i}",
                        "captions": json.dumps([f"x {i}", f"y {i}"])})  # fmt: skip
    cfg = DataConfig(source="csv", train=str(tmp_path / "m.csv"), batch_size=2, image_size=16)
    batch = next(iter(build_train_loader(cfg, collate)))
    assert all(s["captions"] == [f"x {s['caption'][4:]}", f"y {s['caption'][4:]}"]
               for s in batch["samples"])  # fmt: skip
    code, out = _run(["convert", "--manifest", str(tmp_path / "m.csv"), "--out",
                      str(tmp_path / "o")], capsys)  # fmt: skip
    keys = [s["__key__"] for s in iter_tar(out["shards"][0])]
    sidecar = tmp_path / "side.jsonl"
    sidecar.write_text("\n".join(json.dumps(
        {"key": k, "long_caption": f"First {i}. Second {i}.",
         "regions": [{"text": "left half", "box": [0.0, 0.0, 0.5, 1.0]}]})
        for i, k in enumerate(keys)))  # fmt: skip
    cfg = DataConfig(source="wds", train=out["pattern"], sidecar=str(sidecar), batch_size=4,
                     image_size=16, augment="squash")  # fmt: skip
    samples = next(iter(build_train_loader(cfg, collate)))["samples"]
    for s in samples:
        n = s["long_caption"].split()[1].rstrip(".")
        assert s["sentences"] == [f"First {n}.", f"Second {n}."]
        assert s["regions"][0]["box"] == pytest.approx([0.0, 0.0, 0.5, 1.0])
        assert s["caption"] == f"cap {n}"


def test_usage_errors_return_codes(capsys) -> None:
    assert main(["bogus"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["synthesize", "--out", "x", "--num", "0"]) == 2
    assert "--num must be >= 1" in capsys.readouterr().err

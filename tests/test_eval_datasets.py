"""Loaders on small fixture files in each real annotation format, written here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finegrain.eval.config import EvalTaskConfig
from finegrain.eval.datasets import load_task_data

from helpers.eval_toy import color_image


def _img(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color_image("red", seed=seed).save(path)


def _load(dataset: str, path: Path, **kw):
    return load_task_data(EvalTaskConfig(task="retrieval", dataset=dataset, path=str(path), **kw))


def test_coco_val2017_captions(tmp_path):
    ann = tmp_path / "annotations" / "captions_val2017.json"
    ann.parent.mkdir()
    ann.write_text(
        json.dumps(
            {
                "images": [
                    {"id": 7, "file_name": "000000000007.jpg"},
                    {"id": 9, "file_name": "000000000009.jpg"},
                    {"id": 11, "file_name": "uncaptioned.jpg"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 9, "caption": "b one "},
                    {"id": 2, "image_id": 7, "caption": "a one"},
                    {"id": 3, "image_id": 9, "caption": "b two"},
                ],
            }
        )
    )
    for n in ("000000000007.jpg", "000000000009.jpg"):
        _img(tmp_path / "val2017" / n)
    d = _load("coco", ann)
    assert [p.name for p in d.images] == ["000000000007.jpg", "000000000009.jpg"]
    assert d.texts == ["a one", "b one", "b two"] and d.text_to_image == [0, 1, 1]


def _karpathy(tmp_path: Path, filepath: str | None) -> Path:
    images = []
    for i, split in enumerate(["test", "train", "test"]):
        im = {
            "filename": f"{i}.jpg",
            "split": split,
            "imgid": i,
            "sentences": [{"raw": f"caption {i} {k}", "tokens": []} for k in range(5)],
        }
        if filepath:
            im["filepath"] = filepath
        images.append(im)
        _img(tmp_path / (filepath or "flickr30k-images") / f"{i}.jpg", i)
    ann = tmp_path / "dataset.json"
    ann.write_text(json.dumps({"images": images, "dataset": "x"}))
    return ann


def test_karpathy_coco_and_flickr30k(tmp_path):
    d = _load("coco", _karpathy(tmp_path / "c", "val2014"))
    assert len(d.images) == 2 and len(d.texts) == 10 and d.texts[5] == "caption 2 0"
    f = _load("flickr30k", _karpathy(tmp_path / "f", None))
    assert f.images[1].name == "2.jpg" and f.text_to_image == [0] * 5 + [1] * 5
    with pytest.raises(ValueError, match=r"splits there: \['test', 'train'\]"):
        _load("flickr30k", tmp_path / "f" / "dataset.json", split="val")


def test_docci_sentence_level_and_long(tmp_path):
    rows = [
        {
            "example_id": "test_00001",
            "split": "test",
            "image_file": "test_00001.jpg",
            "description": "A red cup sits on a table. Its handle faces left! A spoon lies nearby.",
        },
        {
            "example_id": "train_00001",
            "split": "train",
            "image_file": "train_00001.jpg",
            "description": "Ignored.",
        },
        {
            "example_id": "test_00002",
            "split": "test",
            "image_file": "test_00002.jpg",
            "description": "A blue wall.",
        },
    ]
    (tmp_path / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(r) for r in rows))
    for r in rows:
        _img(tmp_path / "images" / r["image_file"])
    d = _load("docci", tmp_path)
    assert d.texts == [  # the training splitter: the final period stays (FLAIR's released code)
        "A red cup sits on a table.",
        "Its handle faces left!",
        "A spoon lies nearby.",
        "A blue wall.",
    ]
    assert d.text_to_image == [0, 0, 0, 1]
    long = _load("docci", tmp_path, variant="long")
    assert len(long.texts) == 2 and long.texts[0].startswith("A red cup")


def test_iiw_400(tmp_path):
    rows = [
        {"image/key": "aar_test_04600", "IIW": "First. Second one.", "objects": []},
        {"image/key": "aar_test_04601", "IIW": "Only one."},
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for r in rows:
        _img(tmp_path / "images_aar" / f"{r['image/key']}.jpg")
    d = _load("iiw", tmp_path / "data.jsonl")
    assert d.texts == ["First.", "Second one.", "Only one."] and d.text_to_image == [0, 0, 1]


def test_dci_long_captions(tmp_path):
    base = tmp_path / "densely_captioned_images"
    (base / "annotations").mkdir(parents=True)
    splits = {"train": ["a.json"], "test": ["b.json", "c.json"]}
    (base / "splits.json").write_text(json.dumps(splits))
    for n in ("a", "b", "c"):
        ann = {
            "image": f"sa_{n}.jpg",
            "short_caption": f"short {n}.",
            "extra_caption": f"long {n}.",
            "mask_data": {},
            "summaries": {},
        }
        (base / "annotations" / f"{n}.json").write_text(json.dumps(ann))
        _img(base / "photos" / f"sa_{n}.jpg")
    d = _load("dci", tmp_path)
    assert d.texts == ["short b. long b.", "short c. long c."]
    assert len(_load("dci", tmp_path, split="all").images) == 3
    with pytest.raises(ValueError, match="valid: all, train, test"):
        _load("dci", tmp_path, split="val")


def test_urban1k_and_sharegpt4v(tmp_path):
    u = tmp_path / "Urban1k"
    for i in range(3):
        _img(u / "image" / f"{i}.jpg", i)
        (u / "caption").mkdir(exist_ok=True)
        (u / "caption" / f"{i}.txt").write_text(f"long caption {i}\n")
    d = _load("urban1k", u)
    assert d.texts == ["long caption 0", "long caption 1", "long caption 2"]
    (u / "image" / "2.jpg").unlink()
    with pytest.raises(ValueError, match=r"image .*2\.jpg referenced by .*2\.txt"):
        _load("urban1k", u)
    rows = [
        {
            "id": str(i),
            "image": f"coco/train2017/{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": f"A long caption {i}."},
            ],
        }
        for i in range(4)
    ]
    (tmp_path / "share.json").write_text(json.dumps(rows))
    for i in range(4):
        _img(tmp_path / "coco" / "train2017" / f"{i}.jpg")
    s = _load("sharegpt4v", tmp_path / "share.json", limit=3)
    assert s.texts == ["A long caption 0.", "A long caption 1.", "A long caption 2."]


def test_wds_retrieval_and_unknown_dataset(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        for k in range(3):
            sink.write({"__key__": f"k{k}", "jpg": color_image("blue", seed=k), "txt": f"text {k}"})
    d = _load("wds", tmp_path / "s.tar")
    assert d.texts == ["text 0", "text 1", "text 2"] and d.image_ids == ["k0", "k1", "k2"]
    with pytest.raises(ValueError, match="did you mean 'flickr30k'"):
        _load("flickr3k", tmp_path)


def write_voc(root: Path, n: int = 2) -> None:
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = [f"2007_{i:06d}" for i in range(n)]
    for k, i in enumerate(ids):
        color_image("red", seed=k).save(root / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:16, :16] = 15  # person
        mask[16, :] = 255
        im = Image.fromarray(mask, mode="P")
        im.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        im.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids))


def test_voc_palette_masks(tmp_path):
    write_voc(tmp_path)
    d = load_task_data(
        EvalTaskConfig(task="segmentation", dataset="voc", path=str(tmp_path), split="val")
    )
    assert len(d.images) == 2 and d.classnames[14] == "person" and len(d.classnames) == 20
    from finegrain.eval.containers import load_mask

    m = load_mask(d.masks[0])
    assert set(np.unique(m).tolist()) == {0, 15, 255}
    (tmp_path / "JPEGImages" / "2007_000001.jpg").unlink()
    with pytest.raises(ValueError, match=r"2007_000001\.jpg referenced by .*val\.txt"):
        load_task_data(
            EvalTaskConfig(task="segmentation", dataset="voc", path=str(tmp_path), split="val")
        )

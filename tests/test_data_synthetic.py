"""The synthetic scenes: determinism, ground-truth consistency, novel concepts, eval splits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from finegrain.data.config import SyntheticConfig
from finegrain.data.synthetic import (
    ALL_SHAPES,
    COLORS,
    DESCRIPTIONS,
    NOVEL_SHAPES,
    PATTERNS,
    SHAPES,
    generate_scene,
    position_words,
)
from finegrain.data.synthetic_sets import EVAL_KINDS, SyntheticScenes, eval_split

TEXT_KEYS = ("caption", "captions", "long_caption", "sentences", "regions")


def _texts(scene: dict) -> list[str]:
    out = [scene["caption"], scene["long_caption"], *scene["captions"], *scene["sentences"]]
    return out + [r["text"] for r in scene["regions"]]


def test_vocabulary_sizes() -> None:
    assert len(SHAPES) >= 12 and 3 <= len(NOVEL_SHAPES) <= 4 and len(COLORS) >= 8
    assert PATTERNS == ("solid", "striped", "dotted", "checkered")
    assert not set(SHAPES) & set(NOVEL_SHAPES)
    for name, descs in DESCRIPTIONS.items():
        assert descs and all(d.startswith("a shape") for d in descs), name
        # descriptions must never leak a novel name (they are the only training text for them)
        assert not any(n in d for d in descs for n in NOVEL_SHAPES), name


def test_deterministic_from_seed() -> None:
    a, b, c = generate_scene(5), generate_scene(5), generate_scene(6)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert all(a[k] == b[k] for k in TEXT_KEYS)
    assert np.array_equal(a["instance_mask"], b["instance_mask"])
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))


@pytest.mark.parametrize("size", [64, 96])
def test_boxes_masks_and_text_agree(size: int) -> None:
    for seed in range(40):
        s = generate_scene(seed, size)
        objs, inst, sem = s["objects"], s["instance_mask"], s["semantic_mask"]
        assert s["image"].size == (size, size) and inst.shape == (size, size)
        assert 1 <= len(objs) <= 4 and inst.max() == len(objs)
        assert len(s["sentences"]) == len(objs) + 1  # one per object + background
        assert s["long_caption"] == " ".join(s["sentences"])
        for i, o in enumerate(objs):
            ys, xs = np.nonzero(inst == i + 1)
            expect = [
                xs.min() / size,
                ys.min() / size,
                (xs.max() + 1) / size,
                (ys.max() + 1) / size,
            ]
            assert np.allclose(o["box"], expect), (seed, i)
            assert (sem[inst == i + 1] == 1 + ALL_SHAPES.index(o["shape"])).all()
            assert position_words(o["box"]) in s["sentences"][i].lower()
            assert o["color"] in s["sentences"][i] and o["pattern"] in s["sentences"][i]
        assert (sem[inst == 0] == 0).all()
        assert [r["box"] for r in s["regions"]] == [o["box"] for o in objs]
        largest = max(objs, key=lambda o: (inst == objs.index(o) + 1).sum())
        assert s["label"] == ALL_SHAPES.index(largest["shape"])


def test_object_pixels_have_object_colour() -> None:
    s = generate_scene(3, 64, objects=[{"shape": "square", "color": "red", "pattern": "solid"}],
                       num_objects=1)  # fmt: skip
    img = np.asarray(s["image"]).astype(int)
    px = img[s["instance_mask"] == 1]
    assert (px[:, 0] > 180).all() and (px[:, 1] < 70).all() and (px[:, 2] < 70).all()


def test_position_words() -> None:
    assert position_words([0.0, 0.0, 0.2, 0.2]) == "at the top left"
    assert position_words([0.8, 0.4, 1.0, 0.6]) == "on the right"
    assert position_words([0.4, 0.8, 0.6, 1.0]) == "at the bottom"
    assert position_words([0.4, 0.4, 0.6, 0.6]) == "in the center"


def test_novel_shapes_never_named_in_training_text() -> None:
    cfg = SyntheticConfig(num_samples=120, novel_object_prob=0.5)
    ds = SyntheticScenes(cfg, image_size=32)
    described = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        text = " ".join(_texts(scene)).lower()
        for n in NOVEL_SHAPES:
            assert not re.search(rf"\b{n}", text), (i, n, text)
        for o in scene["objects"]:
            if o["shape"] in NOVEL_SHAPES:
                described += 1
                assert o["description"][2:] in scene["long_caption"]
    assert described > 20, "novel objects should occur (described by appearance) in training"


def test_region_noise_options() -> None:
    cfg = SyntheticConfig(box_jitter=0.2, drop_region_prob=0.5, min_objects=4, max_objects=4)
    kept = 0
    for seed in range(30):
        s = generate_scene(seed, 64, cfg=cfg)
        kept += len(s["regions"])
        for r in s["regions"]:
            x0, y0, x1, y1 = r["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and 0.5 <= r["score"] <= 1
    assert 0.25 * 120 < kept < 0.75 * 120


def test_training_sample_schema() -> None:
    ds = SyntheticScenes(SyntheticConfig(num_samples=4), image_size=32)
    s = ds[1]
    assert s["image"].shape == (3, 32, 32) and isinstance(s["seed"], int)
    assert s["sentences"] and s["captions"] and s["caption"] and s["label"] >= 0
    assert all(len(r["box"]) == 4 for r in s["regions"])


@pytest.mark.parametrize("kind", EVAL_KINDS)
def test_eval_splits(kind: str) -> None:
    d = eval_split(kind, 12, image_size=32)
    assert len(d["images"]) == 12
    if "labels" in d:
        assert len(d["labels"]) == 12 and max(d["labels"]) < len(d["classnames"])
        assert set(d["descriptions"]) == set(d["classnames"])
    if kind == "novel":
        assert d["classnames"] == list(NOVEL_SHAPES)
    if kind == "color_shape":
        assert len(d["classnames"]) == len(COLORS) * len(SHAPES)
    if "texts" in d:
        assert len(d["texts"]) == len(d["text_to_image"]) == sum(map(len, d["captions"]))
        assert max(d["text_to_image"]) == 11
    if kind == "segmentation":
        assert all(m.shape == (32, 32) and m.max() <= len(d["classnames"]) for m in d["masks"])


def test_eval_images_differ_from_training() -> None:
    train = {np.asarray(SyntheticScenes(SyntheticConfig(num_samples=50), 32).scene(i)["image"])
             .tobytes() for i in range(50)}  # fmt: skip
    evals = {
        np.asarray(im).tobytes() for im in eval_split("retrieval", 50, image_size=32)["images"]
    }
    assert not train & evals


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="valid choices"):
        eval_split("nope", 3)
    with pytest.raises(ValueError, match="min_objects"):
        generate_scene(0, cfg=SyntheticConfig(min_objects=3, max_objects=2))

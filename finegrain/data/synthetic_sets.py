"""Synthetic scenes as a training dataset and as evaluation splits.

Training scene ``i`` uses seed ``mix_seed("synthetic-train", cfg.seed, i)``; evaluation image
``i`` of split ``kind`` uses ``mix_seed("synthetic-eval", kind, seed, i)``: different hash tags,
so evaluation images are never training images.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from finegrain.data.config import SyntheticConfig
from finegrain.data.schema import mix_seed
from finegrain.data.synthetic import (
    ALL_SHAPES,
    COLORS,
    DESCRIPTIONS,
    NOVEL_SHAPES,
    PATTERNS,
    SHAPES,
    SIZES,
    generate_scene,
    join_phrases,
    object_phrase,
    scene_record,
)
from finegrain.data.synthetic_spurious import spurious_split, training_scene
from finegrain.data.transforms import BoxTransform

EVAL_KINDS = (
    "shape",
    "color_shape",
    "pattern_shape",
    "novel",
    "retrieval",
    "sentences",
    "long",
    "segmentation",
    "regions",
    "spurious",
)


_MEMOS: list[dict[Any, Any]] = []


@contextmanager
def memo_scenes() -> Iterator[dict[Any, Any]]:
    """Keep every rendered scene made inside (training scenes' ``raw`` and ``eval_split``
    results, keyed by everything they depend on) and hand the kept one back when the same scene
    is asked for again. Scenes are deterministic in their seed, so this only saves rendering:
    ``finegrain demo`` trains and evaluates several methods on the same scenes. Loader worker
    processes forked inside see what the main process had kept before they started."""
    memo: dict[Any, Any] = {}
    _MEMOS.append(memo)
    try:
        yield memo
    finally:
        _MEMOS.remove(memo)


def _memo(key: Any, make: Callable[[], dict[str, Any]], deep: bool = True) -> dict[str, Any]:
    """The kept copy of ``make()``: deep-copied (callers may change what they get), or with
    ``deep=False`` a new dict whose ``record`` is copied (a training scene's PIL image is
    only read)."""
    if not _MEMOS:
        return make()
    memo = _MEMOS[-1]
    if key not in memo:
        memo[key] = make()
    kept = memo[key]
    if deep:
        return copy.deepcopy(kept)
    return {**kept, "record": copy.deepcopy(kept["record"])}


class SyntheticScenes(Dataset):
    """Training scenes as schema samples (see ``docs/CONTRACTS.md``).

    ``sample(index, seed)`` applies ``transform`` with randomness from ``seed``;
    ``__getitem__(index)`` uses ``mix_seed(cfg.seed, index)``. Novel shapes are only ever
    described by appearance in the text of these samples.
    """

    def __init__(
        self,
        cfg: SyntheticConfig | None = None,
        image_size: int = 64,
        transform: BoxTransform | None = None,
        with_mask: bool = False,
    ) -> None:
        self.cfg = cfg or SyntheticConfig()
        self.image_size = image_size
        self.transform = transform or BoxTransform(size=image_size, mode="center")
        self.with_mask = with_mask

    def __len__(self) -> int:
        return self.cfg.num_samples

    def scene(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"scene {index} out of range for {len(self)} scenes")
        return training_scene(self.cfg, index, self.image_size)

    def raw(self, index: int) -> dict[str, Any]:
        """Undecoded form used by the loader: key, PIL image, JSON record, semantic mask."""
        key = ("train", repr(self.cfg), self.image_size, self.with_mask, index)
        return _memo(key, lambda: self._raw(index), deep=False)

    def _raw(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        return {
            "key": f"synthetic-{self.cfg.seed}-{index:08d}",
            "image": scene["image"],
            "record": scene_record(scene),
            "mask": scene["semantic_mask"] if self.with_mask else None,
        }

    def sample(self, index: int, seed: int) -> dict[str, Any]:
        from finegrain.data.sources import make_sample

        return make_sample(self.raw(index), self.transform, seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, mix_seed(self.cfg.seed, index))


def _eval_seed(kind: str, seed: int, i: int) -> int:
    return mix_seed("synthetic-eval", kind, seed, i)


def _single(kind: str, num: int, seed: int, image_size: int) -> dict[str, Any]:
    """Single-object classification over shape / colour+shape / pattern+shape / novel shape."""
    shapes = NOVEL_SHAPES if kind == "novel" else SHAPES
    if kind in ("shape", "novel"):
        classes = [(s,) for s in shapes]
        classnames = list(shapes)
    elif kind == "color_shape":
        classes = [(c, s) for c in COLORS for s in shapes]
        classnames = [f"{c} {s}" for c, s in classes]
    else:
        classes = [(p, s) for p in PATTERNS for s in shapes]
        classnames = [f"{p} {s}" for p, s in classes]
    images, labels = [], []
    for i in range(num):
        s = _eval_seed(kind, seed, i)
        label = random.Random(s).randrange(len(classes))
        spec: dict[str, Any] = {"shape": classes[label][-1], "size": "large"}
        if kind == "color_shape":
            spec["color"] = classes[label][0]
        if kind == "pattern_shape":
            spec["pattern"] = classes[label][0]
        scene = generate_scene(s, image_size, num_objects=1, objects=[spec], novel=kind == "novel")
        images.append(scene["image"])
        labels.append(label)
    descriptions = {}
    for name, cls in zip(classnames, classes):
        prefix = " ".join(cls[:-1])
        descriptions[name] = [f"a {prefix} {d[2:]}" if prefix else d for d in DESCRIPTIONS[cls[-1]]]
    return {
        "images": images,
        "labels": labels,
        "classnames": classnames,
        "descriptions": descriptions,
    }


def _texts(kind: str, num: int, seed: int, image_size: int) -> dict[str, Any]:
    """Retrieval splits: short captions, per-object sentences or long captions."""
    images, captions, texts, text_to_image = [], [], [], []
    cfg = SyntheticConfig(min_objects=2 if kind == "sentences" else 1, novel_object_prob=0.0)
    for i in range(num):
        scene = generate_scene(_eval_seed(kind, seed, i), image_size, cfg=cfg)
        images.append(scene["image"])
        if kind == "retrieval":  # the clean caption + a paraphrase (sizes, reversed order)
            sized = [object_phrase(o, pattern=False) for o in reversed(scene["objects"])]
            caps = [*scene["captions"], join_phrases(sized)]
        elif kind == "long":
            caps = [scene["long_caption"]]
        else:  # one query per object sentence; the background sentence is shared by many images
            caps = scene["sentences"][:-1]
        captions.append(caps)
        texts.extend(caps)
        text_to_image.extend([i] * len(caps))
    return {"images": images, "captions": captions, "texts": texts, "text_to_image": text_to_image}


def _segmentation(num: int, seed: int, image_size: int) -> dict[str, Any]:
    cfg = SyntheticConfig(novel_object_prob=0.0)
    images, masks, instances, colors, boxes = [], [], [], [], []
    for i in range(num):
        scene = generate_scene(_eval_seed("segmentation", seed, i), image_size, cfg=cfg)
        images.append(scene["image"])
        masks.append(scene["semantic_mask"].astype(np.int64))
        inst = scene["instance_mask"].astype(np.int64)
        instances.append(inst)
        by_color = np.zeros_like(inst)  # 0 = background, 1 + COLORS index of the object
        for j, obj in enumerate(scene["objects"]):
            by_color[inst == j + 1] = 1 + COLORS.index(obj["color"])
        colors.append(by_color)
        boxes.append([list(o["box"]) for o in scene["objects"]])  # exact, normalised xyxy
    # mask value v > 0 is classnames[v - 1]; novel shapes do not occur in these scenes
    return {
        "images": images,
        "masks": masks,
        "instance_masks": instances,
        "boxes": boxes,
        "classnames": list(ALL_SHAPES),
        "color_masks": colors,
        "color_classnames": list(COLORS),
    }


def _region_scenes(num: int, seed: int, image_size: int) -> dict[str, Any]:
    """Multi-object scenes with every object's exact box and attributes (region classification):
    per image ``boxes`` (pixel xyxy), ``shapes`` / ``colors`` (indices into ``SHAPES`` /
    ``COLORS``) and the instance mask (object j is value j + 1)."""
    cfg = SyntheticConfig(novel_object_prob=0.0)
    images, boxes, shapes, colors, instances = [], [], [], [], []
    for i in range(num):
        scene = generate_scene(_eval_seed("regions", seed, i), image_size, cfg=cfg)
        images.append(scene["image"])
        boxes.append([[v * image_size for v in o["box"]] for o in scene["objects"]])
        shapes.append([SHAPES.index(o["shape"]) for o in scene["objects"]])
        colors.append([COLORS.index(o["color"]) for o in scene["objects"]])
        instances.append(scene["instance_mask"].astype(np.int64))
    return {
        "images": images,
        "boxes": boxes,
        "shapes": shapes,
        "colors": colors,
        "instance_masks": instances,
        "classnames": list(SHAPES),
        "color_classnames": list(COLORS),
        "descriptions": {s: list(DESCRIPTIONS[s]) for s in SHAPES},
    }


def eval_split(kind: str, num: int, seed: int = 10_000, image_size: int = 64) -> dict[str, Any]:
    """Evaluation data from seeds disjoint from training.

    kinds: ``shape`` | ``color_shape`` | ``pattern_shape`` | ``novel`` -> images, labels,
    classnames, descriptions; ``retrieval`` | ``sentences`` | ``long`` -> images, captions (list
    of lists), texts, text_to_image; ``segmentation`` -> images, masks (HxW, 0 = background,
    v = classnames[v - 1]), instance_masks (HxW, 0 = background, i = object i), boxes (per
    image, the objects' normalised xyxy boxes), classnames, color_masks (HxW, v =
    color_classnames[v - 1]: objects labelled by colour), color_classnames; ``regions`` ->
    images, boxes (per image, pixel xyxy), shapes / colors (per image, per object class
    indices), instance_masks, classnames (shapes), color_classnames, descriptions;
    ``spurious`` -> images, labels, tones, groups (class x background tone, balanced),
    classnames, group_names, descriptions (``finegrain.data.synthetic_spurious``).
    """
    if kind not in EVAL_KINDS:
        raise ValueError(
            f"unknown synthetic split '{kind}'; valid choices: {', '.join(EVAL_KINDS)}"
        )
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    return _memo(
        ("eval", kind, num, seed, image_size), lambda: _eval_split(kind, num, seed, image_size)
    )


def _eval_split(kind: str, num: int, seed: int, image_size: int) -> dict[str, Any]:
    if kind in ("shape", "color_shape", "pattern_shape", "novel"):
        return _single(kind, num, seed, image_size)
    if kind == "segmentation":
        return _segmentation(num, seed, image_size)
    if kind == "regions":
        return _region_scenes(num, seed, image_size)
    if kind == "spurious":
        return spurious_split(num, lambda i: _eval_seed("spurious", seed, i), image_size)
    return _texts(kind, num, seed, image_size)


__all__ = ["EVAL_KINDS", "SIZES", "SyntheticScenes", "eval_split", "memo_scenes"]

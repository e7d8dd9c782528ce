"""Containers for evaluation data (images as paths or PIL images, masks, texts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ImageItem = Image.Image | Path


@dataclass
class ClassificationData:
    images: list[ImageItem]
    labels: list[int]
    classnames: list[str]
    descriptions: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.labels), "one label per image"
        if not self.classnames:
            raise ValueError("classification dataset has no classes")
        bad = [y for y in self.labels if not 0 <= y < len(self.classnames)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} outside 0..{len(self.classnames) - 1}")


@dataclass
class RetrievalData:
    """``texts[j]`` describes ``images[text_to_image[j]]``; an image may have several texts."""

    images: list[ImageItem]
    texts: list[str]
    text_to_image: list[int]
    image_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.texts) == len(self.text_to_image), "one image index per text"
        if not self.images or not self.texts:
            raise ValueError("retrieval dataset is empty (no images or no texts)")
        bad = [i for i in self.text_to_image if not 0 <= i < len(self.images)]
        assert not bad, f"text_to_image holds indices outside the images: {bad[:5]}"
        without = sorted(set(range(len(self.images))) - set(self.text_to_image))
        if without:
            raise ValueError(f"{len(without)} images have no text, e.g. image #{without[0]}")


@dataclass
class SegmentationData:
    """``masks[i]``: (H, W) ints, 0 = background, 1 + c = class c, 255 = ignore."""

    images: list[ImageItem]
    masks: list[np.ndarray | Path]
    classnames: list[str]

    def __post_init__(self) -> None:
        assert len(self.images) == len(self.masks), "one mask per image"
        if not self.classnames:
            raise ValueError("segmentation dataset has no classes")


def load_image(item: ImageItem) -> Image.Image:
    """An RGB PIL image from a path or a PIL image."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as im:
        return im.convert("RGB")


@dataclass(frozen=True)
class MappedMask:
    """A mask file whose stored labels map to finegrain's through ``lut`` (256,) on loading
    (COCO-Stuff train ids, ADE20K's 0 = ignore; ``finegrain.eval.seg_formats``)."""

    path: Path
    lut: np.ndarray

    def load(self) -> np.ndarray:
        raw = load_mask(self.path)
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise ValueError(f"mask {self.path} has labels outside 0..255")
        return self.lut[raw]


def load_mask(item: np.ndarray | Path | MappedMask) -> np.ndarray:
    """A (H, W) int64 label mask from an array or a palette/grayscale PNG (indices, not colours)."""
    if isinstance(item, np.ndarray):
        return item.astype(np.int64)
    if isinstance(item, MappedMask):
        return item.load()
    with Image.open(item) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"mask {item} has mode {im.mode}; expected a palette or grayscale PNG of class indices"
            )
        return np.array(im).astype(np.int64)

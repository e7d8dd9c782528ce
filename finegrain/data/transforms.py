"""Box-aware image transforms for training and evaluation.

Every transform is one crop rectangle in source pixels followed by a resize to ``size x size``
(PIL's ``resize(box=...)`` does both at once) and an optional horizontal flip. Region boxes
``[x0, y0, x1, y1]`` (normalised to the source image) are mapped through the same rectangle and
flip, clipped into the output, and dropped when less than ``min_visible`` of their area
survives the crop. Masks use nearest-neighbour interpolation. All randomness comes from the
``random.Random`` passed in (seeded per sample), so results are reproducible.

Modes: ``rrc`` random resized crop (area fraction ``crop_scale``, aspect 3/4..4/3, as
torchvision's ``RandomResizedCrop``); ``squash`` resize the whole image to a square without
cropping (GRAIN, Halbe et al., keeps all annotated boxes); ``none`` / ``center`` resize the short
side and take the centre square (``resize_center_crop``, the CLIP evaluation transform, identical
to torchvision's Resize + CenterCrop; ``eval_transform`` is the one evaluation transform).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from finegrain.data.config import DataConfig

MODES = ("rrc", "squash", "none", "center")


@dataclass
class BoxTransform:
    """Crop/resize/flip an image with its region boxes and optional mask, then normalise."""

    size: int
    mode: str = "center"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_visible: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown augment '{self.mode}'; valid choices: {', '.join(MODES)}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def crop_rect(
        self, width: int, height: int, rng: random.Random
    ) -> tuple[float, float, float, float]:
        """(left, top, crop_w, crop_h) in source pixels."""
        if self.mode == "squash":
            return 0.0, 0.0, float(width), float(height)
        if self.mode == "rrc":
            area = width * height
            log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            for _ in range(10):
                target = area * rng.uniform(*self.crop_scale)
                aspect = math.exp(rng.uniform(log_lo, log_hi))
                w = int(round(math.sqrt(target * aspect)))
                h = int(round(math.sqrt(target / aspect)))
                if 0 < w <= width and 0 < h <= height:
                    top = rng.randint(0, height - h)
                    left = rng.randint(0, width - w)
                    return float(left), float(top), float(w), float(h)
        side = min(width, height)  # centre square (eval, and rrc's fallback)
        return (width - side) / 2, (height - side) / 2, float(side), float(side)

    def apply(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]] | None = None,
        rng: random.Random | None = None,
        mask: np.ndarray | None = None,
    ) -> Transformed:
        """Crop/resize/flip ``image`` with its regions and mask; see ``Transformed``."""
        rng = rng or random.Random(0)
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        if self.mode in ("center", "none"):  # the one eval transform: exactly CLIP's
            out, (left, top, cw, ch) = resize_center_crop(image, self.size)
        else:
            left, top, cw, ch = self.crop_rect(width, height, rng)
            out = image.resize(
                (self.size, self.size), Image.BICUBIC, box=(left, top, left + cw, top + ch)
            )
        flip = self.hflip and rng.random() < 0.5
        pil_box = (left, top, left + cw, top + ch)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        arr = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1)  # (3, S, S) uint8
        tensor = (arr.float().div_(255.0) - self._mean) / self._std
        moved = move_regions(regions or [], (left, top, cw, ch), (width, height), flip,
                             self.min_visible)  # fmt: skip
        mask_t = None
        if mask is not None:
            assert mask.shape == (height, width), (
                f"mask {mask.shape} does not match image {(height, width)}"
            )
            m = Image.fromarray(mask.astype(np.int32), mode="I")
            m = m.resize((self.size, self.size), Image.NEAREST, box=pil_box)
            if flip:
                m = m.transpose(Image.FLIP_LEFT_RIGHT)
            mask_t = torch.from_numpy(np.asarray(m).astype(np.int64))
        return Transformed(tensor, moved, mask_t, flip)

    def __call__(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]] | None = None,
        rng: random.Random | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, Any]], torch.Tensor | None]:
        """(image (3, S, S) normalised, regions moved into the output, mask (S, S) or None)."""
        t = self.apply(image, regions, rng, mask)
        return t.image, t.regions, t.mask


def resize_center_crop(
    image: Image.Image, size: int
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """CLIP's evaluation preprocessing, pixel for pixel as torchvision's
    ``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` on a PIL image (what OpenCLIP evaluates
    with): bicubic resize of the short side to ``size``, then the centre ``size x size``
    crop. Returns the crop and its rectangle (left, top, w, h) in source pixels (for boxes)."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    out = image.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size))
    sx, sy = width / new_w, height / new_h
    return out, (left * sx, top * sy, size * sx, size * sy)


@dataclass
class Transformed:
    """Result of ``BoxTransform.apply``; ``flipped`` tells callers to mirror text too."""

    image: torch.Tensor  # (3, S, S)
    regions: list[dict[str, Any]]
    mask: torch.Tensor | None  # (S, S)
    flipped: bool


_LR = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT",
         "RIGHT": "LEFT"}  # fmt: skip


def swap_left_right(text: str) -> str:
    """Mirror the words 'left' and 'right' (for captions of horizontally flipped images)."""
    return _LR.sub(lambda m: _SWAP[m.group(1)], text)


def move_regions(
    regions: list[dict[str, Any]],
    rect: tuple[float, float, float, float],
    image_wh: tuple[int, int],
    flip: bool,
    min_visible: float,
) -> list[dict[str, Any]]:
    """Map normalised boxes through a crop rectangle (+ flip); drop mostly-cut-out boxes."""
    left, top, cw, ch = rect
    width, height = image_wh
    out = []
    for r in regions:
        x0, y0, x1, y1 = r["box"]
        px0, py0, px1, py1 = x0 * width, y0 * height, x1 * width, y1 * height
        ix0, iy0 = max(px0, left), max(py0, top)
        ix1, iy1 = min(px1, left + cw), min(py1, top + ch)
        area = (px1 - px0) * (py1 - py0)
        if ix1 <= ix0 or iy1 <= iy0 or area <= 0:
            continue
        if (ix1 - ix0) * (iy1 - iy0) < min_visible * area:
            continue
        nx0, nx1 = (ix0 - left) / cw, (ix1 - left) / cw
        ny0, ny1 = (iy0 - top) / ch, (iy1 - top) / ch
        if flip:
            nx0, nx1 = 1.0 - nx1, 1.0 - nx0
        box = [min(max(v, 0.0), 1.0) for v in (nx0, ny0, nx1, ny1)]
        out.append({**r, "box": box})
    return out


def train_transform(cfg: DataConfig) -> BoxTransform:
    """The training transform of ``cfg.augment`` (rrc | squash | none)."""
    mode = "center" if cfg.augment == "none" else cfg.augment
    if cfg.augment not in ("rrc", "squash", "none"):
        raise ValueError(f"unknown augment '{cfg.augment}'; valid choices: none, rrc, squash")
    return BoxTransform(
        size=cfg.image_size, mode=mode, crop_scale=tuple(cfg.crop_scale), hflip=cfg.hflip,
        mean=tuple(cfg.mean), std=tuple(cfg.std), min_visible=cfg.min_box_visible,
    )  # fmt: skip


def eval_transform(cfg: DataConfig, squash: bool = False) -> BoxTransform:
    """Resize + centre crop (or squash), no randomness."""
    return BoxTransform(
        size=cfg.image_size, mode="squash" if squash else "center", mean=tuple(cfg.mean),
        std=tuple(cfg.std), min_visible=cfg.min_box_visible,
    )  # fmt: skip

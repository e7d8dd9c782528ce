"""Box-aware image transforms for training and evaluation.

Every transform is one crop rectangle in source pixels followed by a resize to ``size x size``
(PIL's ``resize(box=...)`` does both at once) and an optional horizontal flip. Region boxes
``[x0, y0, x1, y1]`` (normalised to the source image) are mapped through the same rectangle and
flip, clipped into the output, and dropped when less than ``min_visible`` of their area
survives the crop. Masks use nearest-neighbour interpolation. All randomness comes from
per-stage streams of the sample seed (``finegrain.data.schema.sample_rng``: ``"crop"``,
``"flip"``, ``"view<i>"``), so results are reproducible and one stage never shifts another.

The loader calls ``transform.for_sample(image, regions, seed, mask) -> Transformed``; a method
chooses its transform with ``Method.make_transform``. ``MultiViewTransform`` adds extra views
(``ViewAugment``: random resized crop, flip, colour jitter, grayscale, gaussian blur, solarize,
as in DINO/iBOT's global crops), each from its own stream and each moving its own boxes.

Modes: ``rrc`` random resized crop (area fraction ``crop_scale``, aspect 3/4..4/3, as
torchvision's ``RandomResizedCrop``); ``squash`` resize the whole image to a square without
cropping (GRAIN, Halbe et al., keeps all annotated boxes); ``none`` / ``center`` resize the short
side and take the centre square (the CLIP evaluation transform).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from finegrain.data.config import DataConfig
from finegrain.data.schema import sample_rng

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
        *,
        flip_rng: random.Random | None = None,
    ) -> Transformed:
        """Crop/resize/flip ``image`` with its regions and mask; see ``Transformed``. The crop
        draws from ``rng``, the flip from ``flip_rng`` (default: ``rng`` too)."""
        rng = rng or random.Random(0)
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        left, top, cw, ch = self.crop_rect(width, height, rng)
        flip = self.hflip and (flip_rng or rng).random() < 0.5
        pil_box = (left, top, left + cw, top + ch)
        out = image.resize((self.size, self.size), Image.BICUBIC, box=pil_box)
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

    def for_sample(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]] | None,
        seed: int,
        mask: np.ndarray | None = None,
    ) -> Transformed:
        """The loader's entry point: crop from stream ``"crop"``, flip from ``"flip"``."""
        return self.apply(image, regions, sample_rng(seed, "crop"), mask,
                          flip_rng=sample_rng(seed, "flip"))  # fmt: skip

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


@dataclass
class Transformed:
    """Result of a transform; ``flipped`` tells callers to mirror text too. ``views`` /
    ``view_regions`` are set by multi-view transforms (one entry per extra view)."""

    image: torch.Tensor  # (3, S, S)
    regions: list[dict[str, Any]]
    mask: torch.Tensor | None  # (S, S)
    flipped: bool
    views: list[torch.Tensor] | None = None  # V x (3, S_v, S_v)
    view_regions: list[list[dict[str, Any]]] | None = None


class SampleTransform(Protocol):
    """What ``Method.make_transform`` returns and the loader calls once per sample."""

    def for_sample(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]] | None,
        seed: int,
        mask: np.ndarray | None = None,
    ) -> Transformed: ...


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


# ---- extra views (DetailCLIP / DINO-style global crops) -------------------------------------
def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ViewAugment.{name} must be a probability in [0, 1], got {p}")


@dataclass
class ViewAugment:
    """One augmented view: random resized crop (area ``crop_scale``), optional flip, then, each
    with its probability, colour jitter (brightness/contrast/saturation/hue factors drawn as
    torchvision's ``ColorJitter``, applied in a random order), grayscale, gaussian blur (sigma
    in pixels of the output, uniform in ``blur_sigma``) and solarize (threshold 0.5), as the
    global crops of DINO (Caron et al. 2021) / iBOT that DetailCLIP reuses. Defaults: DINO's
    first global crop without blur."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            _check_prob(name, getattr(self, name))
        if min(self.brightness, self.contrast, self.saturation) < 0 or not 0 <= self.hue <= 0.5:
            raise ValueError("ViewAugment: brightness/contrast/saturation must be >= 0 and "
                             f"hue in [0, 0.5], got {self}")  # fmt: skip
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"ViewAugment.blur_sigma must be 0 < lo <= hi, got {self.blur_sigma}")
        BoxTransform(self.size, "rrc", tuple(self.crop_scale), tuple(self.ratio))  # validates

    def apply(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]],
        rng: random.Random,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        min_visible: float,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """(view (3, S, S) normalised, regions moved into the view); every draw from ``rng``."""
        crop = BoxTransform(self.size, "rrc", tuple(self.crop_scale), tuple(self.ratio),
                            self.hflip, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), min_visible)  # fmt: skip
        out = crop.apply(image, regions, rng)  # (3, S, S) in [0, 1]
        x = self.photometric(out.image, rng)
        x = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        moved = out.regions
        if out.flipped:
            moved = [{**r, "text": swap_left_right(r.get("text", ""))} for r in moved]
        return x, moved

    def photometric(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Colour jitter, grayscale, blur, solarize on a (3, S, S) image in [0, 1]."""
        import torchvision.transforms.v2.functional as TF

        if rng.random() < self.jitter_prob:
            ops = [
                (TF.adjust_brightness, rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness)),
                (TF.adjust_contrast, rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast)),
                (TF.adjust_saturation, rng.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation)),
                (TF.adjust_hue, rng.uniform(-self.hue, self.hue)),
            ]  # fmt: skip
            for i in rng.sample(range(4), 4):  # random order, as ColorJitter
                fn, factor = ops[i]
                x = fn(x, factor)
        if rng.random() < self.grayscale_prob:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if rng.random() < self.blur_prob:
            sigma = rng.uniform(*self.blur_sigma)
            k = min(2 * math.ceil(3 * sigma) + 1, self.size - (1 - self.size % 2))  # odd, <= S
            x = TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])
        if rng.random() < self.solarize_prob:
            x = TF.solarize(x, threshold=0.5)
        return x.clamp(0.0, 1.0)


@dataclass
class MultiViewTransform:
    """``base`` makes the sample's ``image`` (and moves its regions/mask, as ever); each
    ``ViewAugment`` in ``views`` makes one extra view of the *source* image from stream
    ``"view<i>"``, with its own boxes. Text is mirrored only for the ``image``'s flip (views
    are for image-only objectives); ``view_regions`` texts follow each view's own flip."""

    base: BoxTransform
    views: list[ViewAugment] = field(default_factory=list)

    def for_sample(
        self,
        image: Image.Image,
        regions: list[dict[str, Any]] | None,
        seed: int,
        mask: np.ndarray | None = None,
    ) -> Transformed:
        out = self.base.for_sample(image, regions, seed, mask)
        if image.mode != "RGB":
            image = image.convert("RGB")
        made = [
            v.apply(
                image,
                regions or [],
                sample_rng(seed, f"view{i}"),
                self.base.mean,
                self.base.std,
                self.base.min_visible,
            )  # fmt: skip
            for i, v in enumerate(self.views)
        ]
        return replace(out, views=[m[0] for m in made], view_regions=[m[1] for m in made])


def multi_view_transform(cfg: DataConfig, views: list[ViewAugment]) -> MultiViewTransform:
    """``train_transform(cfg)`` for the ``image`` plus ``views`` (normalised with cfg's mean/std)."""
    if not views:
        raise ValueError("multi_view_transform needs at least one ViewAugment")
    return MultiViewTransform(train_transform(cfg), list(views))

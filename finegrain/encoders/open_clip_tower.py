"""open_clip towers (``ViT-B-16``, ``ViT-B-32``, ...) as finegrain towers returning tokens.

Built with ``open_clip.create_model(cfg.model, pretrained=<local file or None>,
force_image_size=..., force_context_length=...)``; no hub access. We run the tower's own
modules ourselves so that we get *all* patch tokens after ``ln_post`` and the CLS token before
open_clip's projection (methods add their own projection; the pretrained one is kept as
``tower.pretrained_proj`` (D_out, D) so a method can initialise from it). Position embeddings
are resampled (bicubic) for other image sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.data.tokenizers import ClipTokenizer
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.encoders.vit import freeze_except_last, resample_pos_embed
from finegrain.outputs import TextOutput, VisionOutput
from finegrain.registry import IMAGE_TOWERS, TEXT_TOWERS, suggest


def create_open_clip(name: str, pretrained: str = "", **kwargs: Any) -> nn.Module:
    """``open_clip.create_model`` with a clear error for unknown names and local weights only."""
    import open_clip

    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():  # a model config file (finegrain.interop)
        open_clip.add_model_config(path)
        name = path.stem
    names = open_clip.list_models()
    if name.startswith("local-dir:"):  # an OpenCLIP folder: its own config and weights
        pretrained = ""
    elif name not in names:
        raise ValueError(
            f"unknown open_clip model '{name}'{suggest(name, names)}; e.g. ViT-B-16, ViT-B-32"
        )
    if pretrained and not Path(pretrained).expanduser().is_file():
        raise ValueError(f"open_clip weights must be a local file, not found: {pretrained}")
    with _quiet_random_init():
        return open_clip.create_model(name, pretrained=pretrained or None, **kwargs)


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Random init is expected here (weights are loaded by finegrain afterwards): drop open_clip's
    root-logger warning about it, and nothing else."""
    f = _DropRandomInitWarning()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


class OpenCLIPVision(nn.Module):
    """The ViT image tower of an open_clip model."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        model = create_open_clip(
            cfg.model,
            cfg.pretrained,
            force_image_size=cfg.image_size,
            force_patch_dropout=cfg.patch_dropout or None,
        )
        v = model.visual
        if not hasattr(v, "conv1") or v.attn_pool is not None or v.final_ln_after_pool:
            raise ValueError(
                f"open_clip model '{cfg.model}' has an unsupported image tower "
                f"({type(v).__name__}); supported: plain ViT towers such as ViT-B-16, ViT-B-32"
            )
        self.visual = v
        self.width = int(v.transformer.width)
        self.patch_size = tuple(v.patch_size)
        if cfg.image_size % self.patch_size[0]:
            raise ValueError(
                f"image_size {cfg.image_size} is not divisible by patch size {self.patch_size[0]}"
            )
        self.pretrained_proj = v.proj.detach().t().clone() if v.proj is not None else None  # (E, D)
        v.proj = None
        v.transformer.grad_checkpointing = cfg.grad_checkpointing
        freeze_except_last(self, v.transformer.resblocks, cfg.trainable_blocks, [v.ln_post])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> VisionOutput:
        v = self.visual
        ph, pw = self.patch_size
        if images.shape[-2] % ph or images.shape[-1] % pw:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by patch {ph}"
            )
        x = v.conv1(images)  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1)  # (B, 1 + N, D)
        x = x + resample_pos_embed(v.positional_embedding[None], grid).to(x.dtype)
        x = v.patch_dropout(x)  # identity in eval; keeps the CLS token
        if x.shape[1] - 1 != grid[0] * grid[1]:
            grid = (1, x.shape[1] - 1)
        x = v.ln_post(v.transformer(v.ln_pre(x)))  # (B, 1 + N, D)
        pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(1)
        return VisionOutput(pooled=pooled, tokens=x[:, 1:], grid_hw=grid)


class OpenCLIPText(nn.Module):
    """The causal text transformer of an open_clip model, EOT (argmax) pooling, CLIP BPE."""

    def __init__(self, cfg: TextTowerConfig) -> None:
        super().__init__()
        model = create_open_clip(cfg.model, cfg.path, force_context_length=cfg.context_length)
        if not hasattr(model, "token_embedding"):
            raise ValueError(f"open_clip model '{cfg.model}' has no built-in causal text tower")
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        proj = model.text_projection
        self.pretrained_proj = None if proj is None else proj.detach().t().clone()  # (E, D)
        self.width = int(model.transformer.width)
        self.context_length = int(self.positional_embedding.shape[0])
        self.tokenizer = ClipTokenizer(self.context_length)
        self.pad_id = ClipTokenizer.pad_id
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        freeze_except_last(self, self.transformer.resblocks, cfg.trainable_blocks, [self.ln_final])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, ids: torch.Tensor) -> TextOutput:
        length = ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"got {length} tokens but context_length is {self.context_length}")
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, D)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        x = self.ln_final(x)
        eot = ids.argmax(dim=-1)  # (B,)
        mask = torch.arange(length, device=ids.device)[None, :] <= eot[:, None]  # (B, L)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return TextOutput(pooled=pooled, tokens=x, mask=mask)


@IMAGE_TOWERS.register("open_clip")
def build_open_clip_vision(cfg: ImageTowerConfig) -> OpenCLIPVision:
    """``cfg.model``: open_clip architecture; ``cfg.pretrained``: local checkpoint file."""
    return OpenCLIPVision(cfg)


@TEXT_TOWERS.register("open_clip")
def build_open_clip_text(cfg: TextTowerConfig) -> OpenCLIPText:
    """``cfg.model``: open_clip architecture; ``cfg.path``: local checkpoint file."""
    return OpenCLIPText(cfg)

"""open_clip towers (``ViT-B-16``, ``ViT-B-32``, ...) as finegrain towers returning tokens.

Built with ``open_clip.create_model(cfg.model, pretrained=<local file or None>,
force_image_size=..., force_context_length=...)``; no hub access. We run the tower's own
modules ourselves so that we get *all* patch tokens after ``ln_post`` and the CLS token before
open_clip's projection (methods add their own projection; the pretrained one is kept as
``tower.pretrained_proj`` (D_out, D) so a method can initialise from it). Position embeddings
are resampled (bicubic) for other image sizes.

The image tower takes ``forward(images, *, keep, mask, return_attention)`` (see
``finegrain.encoders.vit``): mask token before the position embeddings, keep gather after
them (instead of open_clip's own ``PatchDropout``, which is disabled: ``patch_dropout`` is a
random keep set as in the native ViT), CLS attention of a resblock from its
``attn.in_proj_weight`` on the ``ln_1`` output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from finegrain.compat import dependency_guard
from finegrain.data.tokenizers import ClipTokenizer
from finegrain.encoders.base import (
    ImageTowerConfig,
    TextTowerConfig,
    apply_mask,
    check_token_options,
    cls_attention,
    keep_tokens,
    patch_grid,
    run_blocks,
)
from finegrain.encoders.dense import BlockParts, check_dense_call, run_dense_blocks
from finegrain.encoders.vit import freeze_except_last, resample_pos_embed
from finegrain.outputs import TextOutput, VisionOutput
from finegrain.registry import IMAGE_TOWERS, TEXT_TOWERS, suggest


@dependency_guard("open_clip_torch", "building the open_clip tower")
def create_open_clip(name: str, pretrained: str = "", **kwargs: Any) -> nn.Module:
    """``open_clip.create_model`` with a clear error for unknown names and local weights only."""
    import open_clip

    path = Path(name).expanduser()
    if path.suffix == ".json" and path.is_file():  # a model config file (finegrain.interop)
        name = register_model_config(path)
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


def register_model_config(path: Path) -> str:
    """Register a model-config ``.json`` with open_clip and return its model name. Accepts a
    bare model config (``{"embed_dim", "vision_cfg", "text_cfg"}``, named by the file stem) and
    the hub format (``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``),
    whose ``model_cfg`` is registered under ``<stem>-<content hash>`` (the stem alone would be
    the same for every hub folder)."""
    import open_clip

    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        open_clip.add_model_config(path)
        return path.stem
    body = json.dumps(cfg["model_cfg"], sort_keys=True)
    name = f"{path.stem}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as d:  # open_clip reads the file when registering
            (Path(d) / f"{name}.json").write_text(body)
            open_clip.add_model_config(Path(d) / f"{name}.json")
    return name


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
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
        # open_clip's PatchDropout off: ours is the keep mechanism (reported in out.keep)
        model = create_open_clip(
            cfg.model, cfg.pretrained, force_image_size=cfg.image_size, force_patch_dropout=0.0
        )
        v = model.visual
        if not hasattr(v, "conv1") or v.attn_pool is not None or v.final_ln_after_pool:
            raise ValueError(
                f"open_clip model '{cfg.model}' has an unsupported image tower "
                f"({type(v).__name__}); supported: plain ViT towers such as ViT-B-16, ViT-B-32"
            )
        self.visual = v
        self.name = f"open_clip/{cfg.model}"
        self.width = int(v.transformer.width)
        self.patch_size = tuple(v.patch_size)
        self.patch_dropout = cfg.patch_dropout
        if cfg.image_size % self.patch_size[0]:
            raise ValueError(
                f"image_size {cfg.image_size} is not divisible by patch size {self.patch_size[0]}"
            )
        self.pretrained_proj = v.proj.detach().t().clone() if v.proj is not None else None  # (E, D)
        v.proj = None
        self.mask_token = nn.Parameter(torch.zeros(self.width)) if cfg.mask_token else None
        v.transformer.grad_checkpointing = cfg.grad_checkpointing
        freeze_except_last(self, v.transformer.resblocks, cfg.trainable_blocks, [v.ln_post])
        if self.mask_token is not None and cfg.trainable_blocks != 0:
            self.mask_token.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable

    def dense_unsupported(self) -> str:
        """Why the dense variants (``finegrain.encoders.dense``) do not apply, or ''."""
        t = self.visual.transformer
        blk = t.resblocks[-1]
        if not isinstance(getattr(blk, "attn", None), nn.MultiheadAttention) or not t.batch_first:
            return f"{type(blk).__name__} is not a batch-first nn.MultiheadAttention block"
        return ""

    def num_patches(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid of an (H, W) image."""
        return patch_grid(self.name, image_hw, self.patch_size)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + h*w, D): CLS + patch embeddings (masked ones replaced) + position embeddings."""
        v = self.visual
        x = v.conv1(images)  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            x = apply_mask(x, mask, self.mask_token)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls_tok, x], dim=1)  # (B, 1 + N, D)
        return x + resample_pos_embed(v.positional_embedding[None], grid).to(x.dtype)

    @dependency_guard("open_clip_torch", "the open_clip image tower")
    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_attention: bool | int = False,
    ) -> VisionOutput:
        v = self.visual
        grid = self.num_patches(images.shape[-2:])
        b = images.shape[0]
        n_attn = check_token_options(
            self.name,
            keep=keep,
            mask=mask,
            return_attention=return_attention,
            batch=b,
            grid=grid,
            depth=len(v.transformer.resblocks),
            mask_token=self.mask_token,
        )
        x = self.embed(images, mask)  # (B, 1 + N, D)
        x, keep = keep_tokens(x, keep, 1, self.patch_dropout, self.training)
        x = v.ln_pre(x)
        attn = None
        mode = getattr(self, "dense_mode", None)  # finegrain.encoders.dense.dense_variant
        if mode is not None:
            check_dense_call(self.name, keep, return_attention)
            x = run_dense_blocks(v.transformer.resblocks, x, mode, open_clip_block_parts, grid, 1)
        elif n_attn:
            x, attn = self._blocks_with_attention(x, n_attn)
        else:
            x = v.transformer(x)
        x = v.ln_post(x)  # (B, 1 + N_out, D)
        pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(1)
        return VisionOutput(pooled=pooled, tokens=x[:, 1:], grid_hw=grid, keep=keep, attention=attn)

    def _blocks_with_attention(
        self, x: torch.Tensor, n_attn: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """open_clip ``Transformer.forward`` block by block, with the CLS attention rows."""
        t = self.visual.transformer
        for blk in t.resblocks[len(t.resblocks) - n_attn :]:
            mha = getattr(blk, "attn", None)
            if not isinstance(mha, nn.MultiheadAttention) or not t.batch_first:
                raise ValueError(
                    f"image tower '{self.name}' does not support return_attention= "
                    f"({type(blk).__name__} is not a batch-first nn.MultiheadAttention block)"
                )
        ckpt = t.grad_checkpointing and torch.is_grad_enabled()
        x, attn = run_blocks(t.resblocks, x, n_attn, _open_clip_cls_attention, ckpt)
        return x, attn[..., 1:]  # (B, k, H, N_out): patch columns only


def _open_clip_cls_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T) CLS attention row of an open_clip ``ResidualAttentionBlock`` on x (B, T, D)."""
    a = blk.attn
    return cls_attention(blk.ln_1(x), a.in_proj_weight, a.in_proj_bias, a.num_heads)


def open_clip_block_parts(blk: nn.Module) -> BlockParts:
    """An open_clip ``ResidualAttentionBlock`` as ``BlockParts`` (dense variants)."""
    a = blk.attn
    dh = a.embed_dim // a.num_heads
    return BlockParts(
        blk.ln_1,
        a.in_proj_weight,
        a.in_proj_bias,
        a.num_heads,
        dh**-0.5,
        a.out_proj,
        blk.ln_2,
        blk.mlp,
        blk.ls_1,
        blk.ls_2,
    )


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

    @dependency_guard("open_clip_torch", "the open_clip text tower")
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

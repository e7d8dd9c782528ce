"""A small native Vision Transformer (Dosovitskiy et al. 2021) in the CLIP layout
(Radford et al. 2021: conv patch embedding without bias, CLS token, learned position
embedding, ``ln_pre``, pre-norm blocks, ``ln_post``), plus the transformer blocks that the
native text tower shares.

Attention uses fused ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU) with one fused qkv projection. Optional gradient checkpointing per block and patch
dropout (Li et al. 2023, FLIP; CLS always kept, training only).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finegrain.encoders.base import ImageTowerConfig
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks with optional (non-reentrant) gradient checkpointing."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.grad_checkpointing = False
        self._init(width, depth)

    def _init(self, width: int, depth: int) -> None:
        # CLIP's init: attention/MLP input std width^-0.5, output projections scaled by depth.
        proj_std = width**-0.5 * (2 * depth) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=width**-0.5)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp[0].weight, std=(2 * width) ** -0.5)
            nn.init.normal_(blk.mlp[2].weight, std=proj_std)
            for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp[0], blk.mlp[2]):
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_ckpt:
                x = checkpoint(blk, x, is_causal, use_reentrant=False)
            else:
                x = blk(x, is_causal=is_causal)
        return x


def freeze_except_last(
    module: nn.Module, blocks: nn.ModuleList | list, n: int, extra: Iterable[nn.Module] = ()
) -> None:
    """``trainable_blocks`` semantics: n < 0 trains everything; n >= 0 freezes the module and
    re-enables the last ``n`` blocks and the ``extra`` modules (final norms)."""
    if n < 0:
        return
    if n > len(blocks):
        raise ValueError(f"trainable_blocks={n} but the tower has only {len(blocks)} blocks")
    module.requires_grad_(False)
    for blk in list(blocks)[len(blocks) - n :]:
        blk.requires_grad_(True)
    if n > 0:
        for m in extra:
            m.requires_grad_(True)


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Bicubic interpolation of a square learned position embedding to another grid.

    pos: (1, prefix + g*g, D) -> (1, prefix + h*w, D); prefix tokens are kept as they are."""
    n = pos.shape[1] - prefix
    g = math.isqrt(n)
    assert g * g == n, f"position embedding of {n} patches is not a square grid"
    if (g, g) == tuple(grid):
        return pos
    patch = pos[:, prefix:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False)
    patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    return torch.cat([pos[:, :prefix], patch], dim=1)


def patch_dropout(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """Keep a random subset of patch tokens per sample (FLIP); x: (B, 1 + N, D), CLS kept."""
    cls_tok, patches = x[:, :1], x[:, 1:]
    b, n, d = patches.shape
    keep = max(1, int(n * keep_prob))
    idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
    patches = patches.gather(1, idx[..., None].expand(b, keep, d))
    return torch.cat([cls_tok, patches], dim=1)


class VisionTransformer(nn.Module):
    """Native ViT returning ``VisionOutput(pooled=CLS, tokens=patches, grid)`` after ``ln_post``.

    While patch dropout is active (training, ``patch_dropout > 0``) the tokens are the kept
    patches in random order and ``grid_hw`` is ``(1, N_kept)``.
    """

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}; "
                f"valid image sizes are multiples of {cfg.patch_size}"
            )
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
        self.width, self.patch_size = cfg.width, cfg.patch_size
        self.patch_dropout = cfg.patch_dropout
        g = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1, 1 + g * g, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        self.ln_post = nn.LayerNorm(cfg.width)
        freeze_except_last(self, self.transformer.blocks, cfg.trainable_blocks, [self.ln_post])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> VisionOutput:
        _, _, hh, ww = images.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not divisible by patch_size {p}")
        grid = (hh // p, ww // p)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D)
        cls_tok = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls_tok, x], dim=1)  # (B, 1 + N, D)
        x = x + resample_pos_embed(self.positional_embedding, grid).to(x.dtype)
        if self.training and self.patch_dropout > 0:
            x = patch_dropout(x, 1.0 - self.patch_dropout)
            grid = (1, x.shape[1] - 1)
        x = self.transformer(self.ln_pre(x))
        x = self.ln_post(x)  # (B, 1 + N, D)
        return VisionOutput(pooled=x[:, 0], tokens=x[:, 1:], grid_hw=grid)


@IMAGE_TOWERS.register("vit")
def build_vit(cfg: ImageTowerConfig) -> VisionTransformer:
    """Native ViT; ``cfg.pretrained`` may name a local state-dict file of this tower."""
    model = VisionTransformer(cfg)
    if cfg.pretrained:
        from finegrain.encoders.weights import load_into, load_state_dict_file

        load_into(model, load_state_dict_file(cfg.pretrained), cfg.pretrained)
    return model

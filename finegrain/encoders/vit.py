"""A small native Vision Transformer (Dosovitskiy et al. 2021) in the CLIP layout
(Radford et al. 2021: conv patch embedding without bias, CLS token, learned position
embedding, ``ln_pre``, pre-norm blocks, ``ln_post``), plus the transformer blocks that the
native text tower shares.

Layout options (``ImageTowerConfig``): ``qk_norm`` (per-head LayerNorm of q and k, shared
over heads, Dehghani et al. 2023), ``norm_eps``, ``ln_pre``, ``patch_bias`` and
``activation`` (gelu | quick_gelu), and ``init`` (clip | timm: timm's truncated-normal 0.02
init, ``timm_init_``). With ``norm_eps=1e-6, ln_pre=False, patch_bias=True`` the tower computes
the same function as timm's ``VisionTransformer`` (DetailCLIP's released backbone; with
``qk_norm=True`` GRAIN's), tested by copying weights; ``pretrained`` files in timm's keys are
converted (``finegrain.encoders.timm_keys.timm_vit_to_native``).

Attention uses fused ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on
GPU) with one fused qkv projection. Optional gradient checkpointing per block and patch
dropout (Li et al. 2023, FLIP; CLS always kept, training only) as a random keep set.

``forward(images, *, keep=None, mask=None, return_attention=False)``:
- ``keep`` (B, M) long: row-major patch indices gathered after the position embeddings,
  before ``ln_pre`` and the blocks (token removal of FLIP / CLIPpy / DetailCLIP); CLS kept.
- ``mask`` (B, h*w) bool: those patch embeddings are replaced by the learned ``mask_token``
  before the position embeddings (iBOT); needs ``ImageTowerConfig.mask_token=True``.
- ``return_attention`` True | k: the CLS query's softmax attention over the patches in the
  last k blocks, computed next to the fused SDPA from the block's own q/k weights
  (``finegrain.encoders.base.cls_attention``); the raw softmax row restricted to the patch
  columns, not renormalised (its sum is 1 minus the CLS self-attention).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finegrain.encoders.base import (
    ImageTowerConfig,
    apply_mask,
    check_token_options,
    cls_attention,
    keep_tokens,
    patch_grid,
    run_blocks,
)
from finegrain.encoders.dense import BlockParts, check_dense_call, run_dense_blocks
from finegrain.encoders.timm_keys import timm_vit_prefix, timm_vit_to_native
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation (Radford et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def activation_layer(name: str) -> nn.Module:
    """The MLP activation by name, or a one-line error naming the valid choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; valid choices: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA.

    ``qk_norm``: a LayerNorm over each head's query and key vectors (shared across heads, as
    timm's ``Attention(qk_norm=True)`` and GRAIN's released ViT) before the scaled dot product
    (Dehghani et al. 2023, ViT-22B); off, ``q_norm`` / ``k_norm`` are identities without
    parameters, so state dicts keep their keys."""

    def __init__(self, width: int, heads: int, qk_norm: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        dh = width // heads
        self.q_norm = nn.LayerNorm(dh, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dh, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, H, N, Dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)); x + mlp(ln(x))."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        eps: float = 1e-5,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, qk_norm, eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        act = activation_layer(activation)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), act, nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of blocks with optional (non-reentrant) gradient checkpointing."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        eps: float = 1e-5,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, qk_norm, eps, activation) for _ in range(depth)
        )
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


def zero_residual_branches_(blocks: nn.ModuleList) -> None:
    """Zero every block's attention and MLP output projections (weights and biases): each
    pre-norm block ``x + f(x)`` then starts as the identity (``zero_init_residual``)."""
    with torch.no_grad():
        for blk in blocks:
            for lin in (blk.attn.proj, blk.mlp[2]):
                nn.init.zeros_(lin.weight)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)


def timm_init_(tower: nn.Module) -> None:
    """timm's default ViT initialisation (``VisionTransformer.init_weights(mode="")``, as the
    timm ViTs of DetailCLIP's and GRAIN's released code): truncated normal (std 0.02, cut at
    +-2 absolute, i.e. practically untruncated) for the position embedding, the CLS token and
    every linear weight, zero linear biases, LayerNorms at one / zero; the patch conv keeps
    PyTorch's default init."""
    with torch.no_grad():
        nn.init.trunc_normal_(tower.positional_embedding, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(tower.class_embedding, std=0.02, a=-2.0, b=2.0)
        for m in tower.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """Native ViT returning ``VisionOutput(pooled=CLS, tokens=patches, grid)`` after ``ln_post``.

    While patch dropout is active (training, ``patch_dropout > 0``, no explicit ``keep``) the
    tokens are a random keep set (``random_keep``, global RNG), reported in ``out.keep``; an
    explicit ``keep`` takes precedence over patch dropout.
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
        if not cfg.norm_eps > 0:
            raise ValueError(f"image.norm_eps must be > 0, got {cfg.norm_eps}")
        self.width, self.patch_size = cfg.width, (cfg.patch_size, cfg.patch_size)
        self.patch_dropout = cfg.patch_dropout
        g = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        p, eps = cfg.patch_size, cfg.norm_eps
        self.conv1 = nn.Conv2d(3, cfg.width, p, p, bias=cfg.patch_bias)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1, 1 + g * g, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, eps, cfg.activation
        )
        self.transformer.grad_checkpointing = cfg.grad_checkpointing
        self.ln_post = nn.LayerNorm(cfg.width, eps=eps)
        # iBOT's masked-patch embedding, zero init; only with mask_token=True so that existing
        # state dicts keep their keys
        self.mask_token = nn.Parameter(torch.zeros(cfg.width)) if cfg.mask_token else None
        if cfg.init == "timm":
            timm_init_(self)
        elif cfg.init != "clip":
            raise ValueError(f"unknown image.init '{cfg.init}'; valid choices: clip, timm")
        if cfg.zero_init_residual:
            zero_residual_branches_(self.transformer.blocks)
        self.pool_type = cfg.pool_type  # a Literal field: ImageTowerConfig rejects other values
        freeze_except_last(self, self.transformer.blocks, cfg.trainable_blocks, [self.ln_post])
        if self.mask_token is not None and cfg.trainable_blocks != 0:
            self.mask_token.requires_grad_(True)  # a new input embedding: trains with the tower

    @property
    def has_cls(self) -> bool:
        """Whether ``pooled`` is the CLS token (CLIPpy's ``cls_token``)."""
        return self.pool_type == "tok"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def dense_unsupported(self) -> str:
        """'' : every native ViT takes the dense variants (``finegrain.encoders.dense``)."""
        return ""

    def num_patches(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid of an (H, W) image."""
        return patch_grid("vit", image_hw, self.patch_size)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + h*w, D): CLS + patch embeddings (masked ones replaced) + position embeddings."""
        x = self.conv1(images)  # (B, D, h, w)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if mask is not None:
            x = apply_mask(x, mask, self.mask_token)
        cls_tok = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls_tok, x], dim=1)  # (B, 1 + N, D)
        return x + resample_pos_embed(self.positional_embedding, grid).to(x.dtype)

    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_attention: bool | int = False,
    ) -> VisionOutput:
        grid = self.num_patches(images.shape[-2:])
        b = images.shape[0]
        blocks = self.transformer.blocks
        n_attn = check_token_options(
            "vit",
            keep=keep,
            mask=mask,
            return_attention=return_attention,
            batch=b,
            grid=grid,
            depth=len(blocks),
            mask_token=self.mask_token,
        )
        x = self.embed(images, mask)  # (B, 1 + N, D)
        x, keep = keep_tokens(x, keep, 1, self.patch_dropout, self.training)
        x = self.ln_pre(x)
        attn = None
        mode = getattr(self, "dense_mode", None)  # finegrain.encoders.dense.dense_variant
        if mode is not None:
            check_dense_call("vit", keep, return_attention)
            x = run_dense_blocks(blocks, x, mode, native_block_parts, grid, 1)
        elif n_attn:
            ckpt = self.transformer.grad_checkpointing and self.training
            x, attn = run_blocks(
                blocks, x, n_attn, _block_cls_attention, ckpt and torch.is_grad_enabled()
            )
            attn = attn[..., 1:]  # (B, k, H, N_out): patch columns only
        else:
            x = self.transformer(x)
        x = self.ln_post(x)  # (B, 1 + N_out, D)
        pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
        return VisionOutput(pooled=pooled, tokens=x[:, 1:], grid_hw=grid, keep=keep, attention=attn)


def _block_cls_attention(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T) CLS attention row of a native block on its input x (B, T, D)."""
    a = blk.attn
    return cls_attention(blk.ln_1(x), a.qkv.weight, a.qkv.bias, a.heads, None, a.q_norm, a.k_norm)


def native_block_parts(blk: Block) -> BlockParts:
    """A native block as ``BlockParts`` (dense variants of the last block), with the block's
    per-head q/k norms (``qk_norm=True``; identities otherwise) as its plain forward uses them."""
    a = blk.attn
    dh = a.qkv.weight.shape[0] // 3 // a.heads
    return BlockParts(
        blk.ln_1,
        a.qkv.weight,
        a.qkv.bias,
        a.heads,
        dh**-0.5,
        a.proj,
        blk.ln_2,
        blk.mlp,
        q_norm=a.q_norm,
        k_norm=a.k_norm,
    )


@IMAGE_TOWERS.register("vit")
def build_vit(cfg: ImageTowerConfig) -> VisionTransformer:
    """Native ViT; ``cfg.pretrained`` may name a local state-dict file of this tower (a missing
    ``mask_token`` keeps its zero init: pretrained towers have none) or of a timm
    ``VisionTransformer`` (bare or under ``visual.`` / ``visual.trunk.``: DetailCLIP's
    backbone files and training checkpoints, GRAIN's and the CLIPpy replication's), converted
    by ``finegrain.encoders.timm_keys.timm_vit_to_native``."""
    model = VisionTransformer(cfg)
    if cfg.pretrained:
        from finegrain.encoders.weights import load_into, load_state_dict_file

        sd = load_state_dict_file(cfg.pretrained)
        prefix = timm_vit_prefix(sd)
        if prefix is not None:
            sd = timm_vit_to_native(sd, prefix)
        if model.mask_token is not None and "mask_token" not in sd:
            sd["mask_token"] = model.mask_token.detach().clone()
        load_into(model, sd, cfg.pretrained)
    return model

"""timm image towers by architecture name (``vit_base_patch16_224``, ``vit_small_patch16_224``
(the DINO architecture), convnets such as ``resnet50``), random init or local weights.

``timm.create_model(cfg.model, pretrained=False, num_classes=0, img_size=cfg.image_size,
dynamic_img_size=True)`` (the last two only for models that accept them; ``qk_norm=True``
when ``cfg.qk_norm``: ``vit_base_patch16_224`` + qk_norm is GRAIN's released backbone), weights from
``cfg.pretrained`` (safetensors or torch file, ``weights_only=True``; the absolute position
embedding is resampled when the checkpoint was trained at another size).
ViTs: ``forward_features`` (after the final norm) split into ``num_prefix_tokens`` prefix
tokens (CLS, registers) and patch tokens; pooled = CLS (or the patch mean for models without
a class token). Convnets: the last feature map (B, C, h, w) as tokens, pooled = mean.

timm ``VisionTransformer`` models take ``forward(images, *, keep, mask, return_attention)``
(see ``finegrain.encoders.vit``): we run ``patch_embed`` -> mask token -> ``vit_pos_embed`` ->
keep gather -> ``patch_drop`` / ``norm_pre`` -> ``blocks`` -> ``norm`` ourselves (identical to
``forward_features`` without options, dynamic image sizes included); the CLS attention of a
block comes from its ``attn.qkv`` (with ``q_norm`` / ``k_norm``) on the ``norm1`` output.
``patch_dropout`` is a random keep set as in the native ViT. Other timm families (convnets,
EVA, ...) raise a one-line error for these options.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.compat import dependency_guard
from finegrain.encoders.base import (
    ImageTowerConfig,
    apply_mask,
    check_token_options,
    cls_attention,
    keep_tokens,
    patch_grid,
    reject_token_options,
    run_blocks,
)
from finegrain.encoders.dense import BlockParts, check_dense_call, run_dense_blocks
from finegrain.encoders.timm_keys import timm_vit_prefix
from finegrain.encoders.vit import freeze_except_last
from finegrain.outputs import VisionOutput
from finegrain.registry import IMAGE_TOWERS


def _create(name: str, image_size: int, qk_norm: bool = False) -> nn.Module:
    import timm

    if not name:
        raise ValueError("image tower 'timm' needs image.model, e.g. vit_base_patch16_224")
    arch = name.split(".")[0]  # 'vit_small_patch16_224.dino': architecture + weight tag
    if not timm.is_model(arch):
        from finegrain.registry import suggest

        raise ValueError(f"unknown timm model '{arch}'{suggest(arch, timm.list_models())}")
    extra = {"qk_norm": True} if qk_norm else {}
    try:
        return timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=image_size,
            dynamic_img_size=True,
            **extra,
        )
    except TypeError as e:  # not a ViT: no img_size / dynamic_img_size / qk_norm arguments
        if qk_norm:
            raise ValueError(f"timm model '{name}' does not take qk_norm ({e})") from None
        return timm.create_model(name, pretrained=False, num_classes=0)


def load_timm_weights(model: nn.Module, path: str) -> None:
    """Load a local checkpoint; drops classifier keys, resamples ``pos_embed`` if needed.

    Self-supervised checkpoints load as they are released: DINO's backbone files
    (``dino_deitsmall16_pretrain.pth``: timm ViT keys) and DINO training checkpoints
    (``{"teacher": {"backbone.*", "head.*"}, ...}``: the teacher backbone, projection head
    dropped), and the image trunk of vision-language checkpoints that keep a timm ViT under
    ``visual.`` (DetailCLIP, GRAIN) or ``visual.trunk.`` (the CLIPpy replication)."""
    from finegrain.encoders.weights import load_into, load_state_dict_file

    sd = load_state_dict_file(path)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "classifier."))}
    if sd and all(k.startswith("backbone.") for k in sd):  # DINO/iBOT training checkpoints
        sd = {k[len("backbone.") :]: v for k, v in sd.items()}
    prefix = timm_vit_prefix(sd)  # ``visual.`` / ``visual.trunk.``: a vision-language checkpoint
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        npt = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(grid), num_prefix_tokens=npt)
    load_into(model, sd, path)


def _token_support(model: nn.Module) -> tuple[bool, str]:
    """(keep/mask supported, why not attention or ''): timm VisionTransformer models only."""
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        return False, f"not a timm VisionTransformer ({type(model).__name__})"
    if model.cls_token is None:
        return True, "no CLS token"
    for blk in model.blocks:
        if not (isinstance(blk, Block) and isinstance(getattr(blk.attn, "qkv", None), nn.Linear)):
            return True, f"{type(blk).__name__} is not a pre-norm block with a fused qkv"
    return True, ""


class TimmTower(nn.Module):
    """Wraps a timm model; see the module docstring for what is returned."""

    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.model = _create(cfg.model, cfg.image_size, cfg.qk_norm)
        self.name = f"timm/{cfg.model.split('.')[0]}"
        if cfg.pretrained:
            load_timm_weights(self.model, cfg.pretrained)
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.has_cls = bool(getattr(self.model, "cls_token", None) is not None)
        self.tokens_ok, self.no_attention = _token_support(self.model)
        if not 0.0 <= cfg.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {cfg.patch_dropout}")
        for option, value in (("patch_dropout", cfg.patch_dropout), ("mask_token", cfg.mask_token)):
            if value and not self.tokens_ok:
                raise ValueError(f"image tower '{self.name}' does not support {option}")
        self.patch_dropout = cfg.patch_dropout
        self.mask_token = nn.Parameter(torch.zeros(self.width)) if cfg.mask_token else None
        if self.tokens_ok:
            self.patch_size = tuple(self.model.patch_embed.patch_size)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        blocks = getattr(self.model, "blocks", None)
        if cfg.trainable_blocks >= 0:
            if blocks is None:
                raise ValueError(
                    f"trainable_blocks is only supported for timm ViTs, not {cfg.model}"
                )
            norm = getattr(self.model, "norm", None)
            freeze_except_last(
                self, blocks, cfg.trainable_blocks, [norm] if norm is not None else []
            )
            if self.mask_token is not None and cfg.trainable_blocks != 0:
                self.mask_token.requires_grad_(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def dense_unsupported(self) -> str:
        """Why the dense variants (``finegrain.encoders.dense``) do not apply, or ''."""
        if not self.tokens_ok:
            return "not a timm VisionTransformer"
        if self.no_attention and self.has_cls:
            return self.no_attention
        blk = self.model.blocks[-1]
        from timm.models.vision_transformer import Block

        if not isinstance(blk, Block) or not isinstance(getattr(blk.attn, "qkv", None), nn.Linear):
            return f"{type(blk).__name__} is not a pre-norm block with a fused qkv"
        if getattr(blk.attn, "gate", None) is not None:
            return "gated attention"
        return ""

    def num_patches(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) patch grid of an (H, W) image (ViTs)."""
        if not self.tokens_ok:
            raise ValueError(f"image tower '{self.name}' has no patch grid (not a timm ViT)")
        return patch_grid(self.name, image_hw, self.patch_size)

    @dependency_guard("timm", "the timm image tower")
    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_attention: bool | int = False,
    ) -> VisionOutput:
        if self.tokens_ok:
            return self._forward_vit(images, keep, mask, return_attention)
        reject_token_options(self.name, keep, mask, return_attention)
        feats = self.model.forward_features(images)
        if feats.dim() == 4:  # convnet: (B, C, h, w)
            _, _, h, w = feats.shape
            tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
            return VisionOutput(pooled=tokens.mean(1), tokens=tokens, grid_hw=(h, w))
        if feats.dim() == 3 and hasattr(self.model, "patch_embed"):  # other ViTs: (B, P + N, D)
            grid = patch_grid(self.name, images.shape[-2:], self.model.patch_embed.patch_size)
            tokens = feats[:, self.num_prefix_tokens :]  # (B, N, D)
            pooled = feats[:, 0] if self.has_cls else tokens.mean(1)
            return VisionOutput(pooled=pooled, tokens=tokens, grid_hw=grid)
        raise ValueError(f"unsupported timm features of shape {tuple(feats.shape)}")

    def _forward_vit(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | None,
        mask: torch.Tensor | None,
        return_attention: bool | int,
    ) -> VisionOutput:
        """``VisionTransformer.forward_features`` step by step, with keep / mask / attention."""
        m, p = self.model, self.num_prefix_tokens
        grid = self.num_patches(images.shape[-2:])
        b = images.shape[0]
        n_attn = check_token_options(
            self.name,
            keep=keep,
            mask=mask,
            return_attention=return_attention,
            batch=b,
            grid=grid,
            depth=len(m.blocks),
            mask_token=self.mask_token,
        )
        if n_attn and self.no_attention:
            raise ValueError(
                f"image tower '{self.name}' does not support return_attention= "
                f"({self.no_attention})"
            )
        x = m.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
        if mask is not None:
            x = apply_mask(x, mask, self.mask_token)
        x = vit_pos_embed(m, x)  # (B, P + N, D)
        x, keep = keep_tokens(x, keep, p, self.patch_dropout, self.training)
        x = m.norm_pre(m.patch_drop(x))
        attn = None
        mode = getattr(self, "dense_mode", None)  # finegrain.encoders.dense.dense_variant
        if mode is not None:
            check_dense_call(self.name, keep, return_attention)
            x = run_dense_blocks(m.blocks, x, mode, timm_block_parts, grid, p)
        elif n_attn:
            ckpt = m.grad_checkpointing and torch.is_grad_enabled()
            x, attn = run_blocks(m.blocks, x, n_attn, _timm_cls_attention, ckpt)
            attn = attn[..., p:]  # (B, k, H, N_out): patch columns only
        elif m.grad_checkpointing and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(m.blocks, x)
        else:
            x = m.blocks(x)
        x = m.norm(x)  # (B, P + N_out, D)
        tokens = x[:, p:]  # (B, N_out, D)
        pooled = x[:, 0] if self.has_cls else tokens.mean(1)
        return VisionOutput(pooled=pooled, tokens=tokens, grid_hw=grid, keep=keep, attention=attn)


def vit_pos_embed(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A timm ``VisionTransformer``'s position embedding step of ``forward_features`` (patch
    tokens -> prefix tokens + patch tokens with positions, then ``pos_drop``), from the model's
    public attributes and ``timm.layers.resample_abs_pos_embed`` (timm's own method for it is
    private). ``x``: (B, h, w, D) with ``dynamic_img_size``, else (B, N, D). The position
    table covers the prefix tokens unless ``no_embed_class`` (DeiT-3, DINOv2 with registers:
    add to the patches, then prepend). Equality with ``forward_features``:
    ``tests/test_timm_pos_embed.py``."""
    from timm.layers import resample_abs_pos_embed

    b, d = x.shape[0], x.shape[-1]
    prefix = [t.expand(b, -1, -1) for t in (m.cls_token, getattr(m, "reg_token", None))
              if t is not None]  # fmt: skip  # [(B, 1, D), (B, R, D)]
    pos = m.pos_embed  # (1, P + N, D) or (1, N, D) with no_embed_class; None: no positions
    if pos is None:  # as timm: no position table, no pos_drop either
        return torch.cat([*prefix, x.reshape(b, -1, d)], dim=1)
    if getattr(m, "dynamic_img_size", False):
        pos = resample_abs_pos_embed(
            pos,
            new_size=list(x.shape[1:3]),
            old_size=list(m.patch_embed.grid_size),
            num_prefix_tokens=0 if m.no_embed_class else m.num_prefix_tokens,
        )
        x = x.reshape(b, -1, d)  # (B, N, D)
    if m.no_embed_class:
        x = torch.cat([*prefix, x + pos], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + pos
    return m.pos_drop(x)  # (B, P + N, D)


def _timm_cls_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T) CLS attention row of a timm pre-norm ``Block`` on its input x (B, T, D)."""
    a = blk.attn
    return cls_attention(
        blk.norm1(x), a.qkv.weight, a.qkv.bias, a.num_heads, a.scale, a.q_norm, a.k_norm
    )


def timm_block_parts(blk: nn.Module) -> BlockParts:
    """A timm pre-norm ``Block`` as ``BlockParts`` (dense variants of the last block)."""
    a = blk.attn
    return BlockParts(
        blk.norm1,
        a.qkv.weight,
        a.qkv.bias,
        a.num_heads,
        float(a.scale),
        lambda o: a.proj(getattr(a, "norm", nn.Identity())(o)),  # newer timm: post-attention norm
        blk.norm2,
        blk.mlp,
        blk.ls1,
        blk.ls2,
        a.q_norm,
        a.k_norm,
    )


@IMAGE_TOWERS.register("timm")
@dependency_guard("timm", "building the timm image tower")
def build_timm_tower(cfg: ImageTowerConfig) -> TimmTower:
    return TimmTower(cfg)

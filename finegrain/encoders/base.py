"""Tower configs and builders. Concrete towers register in ``IMAGE_TOWERS`` / ``TEXT_TOWERS``.

A tower is an ``nn.Module`` with:
- ``width``: int, the dimension D of its pooled vector and tokens;
- image towers: ``forward(images (B,3,H,W), *, keep=None, mask=None, return_attention=False)
  -> VisionOutput`` (token towers: ``patch_size`` (ph, pw) and ``num_patches(image_hw)``;
  towers that cannot take a keep set / mask / attention raise ``reject_token_options``' error);
- text towers: ``forward(token_ids (B,L) long) -> TextOutput``, plus ``tokenizer``
  (a picklable callable ``list[str] -> LongTensor (N, context_length)``), ``pad_id`` and
  ``context_length``.
Each registered entry is a callable ``build(cfg) -> nn.Module``.

Split point (towers with ``trainable_blocks``: ``efficientnet_lite0``, BERT-like ``hf`` /
``minilm``): ``frozen_prefix(x) -> h`` runs the frozen bottom (stem + frozen blocks; ``x``
unchanged when nothing is frozen), ``trainable_suffix(h[, ids])`` the rest, and ``forward`` is
exactly ``trainable_suffix(frozen_prefix(x))``, so a cached ``h`` (``data.feature_cache``) and
the uncached path run the same suffix code. ``prefix_modules()`` lists the frozen bottom's
modules (empty when nothing is frozen): their state is hashed to invalidate caches, and with
``lock_frozen`` they stay in eval mode (``lock_prefix``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finegrain.config import Checked
from finegrain.registry import IMAGE_TOWERS, TEXT_TOWERS


@dataclass
class ImageTowerConfig(Checked):
    name: str = "vit"  # vit | timm | open_clip | efficientnet_lite0
    model: str = ""  # timm / open_clip architecture name, e.g. vit_base_patch16_224, ViT-B-16
    pretrained: str = (
        ""  # local weights path ('' = random init; 'package' = weights a package ships)
    )
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0  # fraction of patch tokens dropped during training
    trainable_blocks: int = (
        -1
    )  # -1: everything trains; n >= 0: only the last n blocks (+ final norm)
    mask_token: bool = False  # a learned mask token for forward(mask=...) (iBOT-style masking)
    # frozen blocks (trainable_blocks >= 0) always run in eval mode (BatchNorm running statistics,
    # no dropout / stochastic depth): a fixed function of the input, as LiT's locked tower;
    # needed by data.feature_cache (frozen_prefix / trainable_suffix)
    lock_frozen: bool = False
    # ``hybrid`` only: the last n MBConv blocks of its pretrained convolutional bottom (and, at
    # output stride 32, Lite0's 1280-channel head conv) train from their ImageNet weights, on
    # the cached output of the blocks before them (BatchNorms on batch statistics, as in
    # fine-tuning a convnet)
    bottom_trainable: int = 0
    # native ``vit`` layout options (defaults: OpenAI CLIP's layout). GRAIN's released timm
    # ViT: qk_norm=True, norm_eps=1e-6, ln_pre=False, patch_bias=True. ``timm`` towers take
    # qk_norm (passed to timm.create_model); their other options come with the architecture.
    qk_norm: bool = False  # per-head LayerNorm on q and k before attention (Dehghani et al. 2023)
    norm_eps: float = 1e-5  # eps of every LayerNorm of the tower (timm ViTs: 1e-6)
    ln_pre: bool = True  # LayerNorm after the embeddings, before the blocks (CLIP); timm: none
    patch_bias: bool = False  # bias of the patch-embedding conv (CLIP: none; timm: yes)
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # MLP activation (OpenAI CLIP: quick_gelu)
    # native ``vit`` initialisation: clip (OpenAI CLIP's: width^-0.5 embeddings, depth-scaled
    # block weights) | timm (timm's ViT default: truncated normal std 0.02 for linear weights,
    # CLS token and position embedding, zero biases, PyTorch's default patch conv)
    init: Literal["clip", "timm"] = "clip"
    # native ``vit`` / ``hybrid`` readout: tok (the CLS token, CLIP) | avg (the mean of the patch
    # tokens after ln_post: OpenCLIP's pool_type='avg', final_ln_after_pool=False)
    pool_type: Literal["tok", "avg"] = "tok"
    # native ``vit`` / ``hybrid``: every block's attention and MLP output projections start at
    # zero, so each block starts as the identity (SkipInit, De & Smith 2020; torchvision ResNet's
    # zero_init_residual). On the hybrid with pool_type=avg the tower then starts as the mean of
    # its pretrained bottom's projected features, and the top learns what to add to them
    zero_init_residual: bool = False


NATIVE_VIT_TOWERS = ("vit", "hybrid")


@dataclass
class TextTowerConfig(Checked):
    name: str = "transformer"  # transformer (CLIP-style causal) | open_clip | hf | st | minilm
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
    lock_frozen: bool = False  # frozen blocks always in eval mode (no dropout); see image towers
    activation: Literal["gelu", "quick_gelu"] = "gelu"  # native tower's MLP (OpenAI CLIP: quick)


def build_image_tower(cfg: ImageTowerConfig) -> nn.Module:
    if cfg.bottom_trainable and cfg.name != "hybrid":
        raise ValueError(f"image tower '{cfg.name}': bottom_trainable applies to the 'hybrid' "
                         "tower only (use trainable_blocks)")  # fmt: skip
    odd = [k for k, v in (("pool_type", cfg.pool_type != "tok"),
                          ("zero_init_residual", cfg.zero_init_residual)) if v]  # fmt: skip
    if odd and cfg.name not in NATIVE_VIT_TOWERS:
        raise ValueError(f"image tower '{cfg.name}': {', '.join(odd)} applies to the native "
                         f"towers only ({', '.join(NATIVE_VIT_TOWERS)})")  # fmt: skip
    return IMAGE_TOWERS.get(cfg.name)(cfg)


def build_text_tower(cfg: TextTowerConfig) -> nn.Module:
    return TEXT_TOWERS.get(cfg.name)(cfg)


def lock_prefix(tower: nn.Module, mode: bool) -> None:
    """After ``tower.train(mode)``: with ``cfg.lock_frozen`` its ``prefix_modules()`` stay in eval
    mode, so the frozen bottom is a fixed function of its input (cacheable, LiT's "locked")."""
    if mode and getattr(tower, "lock_frozen", False):
        for m in tower.prefix_modules():
            m.eval()


# ---- keep sets, masks and CLS attention: the shared mechanics of the token towers ----------


def num_kept(n: int, keep_fraction: float) -> int:
    """How many of ``n`` patches a keep fraction in (0, 1] keeps: ``max(1, floor(n * f))``
    (FLIP / open_clip's count; the 1e-6 guards against 0.7 * 10 = 6.999...)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    return max(1, int(n * keep_fraction + 1e-6))


def random_keep(
    b: int,
    n: int,
    keep_fraction: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(B, M) long: a uniformly random subset of ``M = num_kept(n, keep_fraction)`` patch
    indices per sample, each row sorted ascending (FLIP's random removal; Li et al. 2023).

    Draws ``torch.rand(b, n)`` from ``generator`` (on its device) or the global generator of
    ``device``, so a seeded generator gives the same keep set on every machine."""
    m = num_kept(n, keep_fraction)
    if generator is not None:
        device = generator.device
    noise = torch.rand(b, n, generator=generator, device=device)  # (B, N)
    return noise.argsort(dim=1)[:, :m].sort(dim=1).values  # (B, M)


def patch_grid(tower: str, image_hw: Sequence[int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """(h, w) patch grid of an image, or a ValueError when the size is not a multiple."""
    (hh, ww), (ph, pw) = tuple(image_hw)[-2:], patch_size
    if hh % ph or ww % pw:
        raise ValueError(
            f"image size {hh}x{ww} is not divisible by patch_size {ph}x{pw} (tower '{tower}')"
        )
    return hh // ph, ww // pw


def reject_token_options(
    tower: str, keep: torch.Tensor | None, mask: torch.Tensor | None, return_attention: bool | int
) -> None:
    """The one-line error of towers without patch tokens (convnets) for each option given."""
    for option, given, what in (
        ("keep", keep is not None, "token subsets"),
        ("mask", mask is not None, "learned mask token"),
        ("return_attention", return_attention is not False, "CLS-to-patch attention"),
    ):
        if given:
            raise ValueError(f"image tower '{tower}' does not support {option}= ({what})")


def check_token_options(
    tower: str,
    *,
    keep: torch.Tensor | None,
    mask: torch.Tensor | None,
    return_attention: bool | int,
    batch: int,
    grid: tuple[int, int],
    depth: int,
    mask_token: torch.Tensor | None,
) -> int:
    """Validate ``forward``'s options; returns k, the number of last blocks to report attention
    for (0 = none). One-line ValueErrors name the tower, the option and what is valid."""
    n = grid[0] * grid[1]
    if keep is not None:
        if (
            keep.dtype != torch.long
            or keep.dim() != 2
            or keep.shape[0] != batch
            or not keep.numel()
        ):
            raise ValueError(
                f"image tower '{tower}': keep must be a LongTensor (B={batch}, M>=1) of patch "
                f"indices, got {keep.dtype} {tuple(keep.shape)}"
            )
        if bool(((keep < 0) | (keep >= n)).any()):
            raise ValueError(
                f"image tower '{tower}': keep indices must be in [0, {n}) "
                f"(row-major over the {grid[0]}x{grid[1]} patch grid)"
            )
    if mask is not None:
        if mask_token is None:
            raise ValueError(
                f"image tower '{tower}' has no mask token: build it with "
                "ImageTowerConfig.mask_token=True to use mask="
            )
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
            raise ValueError(
                f"image tower '{tower}': mask must be a BoolTensor (B, h*w) = ({batch}, {n}), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    if return_attention is False:
        return 0
    if return_attention is True:
        return depth
    if isinstance(return_attention, int) and 1 <= return_attention <= depth:
        return return_attention
    raise ValueError(
        f"image tower '{tower}': return_attention must be False, True or a number of last "
        f"blocks in [1, {depth}], got {return_attention!r}"
    )


def apply_mask(x: torch.Tensor, mask: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Replace masked patch embeddings by the mask token (iBOT, Zhou et al. 2022), before the
    position embeddings. x: (B, N, D) or (B, h, w, D); mask: (B, h*w) bool; token: (D,)."""
    return torch.where(mask.view(*x.shape[:-1], 1), token.to(x.dtype), x)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, P + N, D) -> (B, P + M, D): the P prefix tokens, then the patches ``keep`` (B, M)."""
    d = x.shape[-1]
    patches = x[:, prefix:].gather(1, keep[..., None].expand(-1, -1, d))  # (B, M, D)
    return torch.cat([x[:, :prefix], patches], dim=1)


def keep_tokens(
    x: torch.Tensor, keep: torch.Tensor | None, prefix: int, dropout: float, training: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The one keep step of every token tower: ``keep`` as given, else (training with patch
    dropout) a random keep set; returns the gathered (B, P + M, D) tokens and the keep set."""
    if keep is None and training and dropout > 0:
        b, n = x.shape[0], x.shape[1] - prefix
        keep = random_keep(b, n, 1.0 - dropout, device=x.device)  # (B, M)
    if keep is not None:
        x = gather_tokens(x, keep, prefix=prefix)  # (B, P + M, D)
    return x, keep


def cls_attention(
    y: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    heads: int,
    scale: float | None = None,
    q_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    k_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, H, T): softmax(q_0 k^T * scale) of token 0 (CLS) over all T tokens, per head.

    ``y`` (B, T, D) is the block's normed attention input; ``qkv_weight`` (3 * A, D) a fused
    projection laid out [q | k | v] with heads contiguous (native, timm, and
    ``nn.MultiheadAttention.in_proj``). Only the CLS query and the keys are projected, so the
    cost is one D x A matmul over the tokens next to the block's own fused SDPA.
    Softmax in at least float32."""
    b, t, _ = y.shape
    a = qkv_weight.shape[0] // 3
    dh = a // heads
    bq, bk = (None, None) if qkv_bias is None else (qkv_bias[:a], qkv_bias[a : 2 * a])
    q = F.linear(y[:, :1], qkv_weight[:a], bq).view(b, 1, heads, dh).transpose(1, 2)  # (B,H,1,Dh)
    k = F.linear(y, qkv_weight[a : 2 * a], bk).view(b, t, heads, dh).transpose(1, 2)  # (B,H,T,Dh)
    q = q if q_norm is None else q_norm(q)
    k = k if k_norm is None else k_norm(k)
    s = (q @ k.transpose(-1, -2)).squeeze(2) * (dh**-0.5 if scale is None else scale)  # (B,H,T)
    return s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32))


def run_blocks(
    blocks: Sequence[nn.Module],
    x: torch.Tensor,
    n_attn: int,
    attention: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    checkpointing: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` on x (B, T, D) and ``attention(block, x) -> (B, H, T)`` before each of the
    last ``n_attn`` blocks; returns (x, (B, n_attn, H, T)). With ``checkpointing`` both the
    blocks and the attention rows are recomputed in backward (non-reentrant)."""
    rows = []
    first = len(blocks) - n_attn
    for i, blk in enumerate(blocks):
        if i >= first:
            rows.append(
                checkpoint(attention, blk, x, use_reentrant=False)
                if checkpointing
                else attention(blk, x)
            )
        x = checkpoint(blk, x, use_reentrant=False) if checkpointing else blk(x)
    return x, torch.stack(rows, dim=1)

"""Training-free dense-feature variants of a CLIP-like ViT's last block (zero-shot
segmentation): the image tower runs its blocks as usual except the last one, whose patch
outputs follow one of

- ``maskclip`` (Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP"): the value
  path only, no query-key attention: o = W_out (W_v LN_1(x)). Released code
  (chongzhou96/MaskCLIP, ``mmseg/models/backbones/vit.py``, ``return_qkv``) keeps the block's
  residual and FFN on it: y = x + o; y = y + MLP(LN_2(y)) (``block="released"``); the value
  embedding alone, as several re-implementations use it, is ``block="attention_only"`` (y = o).
- ``sclip`` (Wang et al., ECCV 2024, "SCLIP: Rethinking Self-Attention for Dense
  Vision-Language Inference", Sec. 3, correlative self-attention):
  A = softmax(q q^T s) + softmax(k k^T s), o = W_out (A v). The paper writes CSA with one
  projection W_r, softmax(x W_r (x W_r)^T); its released code (wangf3014/SCLIP,
  ``clip/model.py`` ``custom_attn(csa=True)``) reuses W_q and W_k as two such projections and
  sums the softmaxes, which we follow; it keeps the block's residual and FFN
  (``block="released"``).
- ``naclip`` (Hajimiri et al., WACV 2025, "Pay Attention to Your Neighbours", Sec. 3):
  A = softmax(k k^T s + Omega), Omega_ij = exp(-||p_i - p_j||^2 / (2 sigma^2)) over patch grid
  positions p (zero on rows/columns of prefix tokens, as ``get_attention_addition`` with
  ``adjust_for_cls``), sigma = ``gaussian_std`` (5 in the released code);
  the "reduced" architecture drops residual and FFN: y = W_out (A v) (``block="released"``;
  ``block="residual_ffn"`` is their "vanilla" architecture).

s = head_dim^-0.5 (the tower's own attention scale); q/k are per head, after the tower's
q_norm/k_norm if any; PAMR refinement is not part of these variants. Prefix tokens (CLS,
registers) keep the unmodified block's output, so ``pooled`` is still the model's global
embedding. The final norm (``ln_post``) and the method's projection follow as usual.

Towers take part through ``BlockParts`` (native ``vit``, timm ViTs with fused qkv, open_clip
ViTs); ``dense_variant(tower, ...)`` switches a tower for the duration of a ``with``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

DENSE_VARIANTS = ("raw", "maskclip", "sclip", "naclip")
DENSE_BLOCKS = ("released", "attention_only", "residual_ffn")
Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DenseMode:
    variant: Literal["maskclip", "sclip", "naclip"]
    gaussian_std: float = 5.0
    block: Literal["released", "attention_only", "residual_ffn"] = "released"

    def keeps_residual_ffn(self) -> bool:
        if self.block != "released":
            return self.block == "residual_ffn"
        return self.variant != "naclip"  # MaskCLIP / SCLIP code keep them; NACLIP "reduced"


@dataclass
class BlockParts:
    """A pre-norm block as functions: y = x + ls1(out(attn(ln1(x)))); y + ls2(mlp(ln2(y)))."""

    ln1: Fn
    qkv_weight: torch.Tensor  # (3A, D), [q | k | v], heads contiguous
    qkv_bias: torch.Tensor | None
    heads: int
    scale: float
    out: Fn  # (B, T, A) -> (B, T, D): output projection (timm: norm then proj)
    ln2: Fn
    mlp: Fn
    ls1: Fn = nn.Identity()
    ls2: Fn = nn.Identity()
    q_norm: Fn | None = None
    k_norm: Fn | None = None


def gaussian_window(grid: tuple[int, int], std: float) -> torch.Tensor:
    """(N, N) Omega_ij = exp(-((r_i - r_j)^2 + (c_i - c_j)^2) / (2 std^2)), N = h * w
    row-major patches (NACLIP's neighbourhood Gaussian; ``gaussian_window`` in its code)."""
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    p = torch.stack([r.flatten(), c.flatten()], 1).double()  # (N, 2)
    d2 = (p[:, None] - p[None]).pow(2).sum(-1)  # (N, N)
    return torch.exp(-d2 / (2 * std**2))


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, a = t.shape
    return t.view(b, n, heads, a // heads).transpose(1, 2)  # (B, H, T, Dh)


def _softmax(s: torch.Tensor) -> torch.Tensor:
    return s.softmax(-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)


def dense_block(
    x: torch.Tensor, p: BlockParts, mode: DenseMode, grid: tuple[int, int], prefix: int
) -> torch.Tensor:
    """The last block under ``mode`` on x (B, P + N, D) -> (B, P + N, D): patches follow the
    variant, the P prefix tokens the plain block (module docstring)."""
    b, t, _ = x.shape
    y = p.ln1(x)
    qkv = F.linear(y, p.qkv_weight, p.qkv_bias)  # (B, T, 3A)
    q, k, v = (_heads(z, p.heads) for z in qkv.chunk(3, dim=-1))  # (B, H, T, Dh)
    q = q if p.q_norm is None else p.q_norm(q)
    k = k if p.k_norm is None else p.k_norm(k)
    plain = _softmax(q @ k.transpose(-1, -2) * p.scale)  # (B, H, T, T)
    if mode.variant == "maskclip":
        o = v  # value embedding only
    else:
        kk = k @ k.transpose(-1, -2) * p.scale  # (B, H, T, T)
        if mode.variant == "sclip":
            attn = _softmax(q @ q.transpose(-1, -2) * p.scale) + _softmax(kk)
        else:  # naclip
            omega = torch.zeros(t, t, dtype=torch.float64)
            omega[prefix:, prefix:] = gaussian_window(grid, mode.gaussian_std)
            attn = _softmax(kk + omega.to(kk))
        o = attn @ v  # (B, H, T, Dh)
    merge = lambda z: z.transpose(1, 2).reshape(b, t, -1)  # noqa: E731  (B, T, A)
    o = p.out(merge(o))  # (B, T, D)
    normal = x + p.ls1(p.out(merge(plain @ v)))
    normal = normal + p.ls2(p.mlp(p.ln2(normal)))  # the unmodified block
    if mode.keeps_residual_ffn():
        o = x + p.ls1(o)
        o = o + p.ls2(p.mlp(p.ln2(o)))
    return torch.cat([normal[:, :prefix], o[:, prefix:]], dim=1)


def run_dense_blocks(
    blocks: nn.ModuleList | list,
    x: torch.Tensor,
    mode: DenseMode,
    parts: Callable[[nn.Module], BlockParts],
    grid: tuple[int, int],
    prefix: int,
) -> torch.Tensor:
    """All blocks but the last as they are, the last one through ``dense_block``."""
    for blk in list(blocks)[:-1]:
        x = blk(x)
    return dense_block(x, parts(blocks[-1]), mode, grid, prefix)


def check_dense_call(tower: str, keep: torch.Tensor | None, return_attention: bool | int) -> None:
    if keep is not None or return_attention is not False:
        raise ValueError(
            f"image tower '{tower}': a dense variant takes the full patch grid, without keep= "
            "or return_attention="
        )


@contextmanager
def dense_variant(
    tower: nn.Module,
    variant: str = "raw",
    *,
    gaussian_std: float = 5.0,
    block: str = "released",
) -> Iterator[None]:
    """Within the ``with``, ``tower`` runs its last block as ``variant`` (module docstring);
    ``raw`` changes nothing. Towers without ``dense_parts`` raise a one-line error."""
    if variant not in DENSE_VARIANTS:
        raise ValueError(f"unknown dense_variant '{variant}'; valid: {', '.join(DENSE_VARIANTS)}")
    if block not in DENSE_BLOCKS:
        raise ValueError(f"unknown dense block '{block}'; valid: {', '.join(DENSE_BLOCKS)}")
    if variant == "raw":
        yield
        return
    name = getattr(tower, "name", type(tower).__name__)
    why = getattr(tower, "dense_unsupported", lambda: "not a CLIP-like ViT tower")()
    if why:
        raise ValueError(
            f"image tower '{name}' does not support dense_variant='{variant}' ({why}); "
            "supported: native vit, timm ViTs with a fused qkv, open_clip ViTs"
        )
    if variant == "naclip" and not gaussian_std > 0:
        raise ValueError(f"naclip needs gaussian_std > 0, got {gaussian_std}")
    tower.dense_mode = DenseMode(variant, float(gaussian_std), block)  # type: ignore[arg-type]
    try:
        yield
    finally:
        tower.dense_mode = None

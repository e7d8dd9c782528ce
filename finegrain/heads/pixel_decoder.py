"""A light MAE-style decoder (He et al. 2022, "Masked Autoencoders", Sec. 3) as DetailCLIP uses
it (Monsefi et al. 2024; released ``forward_decoder``): the student's kept tokens (CLS first) are
linearly embedded, a learned ``mask_token`` fills every removed position, fixed 2-D sin-cos
position embeddings are added, one transformer block (16 heads) and a LayerNorm follow.

Its output feeds the pixel head (``Linear(D, p*p*3)``, normalised-pixel targets on removed
patches) and, in DetailCLIP, the student's iBOT head for the patch tokens. The decoder width equals
the encoder width in the released code (``decoder_embed: Linear(768, 768)``), which is what lets the
one iBOT head see both the encoder CLS token and the decoder's patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from finegrain.encoders.vit import Block


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k/dim)."""
    assert dim % 2 == 0, f"sin-cos embedding needs an even dim, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """(prefix + h*w, dim) fixed 2-D sin-cos position embedding (MAE's ``get_2d_sincos_pos_embed``):
    the first half of the channels encodes the column (w) coordinate, the second the row, row-major
    over the grid; a zero row for the CLS token."""
    assert dim % 4 == 0, f"2-D sin-cos embedding needs dim divisible by 4, got {dim}"
    h, w = grid_hw
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w)
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (h*w, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class MAEDecoder(nn.Module):
    """``forward(tokens (B, 1+M, D), keep (B, M), grid_hw) -> (B, 1+N, D)``, N = h*w.

    ``keep`` lists, per sample, the grid index (row-major) of each kept token, in the order of
    ``tokens[:, 1:]``; all other positions get ``mask_token``."""

    def __init__(self, width: int, depth: int = 1, heads: int = 16, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by decoder heads {heads}")
        self.width = width
        self.embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        for blk in self.blocks:  # timm/MAE blocks use LayerNorm eps 1e-6
            blk.ln_1.eps = blk.ln_2.eps = 1e-6
        self._init()
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _init(self) -> None:
        # MAE init: xavier-uniform linears, zero biases, unit LayerNorms, mask token N(0, 0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def pos_embed(self, grid_hw: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        key = tuple(grid_hw)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.width, key)
        return self._pos_cache[key].to(device=like.device, dtype=like.dtype)  # (1 + N, D)

    def forward(
        self, tokens: torch.Tensor, keep: torch.Tensor, grid_hw: tuple[int, int]
    ) -> torch.Tensor:
        b, m1, d = tokens.shape
        n = grid_hw[0] * grid_hw[1]
        assert keep.shape == (b, m1 - 1), (
            f"keep {tuple(keep.shape)} must be (B, M) for tokens {tuple(tokens.shape)} (CLS + M)"
        )
        x = self.embed(tokens)  # (B, 1 + M, D)
        full = self.mask_token.to(x.dtype).expand(b, n, d).clone()  # (B, N, D)
        full = full.scatter(1, keep[..., None].expand(b, m1 - 1, d), x[:, 1:])  # kept in place
        x = torch.cat([x[:, :1], full], dim=1) + self.pos_embed(grid_hw, x)  # (B, 1 + N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class PixelHead(nn.Module):
    """``Linear(D, p*p*3)``: per-patch pixels in ``patchify`` order (row, col, channel)."""

    def __init__(self, width: int, patch_size: int, channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(width, patch_size * patch_size * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (..., p*p*3)

"""DETR-style pre-norm region-query decoder (GRAIN, Halbe et al., arXiv 2412.04429).

Follows the released code (shaunak27/grain-clip ``model/tfm.py``) in behaviour:

- memory = LayerNorm(Linear_no_bias(all image tokens)) - CLS *and* patch tokens, no
  positional embedding added to the memory (the ViT's tokens already carry position);
- ``Q`` learned region queries + 1 global query (the *last* query), used as DETR's
  ``query_pos``: the decoder state starts at zero and the query embedding is added to the
  queries/keys of self-attention and the queries of cross-attention in every layer;
- pre-norm layers: self-attention -> cross-attention -> ReLU FFN, dropout 0.1, a shared final
  LayerNorm applied to every layer's output (intermediate outputs feed auxiliary losses);
- a 3-layer ReLU MLP + sigmoid predicts (cx, cy, w, h) from every *region* query;
- no class head (the released code builds one with 22047 classes and never trains it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (DETR's box head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        assert num_layers >= 1, "MLP needs at least one layer"
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: x += SA(LN x + pos); x += CA(LN x + pos, mem); x += FFN(LN x)."""

    def __init__(self, width: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, width)
        )
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (B, Q+1, W)
        q = h + pos
        x = x + self.drop1(self.self_attn(q, q, h, need_weights=False)[0])
        h = self.norm2(x)
        x = x + self.drop2(self.cross_attn(h + pos, memory, memory, need_weights=False)[0])
        return x + self.drop3(self.ffn(self.norm3(x)))


class RegionDecoder(nn.Module):
    """Learned region queries + one global query decoding ViT tokens.

    forward(tokens (B, N, C)) -> dict with
      ``global``  (B, W) final-layer global query state (normed),
      ``regions`` (B, Q, W) final-layer region query states (normed),
      ``boxes``   (L, B, Q, 4) cxcywh in 0..1 for every layer (L = depth if ``return_all``
                  else 1; the last entry is the final layer).
    """

    def __init__(
        self,
        in_dim: int,
        width: int = 512,
        depth: int = 6,
        heads: int = 8,
        num_regions: int = 5,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        box_mlp_layers: int = 3,
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} must be divisible by heads {heads}")
        if num_regions < 1 or depth < 1:
            raise ValueError(f"need num_regions >= 1 and depth >= 1, got {num_regions}, {depth}")
        self.num_regions, self.width = num_regions, width
        self.proj = nn.Linear(in_dim, width, bias=False)
        self.memory_norm = nn.LayerNorm(width)
        self.query_embed = nn.Parameter(torch.randn(num_regions + 1, width))  # last = global
        self.layers = nn.ModuleList(
            DecoderLayer(width, heads, ffn_dim, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.box_head = MLP(width, width, 4, box_mlp_layers)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.layers.parameters():  # DETR: xavier on every matrix of the transformer
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tokens: torch.Tensor, return_all: bool = False) -> dict[str, torch.Tensor]:
        assert tokens.dim() == 3, f"tokens must be (B, N, C), got {tuple(tokens.shape)}"
        memory = self.memory_norm(self.proj(tokens))  # (B, N, W)
        b = tokens.shape[0]
        pos = self.query_embed.unsqueeze(0).expand(b, -1, -1).to(memory.dtype)  # (B, Q+1, W)
        x = torch.zeros_like(pos)
        states = []
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, pos)
            if return_all or i == len(self.layers) - 1:
                states.append(self.norm(x))
        hs = torch.stack(states)  # (L, B, Q+1, W)
        boxes = self.box_head(hs[:, :, :-1]).sigmoid()  # (L, B, Q, 4)
        return {"global": hs[-1, :, -1], "regions": hs[-1, :, :-1], "boxes": boxes}

"""Tiny random models in the released codebases' exact state-dict layouts (keys and shapes),
with their forward passes written out from reading the released code (our own words, not
copies), for loader tests: load the state dict with ``finegrain.load`` and compare outputs.

- ``released_text``: OpenAI CLIP's text transformer as DetailCLIP's ``models.CLIP`` /
  GRAIN's ``CLIP`` keep it (``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.i`` with ``nn.MultiheadAttention`` and ``mlp.c_fc/c_proj``,
  ``ln_final``), QuickGELU, causal mask, EOT (argmax id) pooling;
- ``timm_vit``: a timm ``VisionTransformer`` (the released image towers of DetailCLIP, GRAIN
  and the CLIPpy replication's trunk), run by timm itself;
- ``ReleasedGRAINDecoder``: GRAIN's region decoder (``ObjDecoder`` around the pre-norm DETR
  ``Cross_Attention``, sequence-first), its image / region projections and box MLP.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _ResBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        fc = [("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
              ("c_proj", nn.Linear(4 * width, width))]  # fmt: skip
        self.mlp = nn.Sequential(OrderedDict(fc))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (L, B, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Resblocks(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(width, heads) for _ in range(layers))


class ReleasedCLIPText(nn.Module):
    """The released CLIP text tower + the ``text_projection`` (W, E) matrix, random weights."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int,
                 embed: int) -> None:  # fmt: skip
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.1 * torch.randn(context, width))
        self.transformer = _Resblocks(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(width**-0.5 * torch.randn(width, embed))
        with torch.no_grad():  # non-trivial norms and biases
            for n, p in self.named_parameters():
                if n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_final.weight")):
                    p.add_(0.1 * torch.randn_like(p))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pooled(ids) @ self.text_projection

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, W): the final-norm state at the EOT (largest id) position."""
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:length]
        # the released block casts its mask to the input's dtype (a float32 mask on float64
        # inputs is mis-applied by nn.MultiheadAttention for L >= 8 on torch 2.14)
        mask = torch.full((length, length), float("-inf")).triu_(1).to(x)
        x = x.permute(1, 0, 2)  # (L, B, D): the released blocks are sequence-first
        for blk in self.transformer.resblocks:
            x = blk(x, mask)
        x = self.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]


def timm_vit(img: int, patch: int, width: int, depth: int, heads: int, **kw: object) -> nn.Module:
    """A timm ``VisionTransformer`` without classifier, norms and biases perturbed."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=img, patch_size=patch, embed_dim=width, depth=depth,
                            num_heads=heads, num_classes=0, global_pool="", **kw)  # fmt: skip
    with torch.no_grad():
        for n, p in vit.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return vit.eval()


def eot_ids(b: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(B, L) ids ending in the largest id (EOT) at varying positions, zeros after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        n = 2 + i % (length - 2)
        ids[i, :n] = torch.randint(1, vocab - 1, (n,), generator=g)
        ids[i, n] = vocab - 1
    return ids


# ---- GRAIN (shaunak27/grain-clip model/tfm.py, as train.py builds it) -------------------------
class _GRAINDecoderLayer(nn.Module):
    """A pre-norm DETR decoder layer, sequence-first (``nn.MultiheadAttention`` default)."""

    def __init__(self, width: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(width, heads)
        self.self_attn = nn.MultiheadAttention(width, heads)
        self.linear1, self.linear2 = nn.Linear(width, ffn), nn.Linear(ffn, width)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)  # (Q, B, W); queries/keys carry the query embedding, values do not
        x = x + self.self_attn(h + pos, h + pos, h)[0]
        h = self.norm2(x)
        x = x + self.multihead_attn(h + pos, memory, memory)[0]  # memory has no position
        return x + self.linear2(torch.relu(self.linear1(self.norm3(x))))


class _GRAINDecoderStack(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_GRAINDecoderLayer(width, heads, ffn) for _ in range(depth))
        self.norm = nn.LayerNorm(width)


class _GRAINCrossAttention(nn.Module):
    def __init__(self, width: int, heads: int, ffn: int, depth: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(width)  # normalize_before=True
        self.decoder = _GRAINDecoderStack(width, heads, ffn, depth)


class _BoxMLP(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        dims = [width] * layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))


class ReleasedGRAINDecoder(nn.Module):
    """The released ``ObjDecoder`` (keys and shapes; ``embed`` is 512 there), random weights:
    ``forward(tokens (B, N, C)) -> (boxes (B, Q, 4) cxcywh, image (B, E), regions (B, Q, E))``
    with the last of the ``queries + 1`` queries the global one."""

    def __init__(self, feature: int, width: int, heads: int, ffn: int, depth: int, queries: int,
                 embed: int, classes: int = 7, patches: int = 9, frames: int = 4) -> None:  # fmt: skip
        super().__init__()
        self.transformer = _GRAINCrossAttention(width, heads, ffn, depth)
        self.class_embed = nn.Linear(width, classes + 1)  # built, never used
        self.bbox_embed = _BoxMLP(width, 3)
        self.query_embed = nn.Embedding(queries + 1, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, width))  # unused
        self.temporal_embed = nn.Parameter(torch.zeros(1, frames, width))  # unused
        self.proj = nn.Linear(feature, width, bias=False)
        self.obj_proj = nn.Parameter(width**-0.5 * torch.randn(width, embed))
        self.img_proj = nn.Parameter(width**-0.5 * torch.randn(width, embed))
        with torch.no_grad():  # non-trivial norms and biases
            for n, p in self.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        memory = self.transformer.pre_norm(self.proj(tokens)).transpose(0, 1)  # (N, B, W)
        pos = self.query_embed.weight[:, None].expand(-1, tokens.shape[0], -1)  # (Q+1, B, W)
        x = torch.zeros_like(pos)
        for layer in self.transformer.decoder.layers:
            x = layer(x, memory, pos)
        hs = self.transformer.decoder.norm(x).transpose(0, 1)  # (B, Q+1, W)
        h = hs[:, :-1]
        for i, lin in enumerate(self.bbox_embed.layers):
            h = lin(h) if i == len(self.bbox_embed.layers) - 1 else torch.relu(lin(h))
        return h.sigmoid(), hs[:, -1] @ self.img_proj, hs[:, :-1] @ self.obj_proj

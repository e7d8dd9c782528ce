"""Pooling heads: token -> vector pooling (cls, mean, max, learned-query attention) and FLAIR's
text-conditioned attention pooling.

Text-conditioned attention pooling (FLAIR, Xiao et al., CVPR 2025, arXiv 2412.03561, Sec. 3, f_AttnPool):

    v_tc(I, T) = MHA( q = LN_q(t),  k = LN_k(P),  v = LN_v(P) )

with ``t`` the projected global text embedding of T (one query), ``P`` the projected patch
tokens of image I (CLS excluded). As in the released code (``PureAttentionPoolingBlock``: an
``nn.MultiheadAttention`` with ``add_zero_attn=True``, 8 heads, no final norm/projection),
the keys and values get one extra all-zero slot *after* their input projection: its logit is
0 and its value 0, so a text that matches no patch can put its attention mass there
("attend to nothing") instead of being forced onto some patch.

The module keeps the ``nn.MultiheadAttention`` parameters (so checkpoints map 1:1) but
evaluates them factorised: keys/values of every image are projected once, queries of every
text once, and all (image, text) pairs go through one ``scaled_dot_product_attention`` call.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "POOLINGS",
    "AttentionPool",
    "TextConditionedPooling",
    "max_pool",
    "mean_pool",
    "pool_tokens",
]

POOLINGS = ("cls", "mean", "max")


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, D) -> (B, D) average over tokens where ``mask`` (B, N) is True (all if None)."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def max_pool(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, D) -> (B, D) per-channel max over tokens where ``mask`` is True (CLIPpy)."""
    if mask is not None:
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), torch.finfo(tokens.dtype).min)
    return tokens.amax(dim=1)


def pool_tokens(
    kind: str, pooled: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch by name: "cls" returns the tower's ``pooled`` (B, D), "mean"/"max" pool tokens."""
    if kind == "cls":
        return pooled
    if kind == "mean":
        return mean_pool(tokens, mask)
    if kind == "max":
        return max_pool(tokens, mask)
    raise ValueError(f"unknown pooling '{kind}'; valid choices: {', '.join(POOLINGS)}")


class AttentionPool(nn.Module):
    """Learned-query attention pooling (CoCa / OpenCLIP ``AttentionalPooler``):
    Q learned queries attend over LN(tokens); returns (B, Q, D), or (B, D) when Q == 1."""

    def __init__(self, dim: int, heads: int = 8, num_queries: int = 1) -> None:
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.query = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.ln_k = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_k(tokens)  # (B, N, D)
        q = self.query.unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, Q, D)
        pad = None if mask is None else ~mask
        out = self.attn(q, x, x, key_padding_mask=pad, need_weights=False)[0]  # (B, Q, D)
        return out.squeeze(1) if out.shape[1] == 1 else out


class TextConditionedPooling(nn.Module):
    """FLAIR's text-conditioned attention pooling (see module docstring), batched over pairs.

    dim: embedding dim D (queries, keys and values all live in the joint embedding space);
    heads: 8 in the released code; zero_slot: the ``add_zero_attn`` "attend to nothing" slot.
    """

    def __init__(self, dim: int, heads: int = 8, zero_slot: bool = True) -> None:
        super().__init__()
        assert dim % heads == 0, f"embed dim {dim} must be divisible by pooling heads {heads}"
        self.dim, self.heads, self.zero_slot = dim, heads, zero_slot
        self.ln_q = nn.LayerNorm(dim)
        self.ln_k = nn.LayerNorm(dim)
        self.ln_v = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_zero_attn=zero_slot)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.dim // self.heads))  # (..., H, dh)

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        """(..., D) text embeddings -> (..., H, dh) projected queries (computed once per text)."""
        w_q = self.attn.in_proj_weight[: self.dim]
        b_q = self.attn.in_proj_bias[: self.dim]
        return self._split_heads(F.linear(self.ln_q(text), w_q, b_q))

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) patch tokens -> keys, values (B, H, N + zero_slot, dh), once per image."""
        d = self.dim
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        k = self._split_heads(F.linear(self.ln_k(tokens), w[d : 2 * d], b[d : 2 * d]))
        v = self._split_heads(F.linear(self.ln_v(tokens), w[2 * d :], b[2 * d :]))
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, dh)
        if self.zero_slot:  # appended after the projection, as nn.MultiheadAttention does
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, M, H, dh) queries per image, k/v (B, H, N', dh) -> pooled (B, M, D).

        One attention call for all B x M pairs; ``q`` may be an expanded (stride-0) view."""
        assert q.shape[0] == k.shape[0], f"queries for {q.shape[0]} images, keys for {k.shape[0]}"
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v)  # (B, H, M, dh)
        o = o.transpose(1, 2).flatten(2)  # (B, M, D)
        return self.attn.out_proj(o)

    def forward(self, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """text (B, M, D) queries for each image, tokens (B, N, D) -> pooled (B, M, D)."""
        assert text.dim() == 3 and tokens.dim() == 3, (
            f"expected text (B, M, D) and tokens (B, N, D), got {tuple(text.shape)}, {tuple(tokens.shape)}"
        )
        return self.attend(self.queries(text), *self.keys_values(tokens))

    def attention_weights(self, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, N + zero_slot) attention of each text over patches (last column: the zero
        slot when enabled), averaged over heads. For visualisation and tests."""
        q = self.queries(text).transpose(1, 2)  # (B, H, M, dh)
        k, _ = self.keys_values(tokens)  # (B, H, N', dh)
        att = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return att.softmax(dim=-1).mean(dim=1)

    def similarity(
        self, text: torch.Tensor, tokens: torch.Tensor, max_elements: int = 2**25
    ) -> torch.Tensor:
        """Cosine similarity of every image pooled with every text against that text.

        text (T, D), tokens (B, N, D) -> (B, T). Images are processed in chunks so that one
        chunk's pooled output (c, T, D) has at most ``max_elements`` entries; within a chunk
        all c x T pairs go through one attention call.
        """
        q = self.queries(text)  # (T, H, dh), projected once
        t = F.normalize(text, dim=-1)  # (T, D)
        chunk = max(1, max_elements // max(1, text.shape[0] * self.dim))
        out = []
        for start in range(0, tokens.shape[0], chunk):
            k, v = self.keys_values(tokens[start : start + chunk])
            qq = q.unsqueeze(0).expand(k.shape[0], *q.shape)  # (c, T, H, dh), no copy
            pooled = F.normalize(self.attend(qq, k, v), dim=-1)  # (c, T, D)
            out.append((pooled * t.unsqueeze(0)).sum(-1))  # (c, T)
        return torch.cat(out, dim=0)

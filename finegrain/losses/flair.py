"""FLAIR's losses (Xiao et al., CVPR 2025, arXiv 2412.03561, Sec. 3: L^tcs and L^mps).

Text-conditioned sigmoid loss L^tcs. Every image i is pooled (``TextConditionedPooling``)
against M = B + K - 1 texts: its own K sub-captions (positives, z = +1) and ONE sub-caption of
every other image j (negatives, z = -1); the pooled vector is compared with the very text that
produced it:

    L_tcs = -1/n Σ_i Σ_m log σ( z_im (t <v_tc(I_i, T_m) / |.|, T_m / |T_m|> + b) )

Multi-positive sigmoid loss L^mps: global image embedding vs all B x K global sub-caption
embeddings, K positives per image (``finegrain.losses.contrastive.multi_positive_sigmoid_loss``).

Which caption of image j is the negative for image i is a deterministic non-linear hash of the
two samples' seeds (``pair_offsets``: 32-bit splitmix-style mixing on int64 tensors, so the
choices of different pairs behave as independent uniform draws), so that the loss is a pure function of the features: exact
under feature-caching gradient accumulation and identical on 1 process and on N ranks.
(The released code draws it with ``torch.randint`` inside the loss.)

Normalisation ``n`` (option ``normalization``):
- "released" (default, as ``FlairLoss`` in ExplainableML/flair): L_tcs divided by the number of
  texts per image, B + K - 1; L_mps divided by the number of texts, B * K.
- "per_image": both divided by the number of images B (SigLIP / big_vision convention).

Distributed: B above is the *joined* batch. Every rank computes its own images against the
texts of all ranks (other ranks' texts are negatives only, exchanged with gradient: all-gather
or ring), normalised so that the mean over ranks equals one process on the joined batch
(the convention of ``finegrain.losses.distributed``). The released code instead pools each
image against the neighbour rank's already-subsampled (B + K - 1) texts of the same row index
and divides by the local sizes, which depends on the world size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finegrain.heads.pooling import TextConditionedPooling
from finegrain.losses.contrastive import at_least_fp32, multi_positive_sigmoid_loss
from finegrain.losses.distributed import (
    all_gather_no_grad,
    gather_features,
    ring_pass,
    world_info,
)

__all__ = [
    "NORMALIZATIONS",
    "flair_multi_positive_loss",
    "pair_offsets",
    "text_conditioned_sigmoid_loss",
]

NORMALIZATIONS = ("released", "per_image")
EXCHANGES = ("gather", "ring")
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32): the constant is split into 16-bit halves so
    no product exceeds 2^48 (exact on every device, no reliance on signed overflow)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Finaliser of a 32-bit splitmix-style hash (Wellons' "lowbias32": xor-shift, multiply,
    xor-shift, multiply, xor-shift): every input bit flips every output bit with p ~ 1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed32(seed: torch.Tensor) -> torch.Tensor:
    """int64 seeds (any sign, any size) -> hashed 32-bit values in [0, 2^32) as int64."""
    s = seed.long()
    hi = (s >> 32) & _M32  # arithmetic shift; masked, so the sign bits fold in too
    return _mix32((s & _M32) ^ _mix32(hi ^ 0x9E3779B9))


def pair_offsets(seed_rows: torch.Tensor, seed_cols: torch.Tensor, k: int) -> torch.Tensor:
    """(R,), (C,) int sample seeds -> (R, C) caption index in [0, k) of column sample j used as
    the negative for row sample i. A non-linear hash of the (row, column) seed pair, computed
    with int64 tensor ops on the seeds' device: choices for different pairs behave as
    independent uniform draws (no additive structure across a 2x2 block of pairs), and a pair's
    choice depends only on the two seeds, so it is the same under accumulation and on any rank.
    """
    a = _seed32(seed_rows)[:, None]  # (R, 1)
    b = _seed32(seed_cols)[None, :]  # (1, C)
    h = _mix32((_mix32(a ^ 0x85EBCA6B) + b) & _M32)  # (R, C)
    return h.remainder(k)


def _check_inputs(
    tokens: torch.Tensor, texts: torch.Tensor, normalization: str, exchange: str
) -> None:
    if tokens.dim() != 3 or texts.dim() != 3 or tokens.shape[0] != texts.shape[0]:
        raise ValueError(
            f"expected tokens (B, N, D) and texts (B, K, D), got {tuple(tokens.shape)} and "
            f"{tuple(texts.shape)}"
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization '{normalization}'; valid choices: {', '.join(NORMALIZATIONS)}"
        )
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange '{exchange}'; valid choices: {', '.join(EXCHANGES)}")


def _block(
    pooling: TextConditionedPooling,
    kv: tuple[torch.Tensor, torch.Tensor],
    texts: torch.Tensor,
    idx: torch.Tensor,
    n_pos: int,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
) -> torch.Tensor:
    """Σ -log σ(z (t cos + b)) for image i vs texts[idx[i, m]]; the first n_pos columns are
    positives. texts (T, D) un-normalised, idx (B, M) -> scalar."""
    q = pooling.queries(texts)[idx]  # (B, M, H, dh): each text projected once, then picked
    pooled = F.normalize(pooling.attend(q, *kv), dim=-1)  # (B, M, D)
    target = F.normalize(texts, dim=-1)[idx]  # (B, M, D)
    logits = at_least_fp32(logit_scale * (pooled * target).sum(-1) + logit_bias)  # (B, M)
    signs = -torch.ones_like(logits)
    signs[:, :n_pos] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _foreign_index(
    rows: torch.Tensor,
    cols: torch.Tensor,
    seeds_r: torch.Tensor,
    seeds_c: torch.Tensor,
    k: int,
    *,
    drop_self: bool,
) -> torch.Tensor:
    """Flat caption indices (R, C - drop_self): for row image i, caption ``pair_offsets`` of
    every column image j (``cols`` are positions 0..C-1 of a (C, K) text block); with
    ``drop_self`` each row's own image (rows[i] == cols[j], exactly one per row) is left out."""
    off = pair_offsets(seeds_r, seeds_c, k)  # (R, C)
    flat = torch.arange(cols.shape[0], device=off.device)[None, :] * k + off  # (R, C)
    if not drop_self:
        return flat
    keep = cols[None, :] != rows[:, None]  # (R, C), one False per row
    return flat[keep].view(rows.shape[0], cols.shape[0] - 1)


def text_conditioned_sigmoid_loss(
    pooling: TextConditionedPooling,
    tokens: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    pair_seed: torch.Tensor | None = None,
    exchange: str = "gather",
    normalization: str = "released",
) -> torch.Tensor:
    """FLAIR L^tcs (see module docstring), batched: keys/values of every image and queries
    of every text are projected once; all B x (B + K - 1) pairs go through one attention call.

    tokens: (B, N, D) projected patch tokens; texts: (B, K, D) projected sub-caption
    embeddings (not normalised: they are the pooling queries); pair_seed: (B,) per-sample
    seeds choosing the negative captions (default: the global sample index).
    """
    _check_inputs(tokens, texts, normalization, exchange)
    rank, world = world_info()
    b, k, d = texts.shape
    rows = torch.arange(b, device=texts.device) + rank * b  # global indices of local images
    seeds = rows if pair_seed is None else pair_seed.to(texts.device).long()
    all_seeds = all_gather_no_grad(seeds)  # (Bg,)
    kv = pooling.keys_values(tokens)  # (B, H, N+1, dh) each, once per image
    own = torch.arange(b, device=texts.device)[:, None] * k + torch.arange(k, device=texts.device)
    if exchange == "gather" or world == 1:
        all_texts = gather_features(texts, with_grad=True)  # (Bg, K, D)
        cols = torch.arange(all_texts.shape[0], device=texts.device)
        idx = torch.cat(
            [own + rank * b * k, _foreign_index(rows, cols, seeds, all_seeds, k, drop_self=True)], 1
        )
        total = _block(pooling, kv, all_texts.reshape(-1, d), idx, k, logit_scale, logit_bias)
    else:  # ring: hold one other rank's (B, K, D) text block at a time
        local = torch.arange(b, device=texts.device)
        idx = torch.cat([own, _foreign_index(local, local, seeds, seeds, k, drop_self=True)], 1)
        total = _block(pooling, kv, texts.reshape(-1, d), idx, k, logit_scale, logit_bias)
        block = texts
        for s in range(1, world):
            block = ring_pass(block)  # the texts of rank (rank - s)
            src = (rank - s) % world
            src_seeds = all_seeds[src * b : (src + 1) * b]
            idx = _foreign_index(
                rows, local + src * b, seeds, src_seeds, k, drop_self=False
            )  # (B, B)
            total = total + _block(
                pooling, kv, block.reshape(-1, d), idx, 0, logit_scale, logit_bias
            )
    if normalization == "per_image":
        return total / b
    return total * world / (b * world + k - 1)


def flair_multi_positive_loss(
    image: torch.Tensor,
    texts: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    exchange: str = "gather",
    normalization: str = "released",
) -> torch.Tensor:
    """FLAIR L^mps: global image (B, D) vs all B x K global sub-captions (B, K, D), both
    L2-normalised, K positives per image; other ranks' captions are negatives. Wraps
    ``multi_positive_sigmoid_loss`` (normalised by B) and rescales to the chosen convention
    ("released": divided by the number of texts B * K)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization '{normalization}'; valid choices: {', '.join(NORMALIZATIONS)}"
        )
    loss = multi_positive_sigmoid_loss(image, texts, logit_scale, logit_bias, exchange=exchange)
    return loss / texts.shape[1] if normalization == "released" else loss

"""Contrastive losses between image and text embeddings: softmax (CLIP), sigmoid (SigLIP) and
multi-positive sigmoid (several captions per image, FLAIR / multi-positive SigLIP).

All inputs are L2-normalised embeddings; ``logit_scale`` is the multiplier ``t`` (already
exponentiated), ``logit_bias`` the additive ``b``. Logits are computed in the input dtype
(bf16/fp16 under autocast) and the loss itself in float32 (float64 inputs stay float64, so
exactness checks can run the whole graph in double).

Distributed behaviour (see ``finegrain.losses.distributed``): every function returns the loss
of the *local* rows against the features of all ranks, normalised so that the mean over ranks
equals the single-process loss on the joined batch; gradients reach the rank that produced a
feature, so DDP's gradient averaging gives exactly the joined-batch gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from finegrain.losses.distributed import gather_features, ring_pass, world_info

Exchange = Literal["ring", "gather"]
EXCHANGES = ("ring", "gather")


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or kept in float64: losses never run in bf16/fp16."""
    return x if x.dtype == torch.float64 else x.float()


def _check_pair(image: torch.Tensor, text: torch.Tensor) -> None:
    if image.dim() != 2 or text.dim() != 2:
        raise ValueError(
            f"expected image (B, D) and text (B, D), got {tuple(image.shape)} and {tuple(text.shape)}"
        )
    if image.shape != text.shape:
        raise ValueError(
            f"image and text embeddings must have the same shape (B, D), got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )


def _check_exchange(exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange '{exchange}'; valid choices: {', '.join(EXCHANGES)}")


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    local_loss: bool = True,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, "CLIP", Fig. 3 pseudo-code):

        L = 1/2 [ -1/N Σ_i log softmax_j(t x_i·y_j)_i  -1/N Σ_j log softmax_i(t x_i·y_j)_j ]

    image, text: (B, D) normalised; logit_scale: t. With ``gather`` the negatives are the
    features of all ranks (gathered with gradient). ``local_loss`` (default) computes only this
    rank's B rows against all N = world*B columns in both directions, so memory is O(B N) and
    not O(N^2) (OpenCLIP ``--local-loss --gather-with-grad``); the mean over ranks of these
    local losses is the full loss. Without ``local_loss`` every rank computes the full N x N loss.
    """
    _check_pair(image, text)
    rank, world = world_info()
    b = image.shape[0]
    if not gather or world == 1:
        all_image, all_text, offset = image, text, 0
    else:
        all_image = gather_features(image, with_grad=True)  # (N, D)
        all_text = gather_features(text, with_grad=True)  # (N, D)
        offset = rank * b
        if not local_loss:
            image, text, offset = all_image, all_text, 0
    logits_i2t = at_least_fp32(logit_scale * image @ all_text.t())  # (B, N)
    logits_t2i = at_least_fp32(logit_scale * text @ all_image.t())  # (B, N)
    labels = torch.arange(image.shape[0], device=image.device) + offset
    return 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))


def _sigmoid_block(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    positives: torch.Tensor | None,
) -> torch.Tensor:
    """Σ over the block of -log σ(z_ij (t x_i·y_j + b)); z = +1 on ``positives`` else -1.

    image (B, D), text (M, D), positives (B, M) bool or None (all negatives)."""
    logits = at_least_fp32(logit_scale * image @ text.t() + logit_bias)  # (B, M)
    if positives is None:
        signs = -torch.ones_like(logits)
    else:
        signs = positives.to(logits.dtype) * 2.0 - 1.0
    return -F.logsigmoid(signs * logits).sum()


def _sigmoid_over_ranks(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    positives: torch.Tensor,
    exchange: str,
) -> torch.Tensor:
    """Local block with ``positives`` plus all-negative blocks against other ranks' texts."""
    _check_exchange(exchange)
    rank, world = world_info()
    total = _sigmoid_block(image, text, logit_scale, logit_bias, positives)
    if world == 1:
        return total
    if exchange == "ring":
        # big_vision's chunked loss: hold one other rank's text block at a time.
        block = text
        for _ in range(world - 1):
            block = ring_pass(block)  # texts of rank - s, s = 1..world-1
            total = total + _sigmoid_block(image, block, logit_scale, logit_bias, None)
        return total
    all_text = gather_features(text, with_grad=True)  # (world*M, D)
    others = torch.cat([c for r, c in enumerate(all_text.chunk(world)) if r != rank])
    return total + _sigmoid_block(image, others, logit_scale, logit_bias, None)


def siglip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    exchange: Exchange = "ring",
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023, "SigLIP", Eq. 1 / Algorithm 1):

        L = -1/B Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)),  z_ij = 1 if i == j else -1,

    normalised by the local batch B as in big_vision (a sum over pairs, not a mean). Across
    ranks, j runs over the texts of all ranks; ``exchange="ring"`` passes text blocks around
    the ring (only one foreign block held at a time, as big_vision's chunked implementation),
    ``"gather"`` all-gathers them at once. Both give the same loss and gradient.
    """
    _check_pair(image, text)
    b = image.shape[0]
    positives = torch.eye(b, dtype=torch.bool, device=image.device)  # (B, B)
    total = _sigmoid_over_ranks(image, text, logit_scale, logit_bias, positives, exchange)
    return total / b


def multi_positive_sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    exchange: Exchange = "ring",
) -> torch.Tensor:
    """Sigmoid loss with K positive captions per image (FLAIR, Xiao et al. 2025, the
    multi-positive global loss next to Eq. 4; SigLIP Eq. 1 with several positives):

        L = -1/B Σ_i Σ_{(j,k)} log σ(z_ijk (t x_i·y_jk + b)),  z_ijk = 1 if i == j else -1,

    image: (B, D); text: (B, K, D), caption k of image j. Every image is scored against all
    B*K local texts (K positives) and all texts of other ranks (negatives, exchanged with
    gradient); normalised by the local image count B as ``siglip_loss``.
    """
    if image.dim() != 2 or text.dim() != 3 or text.shape[0] != image.shape[0]:
        raise ValueError(
            f"expected image (B, D) and text (B, K, D), got {tuple(image.shape)} and "
            f"{tuple(text.shape)}"
        )
    if text.shape[-1] != image.shape[-1]:
        raise ValueError(
            f"embedding dims differ: image D={image.shape[-1]}, text D={text.shape[-1]}"
        )
    b, k, d = text.shape
    flat = text.reshape(b * k, d)  # (B*K, D), captions of image j at rows j*K .. j*K+K-1
    owner = torch.arange(b, device=image.device).repeat_interleave(k)  # (B*K,)
    positives = owner[None, :] == torch.arange(b, device=image.device)[:, None]  # (B, B*K)
    total = _sigmoid_over_ranks(image, flat, logit_scale, logit_bias, positives, exchange)
    return total / b

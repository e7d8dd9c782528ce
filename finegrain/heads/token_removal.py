"""Which patch tokens the student keeps: attention-based removal (A-CLIP, Yang et al. 2023,
Sec. 3.2; DetailCLIP, Monsefi et al. 2024, Sec. 3) and random removal (FLIP-style ablation).

Attention-based (released ``get_att_mask``): the teacher's CLS-to-patch attention, averaged over
layers and heads, is pooled into blocks of 2x2 patches (the released bilinear 14x14 -> 7x7 resize
is exactly a 2x2 average), the ``n_keep`` highest-scoring blocks are kept with all four of their
patches, the rest removed. Released count: ``n_keep = int(n_blocks * keep_ratio) + 1`` (25 of 49
blocks at 224 px for ``--mask-ratio 0.5``, which is a keep ratio despite its name);
``count="floor"`` keeps ``int(n_blocks * keep_ratio)`` (the paper's "keep 50%" reading).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KeepCount = Literal["released", "floor"]


def check_block_grid(grid_hw: tuple[int, int], block: int = 2) -> None:
    h, w = grid_hw
    if h % block or w % block:
        raise ValueError(
            f"patch grid {h}x{w} cannot be divided into {block}x{block} patch blocks; use an "
            f"image size that is a multiple of {block} x patch_size"
        )


def num_kept_blocks(n_blocks: int, keep_ratio: float, count: KeepCount = "released") -> int:
    """How many blocks survive; one-line error when none would."""
    if count not in ("released", "floor"):
        raise ValueError(f"unknown keep count rule '{count}'; valid choices: released, floor")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    k = int(n_blocks * keep_ratio) + (1 if count == "released" else 0)
    k = min(k, n_blocks)
    if k < 1:
        raise ValueError(
            f"keep_ratio {keep_ratio} keeps no token of {n_blocks} patch blocks; "
            f"use keep_ratio >= {1.0 / n_blocks:.4f}"
        )
    return k


def block_scores(attn: torch.Tensor, grid_hw: tuple[int, int], block: int = 2) -> torch.Tensor:
    """attn (B, N) CLS-to-patch scores on the full grid -> (B, h/2 * w/2) block means."""
    check_block_grid(grid_hw, block)
    b = attn.shape[0]
    h, w = grid_hw
    pooled = F.avg_pool2d(attn.reshape(b, 1, h, w).float(), block)  # (B, 1, h/2, w/2)
    return pooled.reshape(b, -1)


def blocks_to_patches(
    blocks: torch.Tensor, grid_hw: tuple[int, int], block: int = 2
) -> torch.Tensor:
    """(B, K) block indices -> (B, K*block^2) patch indices (row-major over the full grid), sorted."""
    h, w = grid_hw
    bw = w // block
    r, c = blocks // bw, blocks % bw  # (B, K)
    dr = torch.arange(block, device=blocks.device)
    rows = r[..., None, None] * block + dr[:, None]  # (B, K, block, 1)
    cols = c[..., None, None] * block + dr[None, :]  # (B, K, 1, block)
    idx = (rows * w + cols).reshape(blocks.shape[0], -1)  # (B, K*block^2)
    return idx.sort(dim=1).values


def removed_from_keep(keep: torch.Tensor, n: int) -> torch.Tensor:
    """(B, M) kept indices -> (B, N - M) removed indices, sorted (same count for every row)."""
    b = keep.shape[0]
    mask = torch.ones(b, n, dtype=torch.bool, device=keep.device)
    mask.scatter_(1, keep, False)
    idx = torch.arange(n, device=keep.device).expand(b, n)
    return idx[mask].reshape(b, n - keep.shape[1])


def attention_keep(
    attn: torch.Tensor,
    grid_hw: tuple[int, int],
    keep_ratio: float,
    count: KeepCount = "released",
    block: int = 2,
) -> torch.Tensor:
    """(B, N) teacher attention -> (B, M) kept patch indices (the top blocks' patches, sorted)."""
    scores = block_scores(attn, grid_hw, block)  # (B, nb)
    k = num_kept_blocks(scores.shape[1], keep_ratio, count)
    top = scores.topk(k, dim=1).indices  # (B, k)
    return blocks_to_patches(top, grid_hw, block)


def random_keep(
    b: int,
    grid_hw: tuple[int, int],
    keep_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    count: KeepCount = "released",
    block: int = 2,
) -> torch.Tensor:
    """Random removal ablation with the same block structure and count as attention removal."""
    check_block_grid(grid_hw, block)
    nb = (grid_hw[0] // block) * (grid_hw[1] // block)
    k = num_kept_blocks(nb, keep_ratio, count)
    noise = torch.rand(b, nb, generator=generator, device=device)
    top = noise.argsort(dim=1)[:, :k]
    return blocks_to_patches(top, grid_hw, block)

"""Pixel reconstruction loss of MAE (He et al. 2022, Sec. 3, "normalized pixels" of Table 1d;
released ``reconstLoss`` with ``norm_pix_loss=True``), on removed patches only.

    target_j = (x_j - mean(x_j)) / sqrt(var(x_j) + 1e-6)   (per patch j, unbiased variance)
    L = sum_{b, j removed} mean_c (pred_bj - target_bj)^2 / #removed
"""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), patches row-major, pixels in (row, col, channel) order."""
    b, c, hh, ww = images.shape
    p = patch_size
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not divisible by patch_size {p}")
    h, w = hh // p, ww // p
    x = images.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(b, h * w, p * p * c)


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of the targets (MAE ``norm_pix_loss``)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE / released
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """pred, target: (..., R, P) already restricted to the removed patches -> scalar mean."""
    assert pred.shape == target.shape, f"pred {tuple(pred.shape)} != target {tuple(target.shape)}"
    if pred.shape[-2] == 0:
        return pred.sum() * 0.0
    dt = torch.promote_types(pred.dtype, torch.float32)
    return (pred.to(dt) - target.to(dt)).pow(2).mean()

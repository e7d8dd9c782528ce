"""Projections from a tower's width into the joint image-text embedding space."""

from __future__ import annotations

import torch
import torch.nn as nn

PROJECTIONS = ("linear", "none")


class Projection(nn.Module):
    """``linear``: a bias-free linear map ``width -> embed_dim`` (CLIP's ``W_i`` / ``W_t``,
    Radford et al. 2021, Fig. 3), init N(0, width^-1/2) as OpenCLIP. ``none``: identity, only
    valid when ``width == embed_dim``."""

    def __init__(
        self, width: int, embed_dim: int, kind: str = "linear", *, where: str = ""
    ) -> None:
        super().__init__()
        if kind not in PROJECTIONS:
            raise ValueError(
                f"unknown projection '{kind}'; valid choices: {', '.join(PROJECTIONS)}"
            )
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        if kind == "none" and width != embed_dim:
            raise ValueError(
                f"projection 'none' needs the {where or 'tower'} width ({width}) to equal "
                f"embed_dim ({embed_dim}); use projection 'linear' or set embed_dim={width}"
            )
        self.width, self.embed_dim, self.kind = width, embed_dim, kind
        self.proj = nn.Linear(width, embed_dim, bias=False) if kind == "linear" else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=width**-0.5)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor | None) -> bool:
        """Copy a pretrained (embed_dim, width) projection (e.g. open_clip's); False if it
        does not fit (absent, other shape, or no linear map)."""
        if (
            self.proj is None
            or weight is None
            or tuple(weight.shape) != tuple(self.proj.weight.shape)
        ):
            return False
        self.proj.weight.copy_(weight)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)  # (..., width) -> (..., embed_dim)

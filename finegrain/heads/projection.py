"""Projections from a tower's width into the joint image-text embedding space (every method)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTIONS = ("linear", "none")


class Projection(nn.Module):
    """``linear``: a bias-free linear map ``width -> embed_dim`` (CLIP's ``W_i`` / ``W_t``,
    Radford et al. 2021, Fig. 3), ``weight`` (embed_dim, width), init N(0, width^-1/2) as
    OpenCLIP (or ``weight`` given, e.g. to keep a method's historical initialisation). ``none``:
    identity, only valid when ``width == embed_dim``.

    State dict key: ``<name>.weight``. Checkpoints written when the map was a child
    ``nn.Linear`` (``<name>.proj.weight``) still load."""

    def __init__(
        self,
        width: int,
        embed_dim: int,
        kind: str = "linear",
        *,
        where: str = "",
        weight: torch.Tensor | None = None,
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
        self.weight: nn.Parameter | None = None
        if kind == "linear":
            if weight is None:
                # nn.Linear's own init first, then OpenCLIP's: the same random draws as before
                weight = nn.Linear(width, embed_dim, bias=False).weight.detach()
                nn.init.normal_(weight, std=width**-0.5)
            if tuple(weight.shape) != (embed_dim, width):
                raise ValueError(
                    f"projection weight must be (embed_dim, width) = {(embed_dim, width)}, got "
                    f"{tuple(weight.shape)}"
                )
            self.weight = nn.Parameter(weight.detach().contiguous())
        self._register_load_state_dict_pre_hook(_legacy_keys)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor | None) -> bool:
        """Copy a pretrained (embed_dim, width) projection (e.g. open_clip's); False if it
        does not fit (absent, other shape, or no linear map)."""
        if self.weight is None or weight is None or tuple(weight.shape) != tuple(self.weight.shape):
            return False
        self.weight.copy_(weight)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return x
        return F.linear(x, self.weight)  # (..., width) -> (..., embed_dim)


def _legacy_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``<prefix>proj.weight`` (the former child nn.Linear) -> ``<prefix>weight``."""
    old = prefix + "proj.weight"
    if old in state_dict and prefix + "weight" not in state_dict:
        state_dict[prefix + "weight"] = state_dict.pop(old)

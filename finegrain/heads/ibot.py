"""The iBOT projection head (Zhou et al. 2022, "iBOT", Sec. 3; DINO, Caron et al. 2021, Sec. 3.1),
as DetailCLIP uses it (Monsefi et al. 2024, arXiv 2409.06809; released code: ``iBOTHead`` with
``shared_head=True``, ``norm=None``, ``act='gelu'``).

    h(x) = W_last · normalize(MLP(x)),   MLP: Linear(D, H) -> GELU -> Linear(H, H) -> GELU -> Linear(H, 256)

``W_last`` is a weight-normalised linear map 256 -> K (K = 8,192 in DetailCLIP, 8,192 patch
prototypes shared with the CLS prototypes): ``W_last[k] = g_k v_k / ||v_k||`` with ``g`` fixed to
1 (``norm_last_layer=True``, the DINO default), so the logits are cosine similarities between the
normalised bottleneck and K learned prototypes. One head serves both the CLS token and the patch
tokens (``shared_head``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightNormLinear(nn.Module):
    """Bias-free ``nn.utils.weight_norm(nn.Linear(d_in, d_out, bias=False))`` (norm over each
    output row). ``learn_scale=False`` keeps g == 1 as a buffer (DINO's ``norm_last_layer``)."""

    def __init__(self, d_in: int, d_out: int, learn_scale: bool = False) -> None:
        super().__init__()
        v = torch.empty(d_out, d_in)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default init, as the released head
        self.weight_v = nn.Parameter(v)
        g = torch.ones(d_out, 1)
        if learn_scale:
            self.weight_g = nn.Parameter(g)
        else:
            self.register_buffer("weight_g", g)

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class IBOTHead(nn.Module):
    """3-layer MLP to a ``bottleneck`` (256), L2 normalisation, weight-normed layer to
    ``out_dim`` prototypes. Works on (..., D) inputs: CLS (B, D) or tokens (B, N, D)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 8192,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"iBOT head num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # DINO init: trunc-normal(0.02), zero bias
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)  # (..., bottleneck)
        return self.last_layer(z)  # (..., K)

"""The exported image backbone loads into timm's VisionTransformer with equal outputs."""

from __future__ import annotations

import functools

import pytest
import torch

from finegrain.encoders.base import ImageTowerConfig
from finegrain.encoders.export import export_image_backbone, image_backbone_to_timm
from finegrain.encoders.vit import VisionTransformer

timm = pytest.importorskip("timm")


def test_native_vit_exports_to_timm_with_equal_outputs(tmp_path):
    tower = VisionTransformer(ImageTowerConfig(image_size=32, patch_size=8, width=32, depth=2,
                                               heads=2)).eval()  # fmt: skip
    with torch.no_grad():  # non-trivial norms and biases
        for p in tower.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd, kwargs = image_backbone_to_timm(tower)
    vit = timm.models.vision_transformer.VisionTransformer(
        **kwargs, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)
    ).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = tower(x)
        theirs = vit.forward_features(x)  # (B, 1 + N, D)
    torch.testing.assert_close(theirs[:, 0], ours.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs[:, 1:], ours.tokens, atol=1e-5, rtol=1e-5)

    class M(torch.nn.Module):
        image = tower

    out = export_image_backbone(M(), str(tmp_path / "b.pth"))
    loaded = torch.load(tmp_path / "b.pth")
    assert loaded["timm_kwargs"] == out["timm_kwargs"] and "pos_embed" in loaded["state_dict"]


def test_unsupported_tower_is_one_line():
    with pytest.raises(ValueError, match="cannot be exported to timm; valid towers"):
        image_backbone_to_timm(torch.nn.Linear(2, 2))

"""timm ViT position embedding done from public attributes (``vit_pos_embed``) equals timm's own
``forward_features`` for every layout timm's VisionTransformer has: class token or not, register
tokens, position table over the prefix or not (``no_embed_class``), no table, dynamic image size
(resampled table) or fixed, and through the tower for the model families the recipes use."""

from __future__ import annotations

import pytest
import torch

from finegrain.encoders import ImageTowerConfig, build_image_tower
from finegrain.encoders.timm_tower import vit_pos_embed

from helpers.numerics import assert_close_scaled

timm = pytest.importorskip("timm")

LAYOUTS = {  # name: VisionTransformer keyword arguments
    "cls": {},
    "cls+reg": {"reg_tokens": 3},
    "no_embed_class": {"no_embed_class": True},
    "no_embed_class+reg": {"no_embed_class": True, "reg_tokens": 2},
    "gap, no cls": {"class_token": False, "global_pool": "avg"},
    "no table": {"pos_embed": "none"},
}


def _tiny_vit(dynamic: bool, **kw) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          num_classes=0, dynamic_img_size=dynamic, **kw)  # fmt: skip
    with torch.no_grad():  # timm inits cls/reg tokens near 0: make every term count
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.double().eval()


def _ours(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.norm(m.blocks(m.norm_pre(m.patch_drop(vit_pos_embed(m, m.patch_embed(x))))))


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pos_embed_equals_forward_features(layout, dynamic):
    m = _tiny_vit(dynamic, **LAYOUTS[layout])
    sizes = [(32, 32), (48, 64)] if dynamic else [(32, 32)]  # 48x64: a resampled table
    for h, w in sizes:
        x = torch.randn(2, 3, h, w, dtype=torch.float64)
        ref = m.forward_features(x)
        if layout == "no table" and ref.shape[1] == (h // 8) * (w // 8):
            pytest.skip("this timm drops the class token when there is no position table")
        assert ref.shape[1] == m.num_prefix_tokens + (h // 8) * (w // 8)
        assert_close_scaled(_ours(m, x), ref, rtol=1e-12, atol_rel=1e-12, msg=f"{layout} {h}x{w}")


@pytest.mark.parametrize(
    "model, size",
    [
        ("vit_tiny_patch16_224", 48),  # CLS, table over the prefix (the ViT-B/16 layout)
        ("deit3_small_patch16_224", 32),  # no_embed_class
        ("vit_small_patch14_reg4_dinov2", 28),  # registers, no_embed_class
    ],
)
def test_tower_equals_forward_features(model, size):
    tower = build_image_tower(ImageTowerConfig(name="timm", model=model, image_size=size))
    tower = tower.double().eval()
    for h, w in [(size, size), (size * 2, size)]:  # the second: a resampled table
        x = torch.randn(1, 3, h, w, dtype=torch.float64)
        feats = tower.model.forward_features(x)
        out = tower(x)
        p = tower.num_prefix_tokens
        assert_close_scaled(out.tokens, feats[:, p:], rtol=1e-10, atol_rel=1e-12, msg=model)
        assert_close_scaled(out.pooled, feats[:, 0], rtol=1e-10, atol_rel=1e-12, msg=model)

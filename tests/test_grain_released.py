"""GRAIN's released checkpoints (grain-clip ``train.py``: ``{"state_dict": ObjDecoder,
"backbone_state_dict": CLIP_VITB16, ...}``): the backbone's image tower (timm ViT with per-head
q/k LayerNorm under ``visual.``) loads as ``image.pretrained=`` of ``grain_vitb16``'s tower with
equal outputs (issue 29)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from finegrain.encoders.base import build_image_tower
from finegrain.recipes.base import get_recipe

from helpers.released import ReleasedCLIPText, timm_vit

pytest.importorskip("timm")


def test_grain_training_checkpoint_backbone_loads_as_image_pretrained(tmp_path):
    torch.manual_seed(0)
    vis = timm_vit(32, 8, 64, 2, 4, qk_norm=True)
    text = ReleasedCLIPText(49408, 12, 64, 1, 2, 16)
    backbone = {f"visual.{k}": v for k, v in vis.state_dict().items()}
    backbone.update(text.state_dict())  # token_embedding, transformer.resblocks.*, ...
    backbone.update({"image_projection": torch.randn(64, 16), "logit_scale": torch.tensor(2.0)})
    decoder = {"query_embed.weight": torch.randn(6, 64), "proj.weight": torch.randn(64, 64)}
    ck = {"epoch": 3, "state_dict": decoder, "best_acc": 1.0,
          "backbone_state_dict": {f"module.{k}": v for k, v in backbone.items()}}  # fmt: skip
    torch.save(ck, tmp_path / "new_gala_5_queries_epoch3.pth.tar")
    image = dataclasses.replace(get_recipe("grain_vitb16").method.image, image_size=32,
                                patch_size=8, width=64, depth=2, heads=4,
                                pretrained=str(tmp_path / "new_gala_5_queries_epoch3.pth.tar"))  # fmt: skip
    tower = build_image_tower(image).eval()
    x = torch.randn(2, 3, 32, 32)
    out = tower(x)
    want = vis.forward_features(x)
    torch.testing.assert_close(torch.cat([out.pooled[:, None], out.tokens], 1), want,
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # broken variant: without the q/k norms the released weights do not fit
    with pytest.raises(ValueError, match="do not fit VisionTransformer"):
        build_image_tower(dataclasses.replace(image, qk_norm=False))

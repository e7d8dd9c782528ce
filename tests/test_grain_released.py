"""GRAIN's released checkpoints (grain-clip ``train.py``: ``{"state_dict": ObjDecoder,
"backbone_state_dict": CLIP_VITB16, ...}``): the backbone's image tower (timm ViT with per-head
q/k LayerNorm under ``visual.``) loads as ``image.pretrained=`` of ``grain_vitb16``'s tower with
equal outputs, and the whole checkpoint (region decoder, towers, projections) loads as
``grain:FILE`` with the released model's outputs (issue 29)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import finegrain
from finegrain.encoders.base import build_image_tower
from finegrain.interop import load_method_spec
from finegrain.interop.detailclip import IMAGENET_MEAN
from finegrain.losses.matching import box_cxcywh_to_xyxy
from finegrain.recipes.base import get_recipe

from helpers.released import ReleasedCLIPText, ReleasedGRAINDecoder, eot_ids, timm_vit

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


def _released_checkpoint(path, seed: int = 0):
    """A tiny GRAIN training checkpoint in train.py's layout; returns the released models."""
    torch.manual_seed(seed)
    vis = timm_vit(32, 8, 64, 2, 4, qk_norm=True)
    text = ReleasedCLIPText(49408, 12, 64, 2, 1, 24).eval()
    dec = ReleasedGRAINDecoder(64, 32, 8, 48, 2, 5, 24).eval()
    backbone = {f"visual.{k}": v for k, v in vis.state_dict().items()}
    backbone.update(text.state_dict())
    backbone.update({"image_projection": torch.randn(64, 24), "logit_scale": torch.tensor(2.5)})
    ck = {"epoch": 3, "iteration": 99, "best_acc": 1.0, "optimizer": {"state": {}, "param_groups": []},
          "state_dict": {f"module.{k}": v for k, v in dec.state_dict().items()},
          "backbone_state_dict": {f"module.{k}": v for k, v in backbone.items()}}  # fmt: skip
    torch.save(ck, path)
    return vis, text, dec


def test_grain_spec_loads_the_training_checkpoint_with_equal_outputs(tmp_path):
    path = tmp_path / "new_gala_5_queries_ep_3.pth.tar"
    vis, text, dec = _released_checkpoint(path)
    model, preprocess = finegrain.load(f"grain:{path}")
    method = model.method
    assert method.cfg.name == "grain" and method.cfg.num_region_queries == 5
    assert model.config.data.mean == IMAGENET_MEAN and model.config.method.image.image_size == 32
    x, ids = torch.randn(3, 3, 32, 32), eot_ids(3, 12, 49408)
    with torch.no_grad():
        boxes, img, regions = dec(vis.forward_features(x))
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(method.encode_image(x), F.normalize(img, dim=-1), **close)
        torch.testing.assert_close(method.region_embeddings(x), F.normalize(regions, dim=-1),
                                   **close)  # fmt: skip
        torch.testing.assert_close(method.predict_boxes(x), box_cxcywh_to_xyxy(boxes), **close)
        want_text = F.normalize(text.encode_text(ids), dim=-1)
        torch.testing.assert_close(method.encode_text(ids), want_text, **close)
    assert method.logit_scale.item() == pytest.approx(2.5)


def test_grain_spec_comparison_tells_self_from_cross_attention(tmp_path):
    """Broken mapping variant: the two decoder attentions have the same shapes, so a swapped
    mapping loads strictly; the output comparison above is what tells them apart."""
    path = tmp_path / "ck.pth.tar"
    vis, _, dec = _released_checkpoint(path)
    method, _ = load_method_spec(f"grain:{path}")
    sd = method.state_dict()
    for i in range(2):
        a, b = f"decoder.layers.{i}.self_attn.", f"decoder.layers.{i}.cross_attn."
        for k in [k for k in sd if k.startswith(a)]:
            sd[k], sd[b + k[len(a) :]] = sd[b + k[len(a) :]], sd[k]
    method.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, img, _ = dec(vis.forward_features(x))
        assert not torch.allclose(method.encode_image(x), F.normalize(img, dim=-1), atol=1e-3)


@pytest.mark.parametrize(
    ("drop", "pattern"),
    [("state_dict", "has no 'state_dict' state dict"),
     ("backbone_state_dict", "has no 'backbone_state_dict' state dict")],
)  # fmt: skip
def test_grain_spec_names_what_a_wrong_file_lacks(tmp_path, drop, pattern):
    path = tmp_path / "ck.pth.tar"
    _released_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    del ck[drop]
    torch.save(ck, path)
    with pytest.raises(ValueError, match=pattern):
        load_method_spec(f"grain:{path}")
    ck = {
        "state_dict": {"proj.weight": torch.zeros(2, 2)},
        "backbone_state_dict": {"x": torch.zeros(1)},
    }
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"not a GRAIN .*visual.cls_token.*query_embed.weight"):
        load_method_spec(f"grain:{path}")

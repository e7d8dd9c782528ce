"""DetailCLIP against its released code (issue 29): the recipe's towers compute the released
towers' functions (timm ViT, QuickGELU CLIP text), timm's init, the released checkpoint loads
(``detailclip:`` spec, ``image.pretrained=`` for backbone files) with equal outputs, and the
linear probe reads the backbone's tokens."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.encoders.timm_keys import timm_vit_to_native
from finegrain.interop import load_method_spec
from finegrain.interop.detailclip import text_keys
from finegrain.methods.detailclip import DetailCLIP
from finegrain.recipes.base import get_recipe

from helpers.released import ReleasedCLIPText, eot_ids, timm_vit

timm = pytest.importorskip("timm")
TINY = dict(image_size=32, patch_size=8, width=32, depth=2, heads=2)


def _recipe_image(**over):
    """detailclip_vitb16's image tower config at a tiny size (its layout fields unchanged)."""
    return dataclasses.replace(get_recipe("detailclip_vitb16").method.image, **{**TINY, **over})


def test_recipe_image_tower_is_the_released_timm_vit():
    torch.manual_seed(0)
    ref = timm_vit(32, 8, 32, 2, 2).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want = ref.forward_features(x)  # (B, 1 + N, D) after the final norm
    for cfg, ok in ((_recipe_image(), True), (_recipe_image(ln_pre=True, patch_bias=False), False),
                    (_recipe_image(norm_eps=1e-5), False)):  # fmt: skip
        tower = build_image_tower(cfg).double().eval()
        res = tower.load_state_dict(timm_vit_to_native(ref.state_dict()), strict=False)
        out = tower(x)
        got = torch.cat([out.pooled[:, None], out.tokens], 1)
        same = not res.missing_keys and not res.unexpected_keys and torch.allclose(got, want,
                                                                                   atol=1e-10)  # fmt: skip
        assert same == ok, cfg  # CLIP's layout (or eps 1e-5) is a different function


def test_recipe_text_tower_is_the_released_quick_gelu_transformer():
    torch.manual_seed(0)
    text = dataclasses.replace(get_recipe("detailclip_vitb16").method.text, width=32, depth=2,
                               heads=2, context_length=12)  # fmt: skip
    ref = ReleasedCLIPText(49408, 12, 32, 2, 2, 8).double()
    ids = eot_ids(3, 12, 49408)
    want = ref.pooled(ids)  # (B, W) before the projection
    mapped = {k[len("text.") :]: v for k, v in text_keys(ref.state_dict(), "transformer.").items()}
    for cfg, ok in ((text, True), (dataclasses.replace(text, activation="gelu"), False)):
        tower = build_text_tower(cfg).double().eval()
        tower.load_state_dict(mapped)
        got = tower(ids).pooled
        assert torch.allclose(got, want, atol=1e-8) == ok, cfg.activation


def test_timm_init_of_the_recipe_tower():
    torch.manual_seed(0)
    wide = dict(width=256, heads=4)
    timm_t = build_image_tower(_recipe_image(**wide))
    clip_t = build_image_tower(_recipe_image(**wide, init="clip"))
    for t, std in ((timm_t, 0.02), (clip_t, 256**-0.5)):
        w = t.transformer.blocks[0].attn.qkv.weight
        assert abs(w.std().item() - std) < 0.1 * std
        assert abs(t.positional_embedding.std().item() - (0.02 if t is timm_t else std)) < 0.2 * std
    assert timm_t.transformer.blocks[0].attn.qkv.weight.abs().max() < 0.02 * 6


def _released_checkpoint(path, teacher_shift=0.0):
    """A tiny checkpoint in the released DetailCLIP layout: ``{"state_dict": {"module.*"},
    "args": Namespace, ...}`` with student, EMA and training-only heads."""
    torch.manual_seed(1)
    # widths 128: the loader infers heads as the released configs (width / 64 off ViT-S/B/L)
    vis, ema = timm_vit(32, 8, 128, 2, 2), timm_vit(32, 8, 128, 2, 2)
    text, text_e = (
        ReleasedCLIPText(49408, 12, 128, 1, 2, 16),
        ReleasedCLIPText(49408, 12, 128, 1, 2, 16),
    )
    sd = {f"visual.{k}": v for k, v in vis.state_dict().items()}
    sd.update({f"visual_ema.{k}": v for k, v in ema.state_dict().items()})
    for k, v in text.state_dict().items():
        sd[k] = v
    for k, v in text_e.transformer.state_dict().items():
        sd[f"transformer_e.{k}"] = v
    sd["image_projection"] = 128**-0.5 * torch.randn(128, 16)
    sd["image_projection_e"] = 128**-0.5 * torch.randn(128, 16)
    sd["text_projection_e"] = text_e.text_projection.detach().clone()
    sd["logit_scale"] = torch.tensor(2.7)
    extra = {"decoder_embed.weight": (32, 32), "mask_token": (1, 1, 32), "decoder_pos_embed": (1, 17, 32),
             "decoder_blocks.0.norm1.weight": (32,), "decoder_norm.weight": (32,),
             "reconstruction_pred.weight": (192, 32), "ibot_head.mlp.0.weight": (64, 32),
             "ibot_head_e.last_layer.weight_g": (128, 1)}  # fmt: skip
    sd.update({k: torch.randn(s) for k, s in extra.items()})
    ck = {"epoch": 25, "state_dict": {f"module.{k}": v for k, v in sd.items()},
          "best_acc": 43.9, "args": argparse.Namespace(model="DetailCLIP_VITB16", mask_ratio=0.5)}  # fmt: skip
    torch.save(ck, path)
    return vis, ema, text, text_e, sd


def test_released_checkpoint_loads_with_equal_outputs(tmp_path):
    vis, ema, text, text_e, sd = _released_checkpoint(tmp_path / "checkpoint_best.pt")
    x = torch.randn(2, 3, 32, 32)
    ids = eot_ids(3, 12, 49408, seed=2)
    for which, v, e in (("", vis, ""), ("teacher=", ema, "_e")):
        m, cfg = load_method_spec(f"detailclip:{which}{tmp_path / 'checkpoint_best.pt'}")
        want_img = v.forward_features(x)[:, 0] @ sd["image_projection" + e]
        # the teacher text: EMA blocks + the shared embeddings / ln_final / projection_e
        ref = text
        if e:
            ref = ReleasedCLIPText(49408, 12, 128, 1, 2, 16)
            ref.load_state_dict({**text.state_dict(), **{f"transformer.{k}": t for k, t in
                                 text_e.transformer.state_dict().items()},
                                 "text_projection": sd["text_projection_e"]})  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(m.encode_image(x, normalize=False), want_img,
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
            torch.testing.assert_close(m.encode_text(ids, normalize=False), ref.encode_text(ids),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
        assert cfg.data.mean == (0.485, 0.456, 0.406) and cfg.method.image.image_size == 32
        assert m.logit_scale.item() == pytest.approx(2.7)
    # a broken variant: the teacher's image tower is not the student's
    m_s, _ = load_method_spec(f"detailclip:{tmp_path / 'checkpoint_best.pt'}")
    m_t, _ = load_method_spec(f"detailclip:teacher={tmp_path / 'checkpoint_best.pt'}")
    assert not torch.allclose(m_s.encode_image(x), m_t.encode_image(x))


def test_backbone_files_load_as_image_pretrained(tmp_path):
    vis, _, _, _, _ = _released_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({k: v for k, v in vis.state_dict().items()}, tmp_path / "backbone.pth")
    x = torch.randn(2, 3, 32, 32)
    want = vis.forward_features(x)
    # extract_backbone_weights.py's output (bare timm keys) and the training checkpoint itself
    for f in ("backbone.pth", "checkpoint.pt"):
        tower = build_image_tower(_recipe_image(width=128, pretrained=str(tmp_path / f))).eval()
        out = tower(x)
        got = torch.cat([out.pooled[:, None], out.tokens], 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit VisionTransformer"):  # CLIP layout: no fit
        build_image_tower(_recipe_image(pretrained=str(tmp_path / "backbone.pth"), ln_pre=True,
                                        patch_bias=False))  # fmt: skip


def test_linear_probe_reads_backbone_tokens_by_default():
    cfg = dataclasses.replace(get_recipe("detailclip_smoke").method, embed_dim=32)
    torch.manual_seed(0)
    m = DetailCLIP(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = m.image(x).tokens  # (B, N, D)
    feats = m.probe_features(x)
    assert feats.shape == (2, m.image.width, 8, 8)
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), tokens)
    proj = DetailCLIP(dataclasses.replace(cfg, probe_features="projected")).eval()
    proj.load_state_dict(m.state_dict())
    torch.testing.assert_close(proj.probe_features(x), m.dense_features(x))
    assert m.dense_features(x).shape[1] == cfg.embed_dim != m.image.width


def test_bad_detailclip_spec_is_one_line(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a DetailCLIP checkpoint"):
        load_method_spec(f"detailclip:{tmp_path / 'x.pt'}")
    with pytest.raises(ValueError, match="valid forms are FILE, student=FILE, teacher=FILE"):
        load_method_spec(f"detailclip:ema={tmp_path / 'x.pt'}")


def released_att_mask(attention: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """``get_att_mask`` of the released ``models.py`` in our words: (B, 196) teacher CLS
    attention -> (B, 196) bool, True = removed. 14 x 14 -> 7 x 7 by bilinear resizing, the
    ``int(49 * ratio) + 1`` highest blocks kept, each block's 2 x 2 patches share its flag."""
    b = attention.shape[0]
    small = F.interpolate(attention.reshape(b, 1, 14, 14), (7, 7), mode="bilinear").reshape(b, 49)
    n = int(49 * ratio)
    kept = torch.argsort(small, dim=1, descending=True)[:, : n + 1]
    block = torch.ones(b, 49, dtype=torch.bool).scatter_(1, kept, False).reshape(b, 7, 7)
    full = torch.zeros(b, 14, 14, dtype=torch.bool)
    for dr in (0, 1):
        for dc in (0, 1):
            full[:, dr::2, dc::2] = block
    return full.reshape(b, 196)


def test_attention_keep_equals_released_get_att_mask():
    from finegrain.heads.token_removal import attention_keep

    torch.manual_seed(0)
    attn = torch.rand(5, 196).double()
    removed = released_att_mask(attn)
    keep = attention_keep(attn, (14, 14), 0.5)  # (B, M) kept patch indices
    for i in range(5):
        assert keep[i].tolist() == (~removed[i]).nonzero().flatten().tolist()
    # broken variant: the floor count keeps one block fewer than the released code
    assert attention_keep(attn, (14, 14), 0.5, "floor").shape[1] == keep.shape[1] - 4


def test_linear_probe_task_reads_probe_features(monkeypatch):
    from finegrain.eval import run_tasks
    from finegrain.eval.config import LinearProbeTaskConfig

    cfg = dataclasses.replace(get_recipe("detailclip_smoke").method, embed_dim=32)
    m = DetailCLIP(cfg).eval()
    widths = []
    original = DetailCLIP.probe_features

    def spy(self, images):
        out = original(self, images)
        widths.append(out.shape[1])
        return out

    monkeypatch.setattr(DetailCLIP, "probe_features", spy)
    task = LinearProbeTaskConfig(num_train=4, num_samples=4, epochs=1, batch_size=4)
    run_tasks(m, [task], progress=False)
    assert widths and set(widths) == {m.image.width}  # 64-d backbone tokens, not the 32-d E

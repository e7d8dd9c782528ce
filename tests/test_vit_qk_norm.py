"""Native ViT layout options (issue 15): per-head q/k LayerNorm, LayerNorm eps, no ``ln_pre``,
patch-embedding bias and QuickGELU, checked against a naive float64 loop and against timm's
``VisionTransformer(qk_norm=True)`` (GRAIN's released backbone) with copied weights."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from finegrain.config import ConfigError
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig, build_text_tower
from finegrain.encoders.export import image_backbone_to_timm
from finegrain.encoders.vit import Block, VisionTransformer

GRAIN_LAYOUT = dict(qk_norm=True, norm_eps=1e-6, ln_pre=False, patch_bias=True)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial norm weights and biases (they start at 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _naive_block(blk: Block, x: torch.Tensor, eps: float, quick: bool = False) -> torch.Tensor:
    """One pre-norm block, head by head and token by token where it matters."""
    b, n, d = x.shape
    h = blk.attn.heads
    dh = d // h
    y = _layer_norm(x, blk.ln_1.weight, blk.ln_1.bias, eps)
    qkv = y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (B, N, 3D)
    q, k, v = qkv[..., :d], qkv[..., d : 2 * d], qkv[..., 2 * d :]
    heads = []
    for j in range(h):
        sl = slice(j * dh, (j + 1) * dh)
        qj = _layer_norm(q[..., sl], blk.attn.q_norm.weight, blk.attn.q_norm.bias, eps)
        kj = _layer_norm(k[..., sl], blk.attn.k_norm.weight, blk.attn.k_norm.bias, eps)
        logits = qj @ kj.transpose(1, 2) / math.sqrt(dh)  # (B, N, N)
        w = torch.exp(logits - logits.max(-1, keepdim=True).values)
        heads.append((w / w.sum(-1, keepdim=True)) @ v[..., sl])  # (B, N, Dh)
    x = x + torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
    y = _layer_norm(x, blk.ln_2.weight, blk.ln_2.bias, eps)
    u = y @ blk.mlp[0].weight.T + blk.mlp[0].bias
    act = u * torch.sigmoid(1.702 * u) if quick else 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
    return x + act @ blk.mlp[2].weight.T + blk.mlp[2].bias


@pytest.mark.parametrize("quick", [False, True])
def test_qk_norm_block_matches_naive_float64(quick: bool) -> None:
    torch.manual_seed(0)
    act = "quick_gelu" if quick else "gelu"
    blk = Block(24, 3, 2.0, qk_norm=True, eps=1e-6, activation=act).double()
    _perturb(blk)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(blk(x), _naive_block(blk, x, 1e-6, quick), rtol=1e-10, atol=1e-10)
    # q/k norms: one LayerNorm of the head dimension shared over heads, eps as configured
    assert blk.attn.q_norm.normalized_shape == (8,) and blk.attn.k_norm.eps == 1e-6


def test_default_layout_keeps_state_dict_keys() -> None:
    keys = set(VisionTransformer(ImageTowerConfig(width=16, heads=2, depth=1)).state_dict())
    assert "ln_pre.weight" in keys and "conv1.bias" not in keys
    assert not any("q_norm" in k or "k_norm" in k for k in keys)
    grain = VisionTransformer(ImageTowerConfig(width=16, heads=2, depth=1, **GRAIN_LAYOUT))
    keys = set(grain.state_dict())
    assert "ln_pre.weight" not in keys and "conv1.bias" in keys
    assert "transformer.blocks.0.attn.q_norm.weight" in keys and grain.ln_post.eps == 1e-6


def test_grain_layout_equals_timm_qk_norm_vit() -> None:
    timm = pytest.importorskip("timm")
    cfg = ImageTowerConfig(image_size=32, patch_size=8, width=32, depth=2, heads=4, **GRAIN_LAYOUT)
    tower = VisionTransformer(cfg).double().eval()
    _perturb(tower, seed=1)
    sd, kwargs = image_backbone_to_timm(tower)
    assert kwargs["qk_norm"] is True and kwargs["pre_norm"] is False
    vit = timm.models.vision_transformer.VisionTransformer(
        **kwargs, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)
    ).double()  # float64 before loading: a float32 model would round the weights
    vit.load_state_dict(sd, strict=True)
    vit.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = tower(x, return_attention=1), vit.forward_features(x)  # (B, 1 + N, D)
    torch.testing.assert_close(ours.pooled, theirs[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours.tokens, theirs[:, 1:], rtol=1e-9, atol=1e-9)
    # CLS attention of the last block with its q/k norms: the naive row of that block
    blk = tower.transformer.blocks[-1]
    with torch.no_grad():
        h = tower.transformer.blocks[0](tower.embed(x))  # input of the last block (no ln_pre)
        y = blk.ln_1(h)
        q, k, _ = blk.attn.qkv(y).view(2, -1, 3, 4, 8).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        s = blk.attn.q_norm(q[:, :, :1]) @ blk.attn.k_norm(k).transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(ours.attention[:, 0], s.squeeze(2).softmax(-1)[..., 1:])


def test_timm_tower_qk_norm_and_bad_layouts() -> None:
    pytest.importorskip("timm")
    from finegrain.encoders.timm_tower import TimmTower

    cfg = ImageTowerConfig(name="timm", model="vit_tiny_patch16_224", image_size=32, qk_norm=True)
    attn = TimmTower(cfg).model.blocks[0].attn
    assert isinstance(attn.q_norm, torch.nn.LayerNorm) and attn.q_norm.eps == 1e-6
    with pytest.raises(ValueError, match="resnet18.*qk_norm"):
        TimmTower(ImageTowerConfig(name="timm", model="resnet18", qk_norm=True))
    with pytest.raises(ValueError, match="norm_eps"):
        VisionTransformer(ImageTowerConfig(width=16, heads=2, norm_eps=0.0))
    with pytest.raises(ConfigError, match="activation"):
        ImageTowerConfig(activation="relu")
    clip_like = VisionTransformer(ImageTowerConfig(width=16, heads=2, depth=1, patch_bias=True))
    with pytest.raises(ValueError, match="no timm"):
        image_backbone_to_timm(clip_like)


def test_quick_gelu_text_tower() -> None:
    cfg = TextTowerConfig(width=16, depth=1, heads=2, context_length=8, activation="quick_gelu")
    tower = build_text_tower(cfg)
    act = tower.transformer.blocks[0].mlp[1]
    x = torch.linspace(-3, 3, 11)
    torch.testing.assert_close(act(x), x * torch.sigmoid(1.702 * x))

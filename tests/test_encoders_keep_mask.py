"""Image towers' keep sets, mask token and CLS attention (issue 11), for the native ViT, a timm
VisionTransformer and an open_clip ViT, each checked in float64 against references written
here from the libraries' own modules (per-sample gathering, naive full attention)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from finegrain.encoders import ImageTowerConfig, build_image_tower
from finegrain.encoders import timm_tower as timm_tower_module
from finegrain.encoders.base import random_keep

TOWERS = ("vit", "timm", "open_clip")
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_tiny(tmp_path_factory) -> str:
    """Registers a tiny open_clip architecture (2 blocks, width 32) through its config API."""
    open_clip = pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("oc") / "fg-tiny-vit.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(path)
    yield "fg-tiny-vit"
    open_clip.factory._MODEL_CONFIGS.pop("fg-tiny-vit", None)


def tiny_timm(**kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    args.update(dynamic_img_size=True, reg_tokens=2, qk_norm=True, no_embed_class=True)
    return VisionTransformer(**{**args, **kw})


def make_tower(kind: str, monkeypatch, open_clip_name: str = "", **cfg) -> nn.Module:
    """A tiny float64 tower in eval mode with all parameters perturbed (non-trivial attention)."""
    if kind == "vit":
        base = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2, heads=2)
    elif kind == "timm":
        timm_kw = cfg.pop("timm_kw", {})
        monkeypatch.setattr(
            timm_tower_module, "_create", lambda name, size, *_: tiny_timm(**timm_kw)
        )
        base = ImageTowerConfig(name="timm", model="vit_tiny_patch16_224", image_size=32)
    else:
        base = ImageTowerConfig(name="open_clip", model=open_clip_name, image_size=32)
    tower = build_image_tower(replace(base, **cfg)).double().eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return tower


def prefix(tower: nn.Module) -> int:
    return getattr(tower, "num_prefix_tokens", 1)


def reference_embed(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, P + N, D) tokens entering the blocks, through each library's own embedding code."""
    if hasattr(tower, "model"):  # timm
        m = tower.model
        return m.norm_pre(m._pos_embed(m.patch_embed(x)))
    if hasattr(tower, "visual"):  # open_clip's own _embeds (ln_pre is per token)
        return tower.visual._embeds(x)
    t = tower.conv1(x).flatten(2).transpose(1, 2)  # native, written out
    t = torch.cat([tower.class_embedding.expand(x.shape[0], 1, -1), t], 1)
    return tower.ln_pre(t + tower.positional_embedding)


def reference_blocks(tower: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """(1, T, D) -> (1, T, D) through the library's own blocks and final norm."""
    if hasattr(tower, "model"):
        return tower.model.norm(tower.model.blocks(seq))
    if hasattr(tower, "visual"):
        return tower.visual.ln_post(tower.visual.transformer(seq))
    for blk in tower.transformer.blocks:
        seq = blk(seq)
    return tower.ln_post(seq)


def blocks_of(tower: nn.Module) -> list[nn.Module]:
    if hasattr(tower, "model"):
        return list(tower.model.blocks)
    if hasattr(tower, "visual"):
        return list(tower.visual.transformer.resblocks)
    return list(tower.transformer.blocks)


def naive_cls_attention(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, H, T) row 0 of the full softmax(q k^T / sqrt(Dh)) of a block on its input x."""
    if hasattr(blk, "norm1"):  # timm Block
        a, y = blk.attn, blk.norm1(x)
        w, b, heads, qn, kn = a.qkv.weight, a.qkv.bias, a.num_heads, a.q_norm, a.k_norm
    elif hasattr(blk.attn, "in_proj_weight"):  # open_clip ResidualAttentionBlock
        a, y = blk.attn, blk.ln_1(x)
        w, b, heads, qn, kn = a.in_proj_weight, a.in_proj_bias, a.num_heads, None, None
    else:  # native Block
        a, y = blk.attn, blk.ln_1(x)
        w, b, heads, qn, kn = a.qkv.weight, a.qkv.bias, a.heads, None, None
    bsz, t, _ = y.shape
    qkv = (y @ w.t() + b).view(bsz, t, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
    q, k = qkv[0], qkv[1]
    q, k = (q, k) if qn is None else (qn(q), kn(k))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    return scores.softmax(-1)[:, :, 0]


def block_inputs(tower: nn.Module, run) -> list[torch.Tensor]:
    """The input of every block during ``run()``."""
    seen, hooks = [], []
    for blk in blocks_of(tower):
        hooks.append(blk.register_forward_pre_hook(lambda m, args: seen.append(args[0])))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def image_for(kind: str, b: int = 2) -> torch.Tensor:
    hw = (48, 32) if kind == "timm" else (32, 32)  # timm: dynamic image size, 6x4 grid
    return torch.randn(b, 3, *hw, dtype=torch.float64)


@pytest.fixture
def tower_factory(monkeypatch, request):
    def make(kind: str, **cfg) -> nn.Module:
        name = request.getfixturevalue("open_clip_tiny") if kind == "open_clip" else ""
        return make_tower(kind, monkeypatch, name, **cfg)

    return make


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", TOWERS)
def test_keep_all_in_order_equals_no_keep(kind, tower_factory) -> None:
    tower, x = tower_factory(kind), image_for(kind)
    out = tower(x)
    n = out.tokens.shape[1]
    assert out.keep is None and out.attention is None and n == out.grid_hw[0] * out.grid_hw[1]
    everything = torch.arange(n).expand(2, n)
    kept = tower(x, keep=everything)
    close(kept.tokens, out.tokens)
    close(kept.pooled, out.pooled)
    assert kept.grid_hw == out.grid_hw and torch.equal(kept.keep, everything)
    with pytest.raises(ValueError, match="subset .*keep"):
        kept.token_map()


@pytest.mark.parametrize("kind", TOWERS)
def test_keep_subset_equals_manually_gathered_sequence(kind, tower_factory) -> None:
    tower, x = tower_factory(kind), image_for(kind)
    n = tower(x).tokens.shape[1]
    keep = torch.stack([torch.randperm(n)[:5], torch.randperm(n)[:5]])  # any order, per sample
    out = tower(x, keep=keep)
    assert out.tokens.shape == (2, 5, tower.width) and torch.equal(out.keep, keep)
    full, p = reference_embed(tower, x), prefix(tower)
    for i in range(2):
        seq = torch.cat([full[i, :p], full[i, p + keep[i]]])[None]  # prefix + kept patches
        ref = reference_blocks(tower, seq)[0]
        close(out.tokens[i], ref[p:])
        close(out.pooled[i], ref[0])


@pytest.mark.parametrize("kind", TOWERS)
def test_mask_token_replaces_patches_before_position_embedding(kind, tower_factory) -> None:
    tower, x = tower_factory(kind, mask_token=True), image_for(kind)
    n = tower(x).tokens.shape[1]
    none = torch.zeros(2, n, dtype=torch.bool)
    assert torch.equal(tower(x, mask=none).tokens, tower(x).tokens)
    mask = torch.rand(2, n) < 0.5
    mask[0, 0], mask[1, 0] = True, False
    p = prefix(tower)
    plain = block_inputs(tower, lambda: tower(x))[0]
    masked = block_inputs(tower, lambda: tower(x, mask=mask))[0]
    pre_norm = {"vit": "ln_pre", "open_clip": "ln_pre"}  # the token embedding before it
    if kind == "timm":
        m = tower.model
        pos = m._pos_embed(torch.zeros(1, *tower.num_patches(x.shape[-2:]), 32).double())[0, p:]
        expected = tower.mask_token + pos  # (N, D): mask token + position embedding
        expected = m.norm_pre(expected)
    else:
        owner = tower if kind == "vit" else tower.visual
        pos = owner.positional_embedding.reshape(-1, tower.width)[1:]
        expected = getattr(owner, pre_norm[kind])(tower.mask_token + pos)
    close(masked[:, p:][mask], expected.expand(2, -1, -1)[mask])
    close(masked[:, p:][~mask], plain[:, p:][~mask])
    close(masked[:, :p], plain[:, :p])
    both = tower(x, mask=mask, keep=torch.tensor([[0, 2], [0, 1]]))  # mask, then keep
    assert both.tokens.shape[1] == 2


@pytest.mark.parametrize("kind", TOWERS)
def test_attention_is_the_cls_softmax_row(kind, tower_factory) -> None:
    tower, x = tower_factory(kind), image_for(kind)
    p, blocks = prefix(tower), blocks_of(tower)
    for keep in (None, torch.tensor([[3, 0, 5], [1, 2, 4]])):
        plain = tower(x, keep=keep)
        inputs = block_inputs(tower, lambda keep=keep: tower(x, keep=keep))
        out = tower(x, keep=keep, return_attention=True)
        assert torch.equal(out.tokens, plain.tokens) and torch.equal(out.pooled, plain.pooled)
        n_out = out.tokens.shape[1]
        heads = out.attention.shape[2]
        assert out.attention.shape == (2, len(blocks), heads, n_out) and heads == 2
        naive = torch.stack([naive_cls_attention(b, h) for b, h in zip(blocks, inputs)], 1)
        close(out.attention, naive[..., p:])  # raw softmax row, patch columns, not renormalised
        close(
            out.attention.sum(-1) + naive[..., :p].sum(-1),
            torch.ones(2, len(blocks), heads).double(),
        )
        last = tower(x, keep=keep, return_attention=1).attention
        assert last.shape == (2, 1, heads, n_out)
        close(last, out.attention[:, -1:])


@pytest.mark.parametrize("kind", TOWERS)
def test_patch_dropout_is_a_seeded_keep_set(kind, tower_factory) -> None:
    tower, x = tower_factory(kind, patch_dropout=0.5), image_for(kind)
    n = tower(x).tokens.shape[1]
    assert tower(x).keep is None  # eval: inactive
    torch.manual_seed(3)
    out = tower.train()(x)
    expected = random_keep(2, n, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.keep, expected) and out.tokens.shape[1] == n // 2
    assert out.grid_hw == tower.num_patches(x.shape[-2:])
    ref = tower.eval()(x, keep=out.keep)
    close(out.tokens, ref.tokens)
    close(out.pooled, ref.pooled)
    explicit = torch.tensor([[0, 1, 2], [3, 4, 5]])  # an explicit keep set wins in training
    assert torch.equal(tower.train()(x, keep=explicit).keep, explicit)


def test_random_keep() -> None:
    keep = random_keep(4, 10, 0.3, generator=torch.Generator().manual_seed(0))
    assert keep.shape == (4, 3) and keep.dtype == torch.long
    assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < 10
    again = random_keep(4, 10, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert random_keep(1, 10, 1.0).tolist() == [list(range(10))]
    assert random_keep(2, 10, 0.01).shape == (2, 1)  # at least one patch
    assert random_keep(1, 10, 1 - 0.3).shape == (1, 7)  # no float floor surprise
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"keep fraction must be in \(0, 1\]"):
            random_keep(1, 10, bad)


def test_native_checkpointing_with_keep_and_attention(tower_factory) -> None:
    keep = torch.tensor([[0, 5, 9], [15, 1, 2]])
    x = image_for("vit")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        tower = make_tower("vit", None, grad_checkpointing=ckpt).train()
        out = tower(x, keep=keep, return_attention=True)
        (out.tokens.square().sum() + out.attention.log().sum()).backward()
        grads.append(tower.conv1.weight.grad)
    close(grads[1], grads[0])


def test_option_errors(tower_factory, monkeypatch) -> None:
    vit = tower_factory("vit")
    x = image_for("vit")
    with pytest.raises(ValueError, match="'vit' has no mask token.*mask_token=True"):
        vit(x, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"keep indices must be in \[0, 16\)"):
        vit(x, keep=torch.tensor([[0, 16], [1, 2]]))
    with pytest.raises(ValueError, match="keep must be a LongTensor"):
        vit(x, keep=torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    for bad in (0, 3, "last"):
        with pytest.raises(ValueError, match=r"return_attention must be .*\[1, 2\]"):
            vit(x, return_attention=bad)
    masked = tower_factory("vit", mask_token=True)
    with pytest.raises(ValueError, match=r"mask must be a BoolTensor \(B, h\*w\)"):
        masked(x, mask=torch.zeros(2, 15, dtype=torch.bool))
    no_cls = tower_factory("timm", timm_kw={"class_token": False, "global_pool": "avg"})
    with pytest.raises(ValueError, match="'timm/vit_tiny_patch16_224' does not support "):
        no_cls(x, return_attention=True)
    assert no_cls(x, keep=torch.tensor([[0], [1]])).tokens.shape == (2, 1, 32)


def test_convnets_reject_token_options(monkeypatch) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    tower = build_image_tower(ImageTowerConfig(name="efficientnet_lite0", image_size=32)).eval()
    x = torch.randn(1, 3, 32, 32)
    for kwargs, msg in (
        ({"keep": torch.zeros(1, 1, dtype=torch.long)}, r"keep= \(token subsets\)"),
        ({"mask": torch.zeros(1, 1, dtype=torch.bool)}, "mask="),
        ({"return_attention": True}, "return_attention="),
    ):
        with pytest.raises(
            ValueError, match=f"^image tower 'efficientnet_lite0' does not support {msg}"
        ):
            tower(x, **kwargs)
    with pytest.raises(ValueError, match="'efficientnet_lite0' does not support mask_token"):
        build_image_tower(ImageTowerConfig(name="efficientnet_lite0", mask_token=True))
    import timm

    monkeypatch.setattr(
        timm_tower_module, "_create", lambda n, s, *_: timm.create_model("resnet10t", num_classes=0)
    )
    convnet = build_image_tower(ImageTowerConfig(name="timm", model="resnet10t")).eval()
    with pytest.raises(ValueError, match="'timm/resnet10t' does not support keep="):
        convnet(x, keep=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="'timm/resnet10t' does not support patch_dropout"):
        build_image_tower(ImageTowerConfig(name="timm", model="resnet10t", patch_dropout=0.5))


def test_native_pretrained_without_mask_token(tmp_path) -> None:
    cfg = ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=2, heads=2)
    a = build_image_tower(cfg)
    assert "mask_token" not in a.state_dict()  # existing state dicts keep their keys
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = build_image_tower(replace(cfg, mask_token=True, pretrained=str(tmp_path / "w.pt")))
    assert b.mask_token.abs().sum() == 0 and b.mask_token.requires_grad
    frozen = build_image_tower(replace(cfg, mask_token=True, trainable_blocks=1))
    assert frozen.mask_token.requires_grad and not frozen.conv1.weight.requires_grad

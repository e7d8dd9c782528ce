"""``grain_vitb16`` is the released ``CLIP_VITB16`` setup (issue 15): timm-layout ViT-B/16 with
q/k norm, QuickGELU text tower, 2 x 8 GPUs x 128 per step, steps and warm-up for that batch."""

from __future__ import annotations

import torch

from finegrain.encoders.base import build_image_tower, build_text_tower
from finegrain.methods.grain import GRAINConfig
from finegrain.recipes.base import CC3M_RECAP_SAMPLES, get_recipe


def test_grain_vitb16_matches_released_setup() -> None:
    cfg = get_recipe("grain_vitb16")
    im, tx, tr = cfg.method.image, cfg.method.text, cfg.train
    assert (im.name, im.image_size, im.patch_size, im.width, im.depth, im.heads) == (
        "vit", 224, 16, 768, 12, 12,
    )  # fmt: skip
    assert (im.qk_norm, im.norm_eps, im.ln_pre, im.patch_bias, im.activation) == (
        True, 1e-6, False, True, "gelu",
    )  # fmt: skip
    assert (tx.width, tx.depth, tx.heads, tx.context_length, tx.activation) == (
        512, 12, 8, 77, "quick_gelu",
    )  # fmt: skip
    # 2 nodes x 8 GPUs x 128: DistributedSampler pads to ceil(N / 16) per rank, drop_last
    ranks, per_gpu = 16, 128
    per_epoch = -(-CC3M_RECAP_SAMPLES // ranks) // per_gpu
    assert cfg.data.batch_size == per_gpu and per_epoch == 1378
    assert (tr.steps, tr.warmup_steps) == (35 * per_epoch, per_epoch)
    assert (tr.lr, tr.min_lr, tr.weight_decay, tr.betas, tr.eps) == (
        1e-3, 1e-5, 0.1, (0.9, 0.98), 1e-8,
    )  # fmt: skip
    m = cfg.method
    assert (m.num_boxes_over_ranks, m.region_dedup, m.weighting, m.aux_loss) == (
        False, False, "released", False,
    )  # fmt: skip


def test_grain_defaults_follow_released_code() -> None:
    c = GRAINConfig()
    assert not c.num_boxes_over_ranks and not c.region_dedup
    assert not c.region_symmetric and not c.region_gather and c.weighting == "released"


def test_grain_vitb16_towers_build_at_small_size() -> None:
    """The recipe's tower layouts build (depth/width shrunk so the test stays fast)."""
    cfg = get_recipe("grain_vitb16").method
    im, tx = cfg.image, cfg.text
    im.width, im.depth, im.heads, im.image_size = 32, 1, 2, 32
    tx.width, tx.depth, tx.heads = 32, 1, 2
    vit, text = build_image_tower(im), build_text_tower(tx)
    blk = vit.transformer.blocks[0]
    assert isinstance(blk.attn.q_norm, torch.nn.LayerNorm) and blk.ln_1.eps == 1e-6
    assert isinstance(vit.ln_pre, torch.nn.Identity) and vit.conv1.bias is not None
    assert type(text.transformer.blocks[0].mlp[1]).__name__ == "QuickGELU"
    out = vit(torch.randn(1, 3, 32, 32))
    assert out.tokens.shape == (1, 4, 32)

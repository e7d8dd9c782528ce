import math

import pytest
import torch

from finegrain.run_config import TrainConfig
from finegrain.train.optim import build_optimizer, cosine_lr, lr_at, set_lr

from helpers.toy_method import ToyCLIP, ToyConfig


def naive_schedule(step, base, warmup, total, floor):
    """Warmup: linear ramp to base over `warmup` steps; then SGDR eq. 5 (no restarts)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t_cur, t_max = step - warmup, total - warmup
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t_cur / t_max))


@pytest.mark.parametrize("warmup,total,floor", [(0, 10, 0.0), (3, 20, 1e-5), (10, 11, 0.0)])
def test_cosine_matches_naive_formula(warmup, total, floor):
    for s in range(total):
        got = cosine_lr(s, base_lr=1e-3, warmup=warmup, total=total, min_lr=floor)
        assert got == pytest.approx(naive_schedule(s, 1e-3, warmup, total, floor), rel=1e-12)


def test_schedule_shape():
    lrs = [cosine_lr(s, base_lr=1.0, warmup=5, total=50) for s in range(60)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])), "cosine part must not increase"
    assert lrs[-1] == 0.0, "past the end the schedule stays at the floor"
    cfg = TrainConfig(steps=50, warmup_steps=5, lr=1.0)
    assert lr_at(7, cfg) == lrs[7]


def test_schedule_bad_input():
    with pytest.raises(ValueError, match="train.steps"):
        cosine_lr(0, base_lr=1.0, warmup=0, total=0)
    with pytest.raises(ValueError, match="warmup"):
        cosine_lr(0, base_lr=1.0, warmup=-1, total=5)


def test_param_groups_no_decay_on_scale_norm_bias():
    method = ToyCLIP(ToyConfig())
    opt = build_optimizer(method, TrainConfig(weight_decay=0.2, lr=1e-3))
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in method.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert "logit_scale" in by_wd[0.0] and "image_proj.0.bias" in by_wd[0.0]
    assert by_wd[0.2] == {
        "image_proj.0.weight",
        "image_proj.3.weight",
        "text_proj.0.weight",
        "text_proj.2.weight",
    }
    set_lr(opt, 0.5)
    assert all(g["lr"] == 0.5 for g in opt.param_groups)


def test_adamw_step_matches_reference_update():
    """One AdamW step (Loshchilov & Hutter 2019, Alg. 2) on a decayed weight."""
    method = ToyCLIP(ToyConfig())
    cfg = TrainConfig(weight_decay=0.1, lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    opt = build_optimizer(method, cfg)
    w = method.image_proj[0].weight
    g = torch.randn_like(w)
    w0 = w.detach().clone()
    for p in method.parameters():
        p.grad = torch.zeros_like(p)
    w.grad = g.clone()
    opt.step()
    m, v = (1 - 0.9) * g, (1 - 0.98) * g * g
    m_hat, v_hat = m / (1 - 0.9), v / (1 - 0.98)
    ref = w0 * (1 - 1e-2 * 0.1) - 1e-2 * m_hat / (v_hat.sqrt() + 1e-6)
    torch.testing.assert_close(w.detach(), ref, rtol=1e-5, atol=1e-6)


def test_no_trainable_params_is_clear():
    method = ToyCLIP(ToyConfig())
    for p in method.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(method, TrainConfig())


def _torch_has_fused_cpu_adamw() -> bool:
    """torch >= 2.4 has a fused CPU AdamW; on older torch (our floor is 2.3) the default runs."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def test_cpu_adamw_is_fused_and_matches_reference_over_steps():
    """On CPU the fused kernel is used where torch has one (the for-loop default made the
    49,408-row token embedding most of a small model's step); either way the update follows
    Alg. 2 exactly, in float64, over several steps with bias correction."""
    method = ToyCLIP(ToyConfig()).double()
    lr, wd, (b1, b2), eps = 1e-2, 0.1, (0.9, 0.98), 1e-6
    opt = build_optimizer(method, TrainConfig(weight_decay=wd, lr=lr, betas=(b1, b2), eps=eps))
    assert all(bool(g["fused"]) == _torch_has_fused_cpu_adamw() for g in opt.param_groups)
    w = method.image_proj[0].weight
    ref, m, v = w.detach().clone(), torch.zeros_like(w), torch.zeros_like(w)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 4):
        g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        for p in method.parameters():
            p.grad = torch.zeros_like(p)
        w.grad = g.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        ref = ref * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-14)

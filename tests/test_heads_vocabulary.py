"""The shared vocabulary of method files: one logit scale (in the unit of t), one projection."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn as nn

from finegrain.heads.logit_scale import LogitScale
from finegrain.heads.projection import Projection
from finegrain.methods.base import build_method
from finegrain.recipes.base import get_recipe


def _owner(**kw) -> nn.Module:
    m = nn.Module()
    m.temperature = LogitScale(**kw).install(m)
    return m


def test_logit_scale_units_clamp_and_keys() -> None:
    m = _owner(init_scale=1 / 0.07, max_scale=100.0, bias_init=-10.0)
    assert set(m.state_dict()) == {"logit_scale", "logit_bias"}  # keys on the owner
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # s = ln t
    assert m.temperature.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert m.temperature.bias().item() == -10.0
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.temperature.clamp_()
    assert m.temperature.scale().item() == pytest.approx(100.0, rel=1e-5)  # t <= max_scale
    with torch.no_grad():
        m.logit_scale.fill_(-3.0)
    m.temperature.clamp_()
    assert m.logit_scale.item() == 0.0  # t >= 1
    free = _owner(init_scale=10.0)  # max 0: no clamp (big_vision SigLIP)
    with torch.no_grad():
        free.logit_scale.fill_(10.0)
    free.temperature.clamp_()
    assert free.logit_scale.item() == 10.0 and "logit_bias" not in free.state_dict()
    with pytest.raises(ValueError, match="no bias"):
        free.temperature.bias()
    fixed = _owner(init_scale=20.0, learnable=False)
    assert not list(fixed.parameters()) and "logit_scale" in fixed.state_dict()


def test_logit_scale_follows_copies_and_pickles() -> None:
    m = _owner(init_scale=5.0, max_scale=100.0)
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        with torch.no_grad():
            other.logit_scale.fill_(0.0)
        assert other.temperature.scale().item() == 1.0  # bound to the copy, not the original
        assert m.temperature.scale().item() == pytest.approx(5.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"init_scale": 0.0}, "t > 0"),
        ({"init_scale": 10.0, "max_scale": 4.6}, "exceeds the max"),
        ({"init_scale": 0.5, "max_scale": 0.9}, "t >= 1"),
    ],
)
def test_logit_scale_bad_values(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LogitScale(**kw)


@pytest.mark.parametrize("name", ["clip", "siglip", "flair", "grain"])
def test_methods_share_units(name: str) -> None:
    """Every method: init t = 1/0.07 (SigLIP 10), clamp t <= 100 (SigLIP: none), same keys."""
    cfg = get_recipe(f"{name}_smoke").method
    m = build_method(cfg)
    t0, t_max = (10.0, 0.0) if name == "siglip" else (1 / 0.07, 100.0)
    assert (cfg.init_logit_scale, cfg.max_logit_scale) == pytest.approx((t0, t_max))
    assert m.logit_scale.item() == pytest.approx(math.log(t0))
    with torch.no_grad():
        m.logit_scale.fill_(9.0)
    m.after_optimizer_step(1, 10)
    assert m.logit_scale.item() == pytest.approx(9.0 if name == "siglip" else math.log(100.0))
    assert "logit_scale" in m.state_dict()
    projections = [n for n, mod in m.named_modules() if isinstance(mod, Projection)]
    assert {"image_proj", "text_proj"} <= set(projections), projections


def test_projection_loads_legacy_keys() -> None:
    proj = Projection(8, 4)
    w = torch.randn(4, 8)
    holder = nn.Module()
    holder.image_proj = proj
    holder.load_state_dict({"image_proj.proj.weight": w})  # the former child nn.Linear
    assert torch.equal(proj.weight, w) and set(holder.state_dict()) == {"image_proj.weight"}
    with pytest.raises(ValueError, match=r"\(embed_dim, width\) = \(4, 8\)"):
        Projection(8, 4, weight=torch.randn(8, 4))


def test_grain_loads_matrix_projection_checkpoints() -> None:
    cfg = get_recipe("grain_smoke").method
    m = build_method(cfg)
    sd = m.state_dict()
    legacy = dict(sd)
    for name in ("image_proj", "region_proj", "text_proj"):
        legacy[name] = legacy.pop(f"{name}.weight").t().contiguous()  # the (width, D) layout
    fresh = build_method(cfg)
    fresh.load_state_dict(legacy)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in sd.items())

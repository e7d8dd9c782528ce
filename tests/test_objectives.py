"""Objectives compose (issue #28 item 6): a method is towers + pooling/heads + a weighted list
of objectives (``finegrain.methods.objectives``); the six papers' methods are presets of it
(their parity and loss tests are unchanged), and ``finegrain.methods.composed`` combines the
same objectives into recipes no paper defines, which train, evaluate and run in the benchmark.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from finegrain.data.loader import build_train_loader
from finegrain.eval import run_tasks
from finegrain.eval.config import EvalTaskConfig
from finegrain.methods.base import build_method
from finegrain.methods.composed import ComposedConfig, check_composed
from finegrain.methods.objectives import Objective, Objectives, Terms
from finegrain.methods.vocab import LOSS_TERMS
from finegrain.recipes.base import get_recipe


class Const(Objective):
    """A toy objective: fixed terms from a feature."""

    features = ("x",)

    def __init__(self, **terms: float) -> None:
        self.terms = terms

    def __call__(self, method, feats) -> Terms:  # noqa: ANN001
        return Terms({k: v * feats["x"] for k, v in self.terms.items()}, {"m": 1.0}, {"s": 2.0})


class Owner:
    temperature = None
    cfg = ComposedConfig(name="toy")


def test_weighted_sum_in_list_order_and_one_line_errors() -> None:
    x = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    obj = Objectives([(Const(a_loss=1.0, b_loss=3.0), {"b_loss": 0.5}), (Const(c_loss=5.0), {})])
    out = obj(Owner(), {"x": x})
    assert out.loss.item() == 2.0 + 0.5 * 6.0 + 10.0  # a missing weight is 1
    assert list(out.losses) == ["a_loss", "b_loss", "c_loss"]
    assert not any(v.requires_grad for v in out.losses.values())  # logged terms detached
    assert out.metrics == {"m": 1.0} and out.stats == {"s": 2.0}
    out.loss.backward()
    assert x.grad.item() == 1.0 + 0.5 * 3.0 + 5.0
    assert obj.features == ("x",)
    with pytest.raises(ValueError, match=r"method 'toy': the objectives need features \['x'\]"):
        obj(Owner(), {"y": x})
    with pytest.raises(ValueError, match="at least one objective"):
        Objectives([])


PRESETS = {  # method -> (objective classes, weights) as the papers sum their terms
    "clip": ["ClipObjective"],
    "siglip": ["SigmoidObjective"],
    "clippy": ["ClipObjective"],
    "flair": ["TextConditionedObjective", "MultiPositiveObjective"],
    "grain": ["ClipObjective", "RegionObjective"],
    "detailclip": ["ClipObjective", "DistillationObjective", "ReconstructionObjective"],
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_six_methods_are_presets(name: str) -> None:
    method = build_method(get_recipe(f"{name}_smoke").method)
    assert [type(o).__name__ for o, _ in method.objectives.items] == PRESETS[name]
    if name == "flair":  # (L_tcs + L_mps) / 2
        assert [w for _, w in method.objectives.items] == [{"tcs_loss": 0.5}, {"mps_loss": 0.5}]
    if name == "grain":  # released weighting
        weights = method.objectives.items[1][1]
        assert (weights["box_l1_loss"], weights["region_loss"]) == (1.5, 1.0)


def _batch(method, cfg, n: int = 4) -> dict:  # noqa: ANN001
    data = replace(cfg.data, batch_size=n, num_workers=0)
    return next(iter(build_train_loader(data, method.make_collate(train=True), seed=0)))


@pytest.mark.parametrize("name", ["flair_grain", "clippy_recon"])
def test_composed_recipe_total_is_the_weighted_sum_of_its_terms(name: str) -> None:
    cfg = get_recipe(f"{name}_smoke")
    torch.manual_seed(0)
    method = build_method(cfg.method).double().train()
    batch = _batch(method, cfg)
    batch["image"] = batch["image"].double()
    out = method(batch)
    weights = {"tcs_loss": 0.5, "mps_loss": 0.5, "box_l1_loss": 1.5, "box_giou_loss": 1.5,
               "region_loss": 1.0, "clip_loss": 1.0, "recon_loss": 1.0}  # fmt: skip
    expected = sum(weights[k] * v.item() for k, v in out.losses.items())
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-12)
    assert set(out.losses) <= set(LOSS_TERMS) and torch.isfinite(out.loss)
    caps = method.capabilities()
    if name == "flair_grain":
        assert set(out.losses) == {"tcs_loss", "mps_loss", "box_l1_loss", "box_giou_loss",
                                   "region_loss"}  # fmt: skip
        assert {"score_features", "attention_maps", "region_embeddings", "predict_boxes"} <= caps
        assert method.logit_bias.item() == pytest.approx(-math.log(3))  # prior at B = 4
    else:
        assert set(out.losses) == {"clip_loss", "recon_loss"} and batch["keep"].shape == (4, 32)
        assert caps == {"dense_features"}


def test_composed_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="list each of clip, siglip, tcs, mps, regions, recon"):
        check_composed(ComposedConfig(objectives=["clip", "nope"]))
    with pytest.raises(ValueError, match="2 values for 1 objectives"):
        check_composed(ComposedConfig(objectives=["clip"], weights=[1.0, 2.0]))
    cfg = get_recipe("clippy_recon_smoke").method
    hybrid = replace(cfg.image, name="efficientnet_lite0")
    with pytest.raises(ValueError, match="objective 'recon' needs a ViT image tower"):
        build_method(replace(cfg, image=hybrid))


@pytest.mark.parametrize("name", ["flair_grain", "clippy_recon"])
def test_composed_recipe_evaluates(name: str) -> None:
    """Zero-shot classification and segmentation run on the composed methods."""
    cfg = get_recipe(f"{name}_smoke")
    torch.manual_seed(0)
    method = build_method(cfg.method)
    tasks = [EvalTaskConfig(task=t, dataset="synthetic", num_samples=8)
             for t in ("zeroshot", "segmentation")]  # fmt: skip
    res = run_tasks(method, tasks, progress=False, data_cfg=cfg.data)
    assert any(k.startswith("zeroshot") for k in res) and any("miou" in k for k in res), res
    assert all(math.isfinite(v) for v in res.values()), res

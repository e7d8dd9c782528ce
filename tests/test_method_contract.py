"""The method contract, checked for every method finegrain registers (docs/CONTRACTS.md).

Each method is built from its ``<name>_smoke`` recipe and fed a small batch of the built-in
synthetic scenes through its own collate, so a new method is checked the moment it registers:

- ``forward`` gives a finite loss and finite named ``*_loss`` terms;
- features of micro-batches, concatenated, give the full batch's loss and gradient (the
  trainer's exact accumulation), compared in float64;
- a ``state_dict`` round trip into a fresh instance gives identical outputs;
- the collates (train and eval) pickle (data-loader workers);
- ``encode_image`` / ``encode_text`` give (B, embed_dim), L2-normalised;
- ``dense_features`` gives (B, D, h, w) where the method supports it.
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import pytest
import torch

from finegrain.data.loader import build_train_loader
from finegrain.heads.logit_scale import LogitScale
from finegrain.methods.base import Method, build_method
from finegrain.methods.vocab import FEATURES, LOSS_TERMS, TOWERS
from finegrain.recipes.base import get_recipe
from finegrain.registry import METHODS, RECIPES

from helpers.numerics import assert_grads_close, concatenated_feature_grads, full_batch_grads

BATCH = 4


def finegrain_methods() -> list[str]:
    """Methods registered by finegrain itself (test-only toys register from tests/helpers)."""
    return [n for n, cls in METHODS.items() if cls.__module__.startswith("finegrain.")]


def smoke_recipe(name: str) -> Any:
    recipe = f"{name}_smoke"
    if recipe not in RECIPES:
        pytest.fail(
            f"method '{name}' is registered but has no '{recipe}' recipe: every method needs a "
            f"smoke twin (tiny model, built-in data) for the contract test and the suite"
        )
    return get_recipe(recipe)


@pytest.fixture(scope="module", params=finegrain_methods())
def built(request: pytest.FixtureRequest) -> tuple[Method, dict[str, Any], Any]:
    """(method in eval mode, a collated batch of BATCH synthetic samples, run config)."""
    cfg = smoke_recipe(request.param)
    torch.manual_seed(0)
    method = build_method(cfg.method).eval()  # eval: no dropout, both paths see one network
    data = replace(cfg.data, batch_size=BATCH, num_workers=0)
    batch = next(iter(build_train_loader(data, method.make_collate(train=True), seed=0)))
    return method, batch, cfg


def test_every_registered_method_has_a_smoke_recipe() -> None:
    names = finegrain_methods()
    assert {"clip", "siglip", "flair", "grain"} <= set(names), names
    missing = [n for n in names if f"{n}_smoke" not in RECIPES]
    assert not missing, f"registered methods without a '<name>_smoke' recipe: {missing}"


def test_forward_gives_finite_named_losses(built) -> None:
    method, batch, _ = built
    with torch.no_grad():
        out = method(batch)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
    assert out.losses, "MethodOutput.losses must name the loss terms"
    for name, value in out.losses.items():
        assert name.endswith("_loss"), f"loss term '{name}' must be named '*_loss'"
        assert torch.isfinite(torch.as_tensor(value)).all(), (name, value)


def test_names_follow_the_vocabulary(built) -> None:
    """Towers ``image``/``text``, features and loss terms named from ``methods.vocab``,
    logged terms detached (``MethodOutput``), one ``LogitScale`` as ``temperature``."""
    method, batch, _ = built
    assert all(isinstance(getattr(method, t), torch.nn.Module) for t in TOWERS)
    feats = method.features(batch)
    assert set(feats) <= set(FEATURES), sorted(set(feats) - set(FEATURES))
    out = method.loss_from_features(feats)
    assert out.loss.requires_grad and set(out.losses) <= set(LOSS_TERMS), sorted(out.losses)
    assert not any(v.requires_grad for v in out.losses.values())
    assert isinstance(method.temperature, LogitScale)


def test_features_have_the_batch_as_leading_dim(built) -> None:
    method, batch, _ = built
    n = batch["image"].shape[0]
    with torch.no_grad():
        feats = method.features(batch)
    for k, v in feats.items():
        assert v.dim() >= 1 and v.shape[0] == n, f"feature '{k}' {tuple(v.shape)}: batch first"


def test_concatenated_microbatch_features_give_full_batch_gradient(built) -> None:
    """Exact accumulation, in float64 so the check holds on any machine's kernels."""
    method, batch, _ = built
    method = method.double()
    try:
        batch64 = {
            k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in batch.items()
        }
        n = batch64["image"].shape[0]
        ref_loss, ref = full_batch_grads(method, batch64)
        loss, got = concatenated_feature_grads(method, batch64, [(0, n // 2), (n // 2, n)])
    finally:
        method.float()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert ref, "no parameter received a gradient"
    assert_grads_close(got, ref, rtol=1e-8, atol_rel=1e-10)


def test_state_dict_round_trip(built) -> None:
    method, batch, cfg = built
    fresh = build_method(cfg.method).eval()
    fresh.load_state_dict(method.state_dict())
    with torch.no_grad():
        a, b = method(batch), fresh(batch)
        assert torch.equal(a.loss, b.loss)
        images, tokens = batch["image"], method.tokenize(["a red square", "two blue circles"])
        assert torch.equal(method.encode_image(images), fresh.encode_image(images))
        assert torch.equal(method.encode_text(tokens), fresh.encode_text(tokens))


@pytest.mark.parametrize("train", [True, False])
def test_collate_pickles(built, train: bool) -> None:
    method, _, _ = built
    collate = pickle.loads(pickle.dumps(method.make_collate(train=train)))
    assert callable(collate)


def test_encoders_give_normalised_embeddings(built) -> None:
    method, batch, cfg = built
    d = cfg.method.embed_dim
    tokens = method.tokenize(["a red square", "two blue circles", "a small green star"])
    with torch.no_grad():
        img = method.encode_image(batch["image"])
        txt = method.encode_text(tokens)
    assert img.shape == (batch["image"].shape[0], d) and txt.shape == (3, d)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(len(img)))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(txt)))


def test_dense_features_shape(built) -> None:
    method, batch, cfg = built
    images = batch["image"][:2]
    try:
        with torch.no_grad():
            dense = method.dense_features(images)
    except NotImplementedError as e:
        pytest.skip(f"{type(method).__name__} has no dense_features: {e}")
    patch = cfg.method.image.patch_size  # the smoke towers are patch towers
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    assert dense.dim() == 4 and dense.shape[0] == 2 and dense.shape[2:] == grid, (
        f"dense_features must be (B, D, h, w) with (h, w) = {grid}, got {tuple(dense.shape)}"
    )
    assert torch.isfinite(dense).all()

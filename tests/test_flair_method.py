"""The FLAIR method: contract, projections, collate, scoring, accumulation, recipes."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import finegrain.encoders  # noqa: F401  (registers the towers)
from finegrain.config import ConfigError, from_dict
from finegrain.encoders.base import ImageTowerConfig, TextTowerConfig
from finegrain.heads.logit_scale import prior_logit_bias
from finegrain.methods.base import MethodConfig, build_method
from finegrain.methods.flair import FLAIR, FLAIRConfig, caption_pool
from finegrain.registry import METHODS

K = 3


def tiny_cfg(**kw) -> FLAIRConfig:
    args = dict(
        embed_dim=32, pool_heads=4, num_subcaptions=K, max_sentences=2,
        image=ImageTowerConfig(name="vit", image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=TextTowerConfig(name="transformer", context_length=32, width=32, depth=1, heads=2),
    )  # fmt: skip
    return FLAIRConfig(**{**args, **kw})


def sample(i: int, **fields) -> dict:
    g = torch.Generator().manual_seed(i)
    s = {"key": str(i), "seed": 1000 + i, "image": torch.randn(3, 32, 32, generator=g), "caption": "",
         "captions": [], "long_caption": "", "sentences": []}  # fmt: skip
    s.update(fields)
    return s


@pytest.fixture(scope="module")
def model() -> FLAIR:
    torch.manual_seed(0)
    return FLAIR(tiny_cfg())


@pytest.fixture(scope="module")
def batch(model: FLAIR) -> dict:
    sents = [["A red circle.", "A blue square on the left.", "The background is grey."],
             ["A green star."], ["Two yellow hearts.", "A big cross."], ["A pink moon.", "Stripes."]]  # fmt: skip
    return model.make_collate()([sample(i, sentences=s) for i, s in enumerate(sents)])


def test_registered_and_config_polymorphic() -> None:
    assert METHODS.get("flair") is FLAIR and FLAIR.Config is FLAIRConfig
    cfg = from_dict(MethodConfig, {"name": "flair", "num_subcaptions": 4})
    assert isinstance(cfg, FLAIRConfig) and cfg.num_subcaptions == 4
    assert cfg.init_logit_bias == -10.0 and math.isclose(cfg.init_logit_scale, 1 / 0.07)
    with pytest.raises(ConfigError, match="num_subcaption"):
        from_dict(MethodConfig, {"name": "flair", "num_subcaption": 4})


@pytest.mark.parametrize(
    "field,value,match",
    [("sampling", "windows", "diverse, consecutive, random"),
     ("caption_source", "alt", "auto, sentences"),
     ("loss_normalization", "mean", "released, per_image"),
     ("exchange", "all", "gather, ring"),
     ("num_subcaptions", 0, ">= 1"),
     ("pool_heads", 5, "divisible")],
)  # fmt: skip
def test_bad_config_names_valid_choices(field: str, value, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_method(tiny_cfg(**{field: value}))


def test_forward_contract_and_gradients(model: FLAIR, batch: dict) -> None:
    assert batch["texts"].shape == (4, K, 32) and batch["pair_seed"].shape == (4,)
    model.zero_grad()
    out = model(batch)
    assert set(out.losses) == {"tcs_loss", "mps_loss"}
    torch.testing.assert_close(out.loss, (out.losses["tcs_loss"] + out.losses["mps_loss"]) / 2)
    out.loss.backward()
    for name in ("pooling.attn.in_proj_weight", "pooling.ln_k.weight", "image_proj.weight",
                 "text_proj.weight", "logit_scale", "logit_bias"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_one_shared_projection_for_cls_and_patches(model: FLAIR, batch: dict) -> None:
    with torch.no_grad():
        f = model.features(batch)
        v = model.image(batch["image"])
        assert f["image_tokens"].shape == (4, 16, 32)  # CLS excluded
        torch.testing.assert_close(f["image"], v.pooled @ model.image_proj.weight.t())
        torch.testing.assert_close(f["image_tokens"], v.tokens @ model.image_proj.weight.t())
        eot = model.text(batch["texts"][:, 0]).pooled @ model.text_proj.weight.t()
        torch.testing.assert_close(f["texts"][:, 0], eot)


def test_conditioned_score_and_dense_features(model: FLAIR) -> None:
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a red circle", "a blue square", "a green star", "stripes"])
    with torch.no_grad():
        s = model.score(images, tokens)
        assert s.shape == (3, 4) and model.has_conditioned_score
        img_f = model.image_features_for_scoring(images)  # (3, 1 + N, D)
        txt_f = model.text_features_for_scoring(tokens)
        for i in range(3):
            for j in range(4):
                pooled = model.pooling(txt_f[j].view(1, 1, -1), img_f[i : i + 1, 1:])[0, 0]
                torch.testing.assert_close(s[i, j], F.cosine_similarity(pooled, txt_f[j], dim=0),
                                           rtol=1e-5, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(img_f[:, 0], model.encode_image(images, normalize=False))
        dense = model.dense_features(images)
        assert dense.shape == (3, 32, 4, 4)
        # independent: the tower's patch tokens through the shared projection, placed on the
        # (h, w) grid row by row (patch n = row n // w, column n % w)
        v = model.image(images)
        w = model.image_proj.weight  # (D, C), bias-free
        for b in range(3):
            for n in range(16):
                expected = w @ v.tokens[b, n]  # (D,)
                torch.testing.assert_close(dense[b, :, n // 4, n % 4], expected)


def test_logit_scale_clamped_after_step() -> None:
    m = FLAIR(tiny_cfg())
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.after_optimizer_step(1, 10)
    assert math.isclose(m.logit_scale.item(), math.log(100), rel_tol=1e-6)


def test_prior_logit_bias_values() -> None:
    assert math.isclose(prior_logit_bias(32), -math.log(31))  # log-odds of 1 positive in 32
    assert math.isclose(prior_logit_bias(1025), -math.log(1024))
    assert prior_logit_bias(2) == 0.0 and prior_logit_bias(1) == 0.0


def test_logit_bias_prior_set_once_by_first_training_forward(batch: dict) -> None:
    torch.manual_seed(0)
    m = FLAIR(tiny_cfg())
    assert m.logit_bias.item() == -10.0
    with torch.no_grad():
        m.eval()(batch)  # evaluation never initialises
    assert m.logit_bias.item() == -10.0
    m.train()(batch)  # B = 4 images
    assert math.isclose(m.logit_bias.item(), -math.log(3), rel_tol=1e-6)
    with torch.no_grad():
        m.logit_bias.fill_(-1.25)  # as if trained
    m(batch)
    assert m.logit_bias.item() == -1.25, "the prior is set once, not at every forward"
    resumed = FLAIR(tiny_cfg())
    resumed.load_state_dict(m.state_dict())  # a loaded b (resume, released weights) is kept
    resumed.train()(batch)
    assert resumed.logit_bias.item() == -1.25
    fixed = FLAIR(tiny_cfg(logit_bias_init="fixed"))  # the released behaviour
    fixed.train()(batch)
    assert fixed.logit_bias.item() == -10.0


def test_collate_bad_input_and_caption_sources(model: FLAIR) -> None:
    collate = model.make_collate()
    samples = [sample(0, sentences=["One sentence only."]),  # fewer sentences than K
               sample(1),  # no caption at all: skipped and counted
               sample(2, long_caption="A dog runs. It is 3.5 years old, e.g. young."),
               sample(3, captions=["a child plays", "a kid in a park"]),  # Flickr-style pool
               sample(4, sentences="A plain string. Not a list.")]  # fmt: skip
    out = collate(samples)
    assert out["texts"].shape[:2] == (4, K) and out["stats"]["skipped_samples"] == 1
    assert out["image"].shape == (4, 3, 32, 32)
    assert caption_pool(samples[4]) == ["A plain string.", "Not a list."]  # never char by char
    assert caption_pool(samples[2]) == ["A dog runs.", "It is 3.5 years old, e.g. young."]
    assert caption_pool(samples[3]) == ["a child plays", "a kid in a park"]
    assert caption_pool(sample(5, caption="Alt text. Two."), "captions") == []
    again = collate(samples)
    assert torch.equal(out["texts"], again["texts"])  # randomness only from sample seeds
    with pytest.raises(ValueError, match="none of the 2 samples"):
        collate([sample(0), sample(1, sentences=["  "])])


def test_batch_of_one_and_k_larger_than_sentences(model: FLAIR) -> None:
    out = model(model.make_collate()([sample(0, sentences=["Just one."])]))
    assert torch.isfinite(out.loss)


def test_recipes() -> None:
    from finegrain.recipes.base import get_recipe
    from finegrain.recipes.flair import steps_for_epochs

    vitb = get_recipe("flair_vitb16")
    m, t, d = vitb.method, vitb.train, vitb.data
    assert isinstance(m, FLAIRConfig) and (m.num_subcaptions, m.max_sentences) == (8, 3)
    assert (m.image.patch_size, m.image.width, m.image.image_size, m.embed_dim) == (
        16,
        768,
        224,
        512,
    )
    assert (t.lr, t.warmup_steps, t.betas, t.weight_decay, t.precision) == (
        5e-4,
        2000,
        (0.9, 0.98),
        0.5,
        "bf16",
    )
    assert d.batch_size == 128 and d.source == "wds"
    assert m.logit_bias_init == "fixed" and m.init_logit_bias == -10.0  # released, paper batch
    assert t.steps == steps_for_epochs(2_823_019, 32, 1024) == 32 * 2756
    smoke = get_recipe("flair_smoke")
    assert smoke.data.source == "synthetic" and smoke.train.device == "cpu"
    assert smoke.method.logit_bias_init == "prior"  # small batches (docs/flair_scenes.md)
    # the released mix's counterpart: alt-text + short caption + long caption's sentences
    assert smoke.method.caption_fields == ["caption", "captions", "sentences"]
    scorings = {task.scoring for task in smoke.eval.tasks}
    assert scorings == {"global", "conditioned"}
    with pytest.raises(ValueError):
        steps_for_epochs(0, 1, 1)


def test_flickr8k_recipe_swaps_only_the_method() -> None:
    pytest.importorskip("finegrain.recipes.clip")
    from finegrain.recipes.base import get_recipe

    clip, flair = get_recipe("clip_flickr8k"), get_recipe("flair_flickr8k")
    assert flair.method.image == clip.method.image and flair.method.text == clip.method.text
    assert flair.data == clip.data and flair.train == clip.train
    assert flair.method.caption_source == "captions"
    assert any(t.scoring == "conditioned" for t in flair.eval.tasks)
    assert get_recipe("flair_flickr8k_smoke").method.name == "flair"


def test_benchmark_loop_reference_equals_library() -> None:
    """The per-image loop timed in benchmarks/bench_flair.py computes the same loss."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_flair.py"
    spec = importlib.util.spec_from_file_location("bench_flair", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    from finegrain.heads.pooling import TextConditionedPooling
    from finegrain.losses.flair import text_conditioned_sigmoid_loss

    pool = TextConditionedPooling(16, heads=4)
    tokens, texts, seeds = torch.randn(5, 6, 16), torch.randn(5, 3, 16), torch.arange(5) * 13
    ref = bench.per_image_loop_tcs(pool, tokens, texts, 7.0, -3.0, seeds)
    torch.testing.assert_close(
        text_conditioned_sigmoid_loss(pool, tokens, texts, 7.0, -3.0, pair_seed=seeds), ref
    )


def test_attention_maps_are_the_pooling_weights(model: FLAIR) -> None:
    """(Ni, Nt, h, w) maps: the pooling's attention over patches (zero slot left out)."""
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(["a red circle", "a blue square", "a star"])
    maps = model.attention_maps(images, tokens)
    _, patches, (h, w) = model._image(images)
    assert maps.shape == (2, 3, h, w)
    text = model._text(tokens)
    for i in range(2):
        want = model.pooling.attention_weights(text[None], patches[i : i + 1])[0, :, : h * w]
        torch.testing.assert_close(maps[i].flatten(1), want)
    assert (maps.flatten(2).sum(-1) <= 1 + 1e-5).all()
    model.train()
